"""Pacing: backends' events go into outboxes no faster than their clients read.

Theory of operation. A backend's batch can be larger than an outbox holds; pushed at once it
would close every recipient with 1013, reading or not. So backends' events are paced, where
the backplane's engine says: the local engine waits for room before it fans a paced publish
out (``room()``: the API and RabbitMQ, one batch at a time; when there is room, it says so
at once, with nothing to await, and a wait that the hub's drain ends raises
``DrainingError``: that event does not go out); the Redis engine hands every
node what Redis brings, and a backend's event that does not fit (or that others wait ahead
of) joins this node's backlog, which a task of its own paces out in order (``deliver()``).
A paced event fills an outbox only up to half its bound (the other half stays free for
users' messages, which are never paced and never wait), and when a recipient is past that,
waits until the outbox is down to a quarter. A client that holds one batch (or one run of
backlog) up for ``pace_timeout`` seconds in all does not keep up, and is closed with 1013
(``Outbox.overflow``). The wait polls the few full outboxes with a short, growing sleep:
nothing is added to the path of an event that fits.

Order. A user's event passes the backlog, unless its own stream waits there: a stream goes
out in offset order. Only past ``backlog_bytes`` does the Redis listener get something to
await (Redis then holds the rest until the backlog drains).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Collection, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final

from . import protocol
from .outbox import Item, Outbox, item
from .protocol import Kind

PACE_POLL: Final = (0.001, 0.02)  # the first and the longest sleep while waiting for room
BACKLOG_BYTES: Final = 16 * 1024 * 1024  # backend events from Redis held here while paced


class DrainingError(Exception):
    """The hub began draining while a paced event waited for room: it does not go out."""


@dataclass(slots=True)
class HubStats:
    """Counters kept per publish, never per recipient."""

    published: dict[tuple[str, str], int] = field(default_factory=dict)
    deliveries: int = 0
    slow_consumers: int = 0
    paced: int = 0  # publishes that waited for room in some outbox


class Pacer:
    """Waits for room in the hub's outboxes, and paces the backlog out."""

    def __init__(
        self,
        recipients: Callable[[Kind, str], Collection[Outbox]],
        push: Callable[[Collection[Outbox], Item], None],
        stats: HubStats,
        pace_timeout: float,
        backlog_bytes: int = BACKLOG_BYTES,
    ) -> None:
        self._recipients = recipients
        self._push = push
        self._stats = stats
        self.pace_timeout = pace_timeout
        self.backlog_bytes = backlog_bytes
        self.closed = False  # the hub drains: nothing waits any more
        self._backlog: collections.deque[tuple[Kind, str, Item]] = collections.deque()
        self._backlog_streams: dict[tuple[Kind, str], int] = {}  # events of each in the backlog
        self._backlog_size = 0
        self._backlog_room = asyncio.Event()
        self._backlog_task: asyncio.Task[None] | None = None

    def room(
        self, kind: Kind, target: str, size: int, waited: dict[str, float]
    ) -> Coroutine[Any, Any, None] | None:
        """None when the recipients of a paced event of ``size`` bytes have room for it now;
        else a coroutine that waits until they have (``waited``: how long each user has
        held this batch up so far), and raises ``DrainingError`` if the hub began draining
        meanwhile."""
        full = _full(self._recipients(kind, target), size)
        if not full:
            return None
        self._stats.paced += 1
        return self._room(full, size, waited)

    async def _room(self, full: list[Outbox], size: int, waited: dict[str, float]) -> None:
        await self._wait(full, size, waited)
        if self.closed:
            raise DrainingError("the server is shutting down")

    def deliver(self, kind: Kind, target: str, frame: str) -> Awaitable[None] | None:
        """What the backplane hands this node. A user's message, or a backend's that fits,
        is fanned out now; a backend's that does not (or that others wait ahead of) joins
        the backlog. Only past ``backlog_bytes`` does the caller get something to await."""
        entry = item(frame)
        backlog = self._backlog
        key = (kind, target)
        if not protocol.from_backend(frame):
            # A user's event passes the backlog, unless its own stream waits there.
            if not backlog or key not in self._backlog_streams:
                self._push(self._recipients(kind, target), entry)
                return None
        elif not backlog:
            recipients = self._recipients(kind, target)
            if not _full(recipients, entry[1]):
                self._push(recipients, entry)
                return None
        backlog.append((kind, target, entry))
        self._backlog_streams[key] = self._backlog_streams.get(key, 0) + 1
        self._backlog_size += entry[1]
        if self._backlog_task is None or self._backlog_task.done():
            self._backlog_task = asyncio.get_running_loop().create_task(
                self._pace_backlog(), name="wsfanout-pacer"
            )
        if self._backlog_size > self.backlog_bytes:
            self._backlog_room.clear()
            return self._backlog_drains()
        return None

    async def _backlog_drains(self) -> None:
        await self._backlog_room.wait()

    async def close(self) -> None:
        """Stop pacing the backlog out (the hub has drained: nobody is left to get it)."""
        self.closed = True
        task, self._backlog_task = self._backlog_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _pace_backlog(self) -> None:
        """Fan the backlog out in order, each event once its recipients have room."""
        backlog = self._backlog
        waited: dict[str, float] = {}  # for this run of backlog: how long each user held it up
        try:
            while backlog:
                kind, target, entry = backlog[0]
                full = _full(self._recipients(kind, target), entry[1])
                if full and not self.closed:
                    self._stats.paced += 1
                    await self._wait(full, entry[1], waited)
                backlog.popleft()
                self._backlog_size -= entry[1]
                streams = self._backlog_streams
                if (left := streams[kind, target] - 1) > 0:
                    streams[kind, target] = left
                else:
                    del streams[kind, target]
                if not self.closed:
                    self._push(self._recipients(kind, target), entry)
                if self._backlog_size <= self.backlog_bytes:
                    self._backlog_room.set()
        finally:
            self._backlog_room.set()

    async def _wait(self, full: list[Outbox], size: int, waited: dict[str, float]) -> None:
        """Wait until each of these outboxes has room again (down to a quarter of its
        bound), or is closed. A user whose connections have held this batch up for
        ``pace_timeout`` seconds in all (counted once per user, however many of their
        sockets are full) does not keep up: those outboxes are overflowed (closed with
        1013). Counting per user, not per socket, means opening a fresh socket that never
        reads every few seconds buys no more than one does."""
        loop = asyncio.get_running_loop()
        delay, longest = PACE_POLL
        budget = self.pace_timeout
        last = loop.time()
        while full and not self.closed:
            await asyncio.sleep(delay)
            delay = min(delay * 2, longest)
            now = loop.time()
            spent, last = now - last, now
            full = [o for o in full if o.close_code is None and o.queued_bytes > _resume(o, size)]
            for user in {outbox.user.lower() for outbox in full}:
                waited[user] = waited.get(user, 0.0) + spent
            still = []
            for outbox in full:
                if waited[outbox.user.lower()] >= budget:
                    outbox.overflow()
                else:
                    still.append(outbox)
            full = still


def _full(recipients: Collection[Outbox], size: int) -> list[Outbox]:
    """The open outboxes that a paced publish of ``size`` bytes would fill past half their
    bound, and that waiting can bring lower (``_resume``). An event larger than a whole
    outbox is not waited for: it can never fit."""
    return [
        o
        for o in recipients
        if (queued := o.queued_bytes) + size > o.limit // 2
        and queued > _resume(o, size)
        and o.close_code is None
        and size <= o.limit
    ]


def _resume(outbox: Outbox, size: int) -> int:
    """How low a full outbox must get before a paced event of ``size`` bytes goes in: a
    quarter of its bound (so that events go in many at a time), and room for this one."""
    limit = outbox.limit
    return min(limit // 4, limit - size)
