"""Pacing: backends' events go into outboxes no faster than their clients read, and no client
holds a backend up for more than a moment.

Theory of operation. A backend's batch can be larger than an outbox holds; pushed at once it
would close every recipient with 1013, reading or not. So backends' events are paced, where
the backplane's engine says: the local engine waits for room before it fans a paced publish
out (``room()``: the API and RabbitMQ; when there is room, it says so at once, with nothing
to await, and a wait that the hub's drain ends raises ``DrainingError``: that event does not
go out); the Redis engine hands every node what Redis brings, and a backend's event that does
not fit (or that others wait ahead of) joins this node's backlog, which a task of its own
paces out in order (``deliver()``). A paced event fills an outbox only up to half its bound
(the other half stays free for users' messages, which are never paced and never wait), and
when a recipient is past that, waits until the outbox is down to a quarter. The wait polls
the few full outboxes with a short, growing sleep: nothing is added to the path of an event
that fits.

Who may hold a backend up, and for how long. A wait costs every backend (and, in the
backlog, every other recipient) what one client takes, so each user has an allowance,
counted over all their connections, all batches and all waits: ``pace_timeout`` (0.5 s by
default) of holding paced events up, less what they owe. A wait that a user's connections
end within ``GRACE`` (0.25 s) is free: a client that reads drains a quarter of its outbox
in milliseconds, so the waits that any batch larger than half an outbox brings cost readers
nothing. What a wait lasts beyond the grace is owed. A connection still behind when the
grace and its user's allowance are spent has fallen too far behind: it is closed with 1013
(``Outbox.overflow``; the client resumes from history), and its user owes the whole
allowance. What is owed comes back over ``REGAIN`` (30 s). A connection that has drained a
wait before (``Outbox.kept_pace``: its client reads) keeps the grace whatever its user owes,
so a user's other tabs do not pay for one that hangs; a new one gets only what is left, so a
user who owes it all has a socket that never reads closed as soon as it holds anything up.
Counting per user, not per socket, means many sockets buy no more than one; two waits on
the same user at once (two batches) are each charged, never the reverse.

The numbers. A user who reopens a socket that never reads costs backends at most 0.75 s the
first time, then only what came back meanwhile (2.5% of the time): six such users cost at
most 0.75 s at once, and 15% of the time after if they never overlap (they did: the
allowance per batch, 5 s, let six stall every backend nearly all the time). A reader must
take a quarter of its outbox within the grace (1 MB/s with the default 1 MiB) to keep pace
with a burst for free, and a client slower than that for long (a slow link under a 4 MB
batch) is closed and resumes within about a second rather than hold everyone up. The other
side of it: a client that drains just within the grace each time holds a stream down to
that pace, and no further; each socket that has kept pace and then stops reading costs the
grace once.

The backlog never makes the Redis listener wait: a node that stopped reading its
subscription would have Redis drop it (its pub/sub output buffer limit), and everyone on the
node would miss what came meanwhile. It is bounded (``backlog_bytes``) instead: past the
bound, nobody is given more than the grace, nor the grace for free, so the connections its
head waits for are closed (1013) and it drains into the outboxes that have room; a reader
too slow for what comes in spends its allowance there, and is closed too.

Order. The events of one wait (one batch, or the backlog) go out in order. A user's event
passes the backlog, unless its own stream waits there: a stream goes out in offset order.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Collection, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final

from . import protocol
from .outbox import Item, Outbox, item
from .protocol import Kind

PACE_POLL: Final = (0.001, 0.02)  # the first and the longest sleep while waiting for room
BACKLOG_BYTES: Final = 16 * 1024 * 1024  # backend events from Redis held here while paced
GRACE: Final = 0.25  # seconds a wait may last, free, each time a user's connections drain
REGAIN: Final = 30.0  # seconds over which a user gets back an allowance spent in full
OWED_SWEEP: Final = 1024  # users in the accounts before those who owe nothing are forgotten


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
    """Waits for room in the hub's outboxes, paces the backlog out, and keeps each user's
    account of how long they have held backends up."""

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
        self._owed: dict[str, tuple[float, float]] = {}  # user -> (seconds owed, as of when)
        self._sweep_at = OWED_SWEEP  # accounts kept before the next sweep
        self._backlog: collections.deque[tuple[Kind, str, Item]] = collections.deque()
        self._backlog_streams: dict[tuple[Kind, str], int] = {}  # events of each in the backlog
        self._backlog_size = 0
        self._backlog_task: asyncio.Task[None] | None = None

    def room(self, kind: Kind, target: str, size: int) -> Coroutine[Any, Any, None] | None:
        """None when the recipients of a paced event of ``size`` bytes have room for it now;
        else a coroutine that waits until they have (closing those that fall too far
        behind), and raises ``DrainingError`` if the hub began draining meanwhile."""
        full = _full(self._recipients(kind, target), size)
        if not full:
            return None
        self._stats.paced += 1
        return self._room(full, size)

    async def _room(self, full: list[Outbox], size: int) -> None:
        await self._wait(full, size)
        if self.closed:
            raise DrainingError("the server is shutting down")

    def deliver(self, kind: Kind, target: str, frame: str) -> None:
        """What the backplane hands this node. A user's message, or a backend's that fits,
        is fanned out now; a backend's that does not (or that others wait ahead of) joins
        the backlog. Never anything to await: the backlog past its bound closes the
        connections that hold it up instead."""
        entry = item(frame)
        backlog = self._backlog
        key = (kind, target)
        if not protocol.from_backend(frame):
            # A user's event passes the backlog, unless its own stream waits there.
            if not backlog or key not in self._backlog_streams:
                self._push(self._recipients(kind, target), entry)
                return
        elif not backlog:
            recipients = self._recipients(kind, target)
            if not _full(recipients, entry[1]):
                self._push(recipients, entry)
                return
        backlog.append((kind, target, entry))
        self._backlog_streams[key] = self._backlog_streams.get(key, 0) + 1
        self._backlog_size += entry[1]
        if self._backlog_task is None or self._backlog_task.done():
            self._backlog_task = asyncio.get_running_loop().create_task(
                self._pace_backlog(), name="wsfanout-pacer"
            )

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
        while backlog:
            kind, target, entry = backlog[0]
            full = _full(self._recipients(kind, target), entry[1])
            if full and not self.closed:
                self._stats.paced += 1
                await self._wait(full, entry[1], self._backlog_over)
            backlog.popleft()
            self._backlog_size -= entry[1]
            streams = self._backlog_streams
            if (left := streams[kind, target] - 1) > 0:
                streams[kind, target] = left
            else:
                del streams[kind, target]
            if not self.closed:
                self._push(self._recipients(kind, target), entry)

    def _backlog_over(self) -> bool:
        return self._backlog_size > self.backlog_bytes

    async def _wait(
        self, full: list[Outbox], size: int, hurry: Callable[[], bool] | None = None
    ) -> None:
        """Wait until each of these outboxes has room again (down to a quarter of its
        bound), or is closed. An outbox whose user has held the wait up past its allowance
        (counted once per user, however many of their sockets are full) has fallen too far
        behind and is overflowed (closed with 1013); one that has kept pace before keeps
        the grace whatever its user owes. While ``hurry()`` says so (the backlog is over its
        bound), nobody is given more than the grace, nor the grace for free. What each user
        held the wait up for is settled when they stop holding it (see the module's
        docstring)."""
        loop = asyncio.get_running_loop()
        delay, longest = PACE_POLL
        last = loop.time()
        held: dict[str, float] = {}  # user -> how long they have held this wait up
        free = GRACE
        while full and not self.closed:
            await asyncio.sleep(delay)
            delay = min(delay * 2, longest)
            now = loop.time()
            spent, last = now - last, now
            free = 0.0 if hurry is not None and hurry() else GRACE
            still = []
            for outbox in full:
                if outbox.queued_bytes > _resume(outbox, size) and outbox.close_code is None:
                    still.append(outbox)
                elif outbox.close_code is None:
                    outbox.kept_pace = True  # it drained a wait: a client that reads
            full = still
            users = {outbox.user.lower() for outbox in full}
            for user in held.keys() - users:  # drained: what is past the grace is owed
                self._owe(user, held.pop(user) - free, now)
            for user in users:
                held[user] = held.get(user, 0.0) + spent
            closed = set()
            for outbox in full:
                user = outbox.user.lower()
                allowance = GRACE + self.pace_timeout - self._owes(user, now)
                if outbox.kept_pace:
                    allowance = max(allowance, GRACE)
                if held[user] >= (allowance if free else min(allowance, GRACE)):
                    outbox.overflow(
                        f"it held backends' messages up for {held[user]:.2f} s"
                        + ("" if free else " while the backlog was over its bound")
                    )
                    if user not in closed:
                        closed.add(user)
                        self._owe(user, GRACE + self.pace_timeout, now)  # all of it
            if closed:
                full = [outbox for outbox in full if outbox.close_code is None]
                for user in closed - {outbox.user.lower() for outbox in full}:
                    del held[user]  # settled
        now = loop.time()
        for user, spent_by in held.items():
            self._owe(user, spent_by - free, now)

    def _owes(self, user: str, now: float) -> float:
        """What this user owes now, of holding backends up (it comes back over REGAIN)."""
        account = self._owed.get(user)
        if account is None:
            return 0.0
        owed, since = account
        return max(0.0, owed - (now - since) * (GRACE + self.pace_timeout) / REGAIN)

    def _owe(self, user: str, seconds: float, now: float) -> None:
        """Add to what a user owes; those who owe nothing any more are forgotten in sweeps,
        each once the accounts have doubled (so a sweep costs O(1) per account)."""
        if seconds <= 0:
            return
        owed = self._owed
        owed[user] = (min(self._owes(user, now) + seconds, GRACE + self.pace_timeout), now)
        if len(owed) > self._sweep_at:
            for name in [name for name in owed if self._owes(name, now) == 0]:
                del owed[name]
            self._sweep_at = max(OWED_SWEEP, 2 * len(owed))


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
