"""The per-connection bounded outbox and the writer that drains it.

Theory of operation: fan-out calls ``push()`` for every recipient. It is a plain
``def``: it appends the already-encoded frame (one shared object for all
recipients) to a deque, adds its size and, if the writer is asleep, wakes it. It
never awaits, so one slow client cannot hold up a broadcast. The writer task is
the only thing that awaits the client's socket: it takes up to ``batch_max``
queued events and sends them as one frame (a JSON array when there are several).

The bound is on bytes queued here. When a push would pass it, the outbox drops
what it holds, stops accepting, and calls ``on_overflow`` (which cancels the
writer, most likely stuck on a client that does not read); the endpoint then
closes the connection with 1013. Memory per connection therefore never grows past
the bound plus what the server's socket buffer holds.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable

from . import protocol
from .types import Send

Item = tuple[str, int]
"""An encoded event and its size in bytes, made once per publish, shared by every outbox."""


def item(frame: str) -> Item:
    """Pair a frame with its UTF-8 size (cheap for ASCII, which most frames are)."""
    return frame, len(frame) if frame.isascii() else len(frame.encode())


class Outbox:
    """A bounded queue of encoded events for one connection, with one writer."""

    __slots__ = (
        "_batch_bytes",
        "_batch_max",
        "_frames",
        "_limit",
        "_waiter",
        "close_code",
        "groups",
        "on_overflow",
        "queued_bytes",
        "user",
    )

    def __init__(
        self,
        *,
        user: str,
        groups: tuple[str, ...],
        limit: int,
        batch_max: int,
        batch_bytes: int,
        on_overflow: Callable[[], object] | None = None,
    ) -> None:
        self.user = user
        self.groups = groups
        self._limit = limit
        self._batch_max = batch_max
        self._batch_bytes = batch_bytes
        self._frames: collections.deque[Item] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self.queued_bytes = 0
        self.close_code: int | None = None  # set once: no more pushes are taken
        self.on_overflow = on_overflow

    def push(self, entry: Item) -> bool:
        """Queue one encoded event; False if this outbox no longer takes any."""
        if self.close_code is not None:
            return False
        size = entry[1]
        if self.queued_bytes + size > self._limit:
            self._frames.clear()
            self.queued_bytes = 0
            self.close_code = protocol.CloseCode.TRY_AGAIN_LATER
            if self.on_overflow is not None:
                self.on_overflow()
            return False
        self._frames.append(entry)
        self.queued_bytes += size
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return True

    def close(self, code: int) -> None:
        """Take no more events; the writer sends what is queued, then returns ``code``."""
        if self.close_code is None:
            self.close_code = code
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def run(self, send: Send) -> int:
        """Drain the outbox into ``send`` until closed; return the close code."""
        frames = self._frames
        batch_max = self._batch_max
        batch_bytes = self._batch_bytes
        loop = asyncio.get_running_loop()
        while True:
            if not frames:
                if self.close_code is not None:
                    return self.close_code
                self._waiter = loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
                continue
            text, size = frames.popleft()
            if batch_max > 1 and frames:
                texts = [text]
                while frames and len(texts) < batch_max and size + frames[0][1] <= batch_bytes:
                    more, more_size = frames.popleft()
                    texts.append(more)
                    size += more_size
                if len(texts) > 1:
                    text = protocol.batch(texts)
            self.queued_bytes -= size
            await send({"type": "websocket.send", "text": text})
