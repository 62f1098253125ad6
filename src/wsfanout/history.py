"""Per-stream offsets, epochs and the bounded history, in memory (one node).

Theory of operation. A stream (``all``, ``group:<name>``, ``user:<username>``: DESIGN 5.1)
is created on first use with a random epoch and offset 0. ``append()`` gives a message the
stream's next offset, joins its encoded parts around it (``protocol.with_offset``), keeps the
result and returns it: the caller fans that same text out. ``since()`` answers a resume:
every kept message after an offset, or None when the epoch is not this stream's or the
history no longer reaches back that far. Appending and fanning out happen in one step of the
event loop, and so do joining the hub and reading ``since()`` (``Connection.run``): a
client gets no gap and no duplicate between replay and live messages.

Bounds. Each stream keeps its last ``size`` messages, younger than ``ttl`` seconds (older
ones are dropped as they are met). All streams together keep at most ``max_bytes`` of
message text: past it, the streams published to least recently lose their oldest messages
first. At most ``max_streams`` streams are known: past that, the least recently used one is
forgotten, epoch and all (a client resuming it is told it was not recovered). So memory is
at most ``max_bytes`` (each message's str, plus ``ENTRY_BYTES``) plus about 250 bytes per
stream (and 600 more for one that has carried a message), whatever is published.

This is the local engine's history (``backplane/local.py``). The Redis engine keeps the same
things in Redis instead (``backplane/redis/positions.py``), so that every node agrees on
offsets and any node can serve a resume. ``replay()`` is what either engine's answer comes to
for a joining connection (the hub's ``join``): the missed messages that fit its outbox.
"""

from __future__ import annotations

import collections
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from .protocol import Position, with_offset

MAX_STREAMS: Final = 100_000
MAX_BYTES: Final = 64 * 1024 * 1024
ENTRY_BYTES: Final = 110  # what keeping a message costs beyond its str (tuple, float, slot)


class _Stream:
    __slots__ = ("at", "entries", "epoch", "offset")

    def __init__(self) -> None:
        self.epoch = secrets.token_urlsafe(6)
        self.offset = 0
        self.at: Position | None = None  # the last position() answered, while it holds
        # (offset, when, frame, size), oldest first; made on the first message (a deque
        # costs 600 bytes, and most streams, a user's, may never carry one)
        self.entries: collections.deque[tuple[int, float, str, int]] | None = None


class History:
    """Offsets and recent messages of every stream this node publishes to."""

    def __init__(
        self,
        size: int,
        ttl: float,
        *,
        max_bytes: int = MAX_BYTES,
        max_streams: int = MAX_STREAMS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.size = size
        self.ttl = ttl
        self.max_bytes = max_bytes
        self.max_streams = max_streams
        self.clock = clock
        self.bytes = 0  # message text kept, over all streams
        self._streams: dict[str, _Stream] = {}  # least recently used first
        self._filled: dict[
            str, _Stream
        ] = {}  # those holding messages, least recently published first

    def __len__(self) -> int:
        return len(self._streams)

    def _stream(self, name: str) -> _Stream:
        streams = self._streams
        stream = streams.pop(name, None)
        if stream is None:
            stream = _Stream()
            if len(streams) >= self.max_streams:
                oldest = next(iter(streams))
                self._filled.pop(oldest, None)
                self.bytes -= sum(entry[3] for entry in streams.pop(oldest).entries or ())
        streams[name] = stream  # now the most recently used
        return stream

    def position(self, name: str) -> Position:
        """Where a stream stands (it is created if it is new)."""
        stream = self._stream(name)
        at = stream.at
        if at is None or at.offset != stream.offset:  # one per offset, not per handshake
            at = stream.at = Position(stream.epoch, stream.offset)
        return at

    def append(self, name: str, head: str, tail: str) -> str:
        """Give a message (``protocol.message_parts``) the stream's next offset and keep
        it; return its text."""
        stream = self._stream(name)
        offset = stream.offset = stream.offset + 1
        frame = with_offset(head, offset, tail)
        size = sys.getsizeof(frame) + ENTRY_BYTES  # a str of 1, 2 or 4 bytes a character
        entries = stream.entries
        if entries is None:
            entries = stream.entries = collections.deque()
        filled = self._filled
        filled.pop(name, None)
        filled[name] = stream  # now the most recently published
        entries.append((offset, self.clock(), frame, size))
        self.bytes += size
        if len(entries) > self.size:
            self.bytes -= entries.popleft()[3]
        if self.bytes > self.max_bytes:
            self._shrink()
        return frame

    def _shrink(self) -> None:
        """Drop the oldest messages of the least recently published streams until the
        history fits in ``max_bytes`` again."""
        filled = self._filled
        while self.bytes > self.max_bytes and filled:
            name = next(iter(filled))
            entries = filled[name].entries
            while entries and self.bytes > self.max_bytes:
                self.bytes -= entries.popleft()[3]
            if not entries:
                del filled[name]

    def since(self, name: str, seen: Position) -> list[str] | None:
        """The kept messages after ``seen.offset``, oldest first; None if this stream's
        epoch is not ``seen.epoch`` or its history no longer reaches back that far."""
        stream = self._streams.get(name)
        if stream is None or stream.epoch != seen.epoch or seen.offset > stream.offset:
            return None
        if seen.offset == stream.offset:
            return []
        entries = stream.entries
        if entries is None:
            return None
        horizon = self.clock() - self.ttl
        while entries and entries[0][1] < horizon:
            self.bytes -= entries.popleft()[3]
        if not entries or entries[0][0] > seen.offset + 1:
            return None
        start = seen.offset + 1 - entries[0][0]
        return [entries[i][2] for i in range(start, len(entries))]

    def recent(self, name: str, limit: int, budget: int) -> tuple[Position, list[str]]:
        """Where a stream stands (it is created if it is new) and its last ``limit`` kept
        messages younger than the ttl, oldest first: as many of the newest as fit in
        ``budget`` characters."""
        stream = self._stream(name)
        found: list[str] = []
        horizon = self.clock() - self.ttl
        for _, when, frame, _ in reversed(stream.entries or ()):
            budget -= len(frame)
            if len(found) >= limit or when < horizon or budget < 0:
                break
            found.append(frame)
        found.reverse()
        return Position(stream.epoch, stream.offset), found


@dataclass(slots=True)
class Joined:
    """What a connection joining the hub is told: where its streams stand (None when
    there is no history, or Redis could not say), what it missed (in order), and which
    of the streams it asked to resume could not be recovered.

    With history on, a connection whose positions Redis could not give (Redis away, or
    this node's subscriptions not confirmed in time) is closed with 1013 before any
    welcome, and comes back with backoff: welcomed without positions, its client could
    neither know what it missed before the subscriptions took hold nor be told, and the
    next welcome would take its streams up from there in silence."""

    positions: dict[str, Position] | None
    replay: list[str]
    lost: list[str]


def replay(
    positions: dict[str, Position], found: dict[str, list[str] | None], budget: int
) -> Joined:
    """What a joining connection is sent: the missed messages of each stream that can be
    recovered, within ``budget`` bytes in all (the hub's ``join``); the others are lost."""
    frames: list[str] = []
    lost = []
    for stream, missed in found.items():
        size = sum(len(frame) for frame in missed) if missed is not None else 0
        if missed is None or size > budget:
            lost.append(stream)
        else:
            frames += missed
            budget -= size
    return Joined(positions, frames, lost)
