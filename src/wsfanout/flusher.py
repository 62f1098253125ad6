"""The flusher: one per event loop, it sends for the parked writers of many outboxes in one
task step (outbox.py's theory of operation says why and when)."""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from . import protocol
from .outbox import Item, Outbox, WriterStats
from .types import Message

log = logging.getLogger(__name__)

FLUSH_CHUNK: Final = 1000  # outboxes flushed before the flusher lets other tasks run
SETTLE_TURNS: Final = 8  # turns of the loop a flush waits, at most, while a burst arrives


class Flusher:
    """Sends for parked writers, many connections per task step (one per event loop)."""

    def __init__(self, stats: WriterStats | None = None) -> None:
        self.stats = stats if stats is not None else WriterStats()
        self._ready: list[Outbox] = []
        self._waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self.passes = 0  # flushes so far: a reader that sees it stand still is hogging the loop
        self._batch_entries: list[Item] = []  # the last batch made (``batch``) ...
        self._batch_message: Message = {}  # ... and its message

    def batch(self, entries: list[Item]) -> Message:
        """The message that sends these events as one frame: the one made last time when
        it was for the same events, as it is for each recipient of a burst of broadcasts in
        turn, so that its text (and the server's frame, ``DirectWriter``) is built once."""
        if entries != self._batch_entries:
            texts = [entry[0] for entry in entries]
            self._batch_message = {"type": "websocket.send", "text": protocol.batch(texts)}
            self._batch_entries = entries
        return self._batch_message

    def schedule(self, outbox: Outbox) -> None:
        ready = self._ready
        ready.append(outbox)
        if len(ready) > 1:
            return  # already woken for this round
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        elif self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="wsfanout-flusher"
            )

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._ready:
                self._waiter = loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
            if len(self._ready[0]._frames) > 1:
                await self._settle()
            ready = self._ready
            self._ready = []
            self.passes += 1
            for start in range(0, len(ready), FLUSH_CHUNK):
                if start:
                    await asyncio.sleep(0)  # a huge fan-out must not starve the readers
                for outbox in ready[start : start + FLUSH_CHUNK]:
                    try:
                        outbox._flush()
                    except Exception:  # one connection's bug must not stop everyone's sends
                        log.exception("flushing an outbox failed")

    async def _settle(self) -> None:
        """A burst is arriving (the round's first outbox holds several events already: they
        were published before the flusher could run): wait a turn of the loop while more
        keep coming, so that they leave in larger batches, fewer frames. A server hands the
        publisher's reader a few frames at a time (hypercorn queues 10 for the app), and the
        reader waits a turn for the next few: the flush goes once the first outbox's queue
        stood still for two turns, holds a full batch (events or bytes), or after
        ``SETTLE_TURNS``."""
        first = self._ready[0]
        size, still = len(first._frames), 0
        for _ in range(SETTLE_TURNS):
            if size >= first._batch_max or first.queued_bytes >= first._batch_bytes:
                return
            await asyncio.sleep(0)
            now = len(first._frames)
            if now == size:
                still += 1
                if still == 2:
                    return
            else:
                size, still = now, 0

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
