"""Where the client stands in each stream, and what that makes of the events it receives
(DESIGN 5.1, 11). Sans-I/O.

Theory of operation. A position is a stream's epoch and the offset of the last message the
application was given. ``welcome`` brings the epoch and offset of every stream the
connection listens to; ``message`` moves a stream's offset on; a ``history`` answer may
teach the epoch of a stream the client met without one (``joined``). On reconnect the
positions go in ``?resume=``; the server replays what is newer, and answers ``resumed``.

The client keeps its promise (events in offset order, never twice) by dropping any message
whose offset is not above the last one given in the same epoch; a lost stream goes on from
where the welcome says it stands. It also adds to ``resumed``:

- ``restarted``: the lost streams whose new epoch stands at offset 0 in the new welcome. The
  server's history restarted (a single node restarted, or Redis lost its data) and nothing was
  published since, so nothing is missing that the new epoch holds: a UI can say "the server
  restarted" instead of warning of losses.
- the streams it could not resume itself: one met after the welcome (``joined``) whose epoch
  it never learnt, or positions the server refused (400) and the client dropped (then also
  ``refused: true``). When the server sends no ``resumed`` (nothing was resumed), the client
  makes one.

The JavaScript client (web/wsfanout.js) keeps the same rules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from ..protocol import Kind as _Kind
from ..protocol import Position, stream_of


@dataclass(slots=True)
class _Where:
    epoch: str | None  # None: met after the welcome, epoch not learnt yet
    offset: int | None  # None: no message seen (epoch unknown too)


class Streams:
    """The positions of one client, across its connections."""

    def __init__(self, positions: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self._where: dict[str, _Where] = {}
        for stream, where in (positions or {}).items():
            epoch, offset = where.get("epoch"), where.get("offset")
            if not isinstance(epoch, str) or not epoch or type(offset) is not int or offset < 0:
                raise ValueError(
                    f'positions[{stream!r}] must be {{"epoch": a string, "offset": an int >= 0}}'
                )
            self._where[stream] = _Where(epoch, offset)
        self._sent: dict[str, Position] = {}  # what the last handshake asked to resume
        self._dropped: dict[str, Position] = {}  # positions the server refused (400)
        self._before: dict[str, Position] = {}  # where the streams stood before the welcome
        self._top: dict[str, Position] = {}  # where the last welcome said they stand
        self._unresumed: list[str] = []  # lost on the client's side, for the next resumed
        self._refused = False  # the next resumed follows refused positions

    def positions(self) -> dict[str, dict[str, Any]]:
        """A copy: ``{stream: {"epoch", "offset"}}`` for the streams that can be resumed."""
        return {
            stream: {"epoch": where.epoch, "offset": where.offset}
            for stream, where in self._where.items()
            if where.epoch is not None and where.offset is not None
        }

    def resume(self) -> str | None:
        """The ``resume`` query value for the next handshake (JSON, not yet URL-encoded),
        or None when there is nothing to resume. Remembers what it asked."""
        asked = self.positions()
        self._sent = {stream: Position(w["epoch"], w["offset"]) for stream, w in asked.items()}
        return orjson.dumps(asked).decode() if asked else None

    def forget(self) -> None:
        """The server refused the positions (400): drop them; the next welcome says so."""
        self._dropped = {**self._dropped, **self._sent}
        self._where.clear()
        self._sent = {}

    def welcome(self, event: dict[str, Any]) -> dict[str, Any] | None:
        """Take a welcome's positions. Returns the ``resumed`` event the client makes when the
        server will send none (nothing was asked to resume) but some stream was not resumed."""
        streams = event.get("streams")
        given: dict[str, Any] = streams if isinstance(streams, dict) else {}
        dropped, self._dropped = self._dropped, {}
        self._before = {**dropped, **self._sent}
        self._top, self._unresumed = {}, []
        where: dict[str, _Where] = {}
        for stream, now in given.items():
            epoch, offset = _position(now)
            if epoch is None or offset is None:
                continue
            self._top[stream] = Position(epoch, offset)
            old = self._where.get(stream)
            if old is not None and old.epoch == epoch and (old.offset or 0) <= offset:
                where[stream] = old  # the server replays from there
                continue
            if stream in dropped or (
                old is not None and old.epoch is None and (old.offset or 0) != offset
            ):
                self._unresumed.append(stream)  # refused, or met without an epoch
            where[stream] = _Where(epoch, offset)
        self._where = where  # streams no longer ours (or history off) are forgotten
        self._refused = bool(dropped)
        if self._sent or not self._unresumed:
            return None  # the server's resumed will carry the additions, if any
        return self.resumed({"type": "resumed", "recovered": False, "missed": 0, "lost": []})

    def resumed(self, event: dict[str, Any]) -> dict[str, Any]:
        """A ``resumed`` event with the client's additions: the streams it could not resume
        itself added to ``lost``, and ``restarted``; ``refused`` after dropped positions."""
        lost = [stream for stream in event.get("lost") or [] if isinstance(stream, str)]
        lost += [stream for stream in self._unresumed if stream not in lost]
        self._unresumed = []
        for stream in lost:  # nothing of it was replayed: it goes on from where it stands
            where, top = self._where.get(stream), self._top.get(stream)
            if where is not None and top is not None and where.epoch == top.epoch:
                where.offset = max(where.offset or 0, top.offset)
        event = {**event, "lost": lost, "restarted": [s for s in lost if self._restarted(s)]}
        if lost:
            event["recovered"] = False
        if self._refused:
            event["refused"], self._refused = True, False
        return event

    def _restarted(self, stream: str) -> bool:
        """A lost stream whose history began anew (a new epoch) and got no message since."""
        before, top = self._before.get(stream), self._top.get(stream)
        if before is None or top is None:
            return False
        return top.epoch != before.epoch and top.offset == 0

    def message(self, event: dict[str, Any]) -> bool:
        """Whether a message is new to the application (and if so, move its stream on)."""
        stream, offset = event.get("stream"), event.get("offset")
        if not isinstance(stream, str) or type(offset) is not int:
            return True  # history off: nothing to order by
        where = self._where.get(stream)
        if where is None:
            self._where[stream] = _Where(None, offset)
            return True
        if where.offset is not None and offset <= where.offset:
            return False
        where.offset = offset
        return True

    def history(self, answer: dict[str, Any]) -> None:
        """A history answer teaches the epoch of a stream met without one. Its offset is
        taken only when no message of that stream was seen: a message the server published
        before it answered may still be on its way from another node."""
        stream = answer.get("stream")
        epoch, offset = _position(answer)
        if not isinstance(stream, str) or epoch is None:
            return
        where = self._where.get(stream)
        if where is not None and where.epoch is None:
            where.epoch = epoch
            if where.offset is None:
                where.offset = offset

    def joined(self, group: str) -> str:
        """The connection now listens to a group's stream; its name."""
        stream = stream_of(_Kind.GROUP, group)
        self._where.setdefault(stream, _Where(None, None))
        return stream

    def left(self, group: str) -> None:
        self._where.pop(stream_of(_Kind.GROUP, group), None)


def _position(where: Any) -> tuple[str | None, int | None]:
    if not isinstance(where, dict):
        return None, None
    epoch, offset = where.get("epoch"), where.get("offset")
    return (
        epoch if isinstance(epoch, str) and epoch else None,
        offset if type(offset) is int else None,
    )
