"""The local index of open connections, and ``publish()``: the one door for every message.

The index is sans-I/O: it only maps everyone, users and groups to outboxes.
Every source (a websocket, the HTTP API, RabbitMQ) hands the hub a ``Publish``
through ``publish()``, a plain ``def``: the event is encoded once, and without a
backplane the same object goes to every local recipient's outbox at once, never
awaiting anyone. With a backplane the encoded event goes to Redis once, and every
node (this one included) fans it out locally when it comes back; ``publish()``
then returns a future that settles when Redis has it. Either way, what the hub
cannot take now (it is shutting down, Redis is away) raises ``UnavailableError``.

Pacing. A backend's batch can be larger than an outbox holds; pushed at once it would
close every recipient with 1013, reading or not. So ``publish_paced()`` (the API and
RabbitMQ use it) and the backplane's delivery of what Redis hands this node fill an
outbox only up to half its bound (the other half stays free for messages that are not
paced: users' own). When a recipient is past that, the publish waits until the outbox
is down to a quarter of its bound; a client that does not get there within
``pace_timeout`` seconds does not read, and is closed with 1013 (``Outbox.overflow``),
so it holds the batch up once, never for long. The wait polls the few full outboxes
with a short, growing sleep: nothing is added to the path of a publish that fits.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Collection, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final

from . import protocol
from .backplane import Backplane, BackplaneUnavailableError
from .outbox import Item, Outbox, item
from .protocol import Kind, Publish

PACE_POLL: Final = (0.001, 0.02)  # the first and the longest sleep while waiting for room


@dataclass(slots=True)
class HubStats:
    """Counters kept per publish, never per recipient."""

    published: dict[tuple[str, str], int] = field(default_factory=dict)
    deliveries: int = 0
    slow_consumers: int = 0
    paced: int = 0  # publishes that waited for room in some outbox


class UnavailableError(Exception):
    """The hub cannot take a publish now (shutting down, backplane away): try again."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Hub:
    """Who is connected here: everyone, by user, and by group."""

    def __init__(self, backplane: Backplane | None = None, pace_timeout: float = 5.0) -> None:
        self.pace_timeout = pace_timeout
        self._all: set[Outbox] = set()
        self._users: dict[str, set[Outbox]] = {}
        self._groups: dict[str, set[Outbox]] = {}
        self.stats = HubStats()
        self.closed = False
        self._close_code = 0  # what drain() closes with; a latecomer gets it too
        self._empty: asyncio.Event | None = None
        self.backplane = backplane

    def start(self) -> None:
        """Start sharing fan-out with other nodes, if there is a backplane."""
        if self.backplane is not None:
            self.backplane.start(self._deliver)

    def __len__(self) -> int:
        return len(self._all)

    def add(self, outbox: Outbox) -> None:
        """Index an outbox under everyone, its user (case-folded) and its groups.

        A user or group seen here for the first time is subscribed to on the backplane.
        An outbox added while the hub drains (its handshake was under way) is closed at once.
        """
        if self.closed:
            outbox.close(self._close_code)
        self._all.add(outbox)
        user = outbox.user.lower()
        if _add(self._users, user, outbox) and self.backplane is not None:
            self.backplane.want(Kind.DIRECT, user)
        for group in outbox.groups:
            if _add(self._groups, group, outbox) and self.backplane is not None:
                self.backplane.want(Kind.GROUP, group)

    def remove(self, outbox: Outbox) -> None:
        """Forget an outbox; unknown ones are ignored, so cleanup may run twice.

        A user or group with no connection left here is unsubscribed from.
        """
        self._all.discard(outbox)
        user = outbox.user.lower()
        if _discard(self._users, user, outbox) and self.backplane is not None:
            self.backplane.unwant(Kind.DIRECT, user)
        for group in outbox.groups:
            if _discard(self._groups, group, outbox) and self.backplane is not None:
                self.backplane.unwant(Kind.GROUP, group)
        if not self._all and self._empty is not None:
            self._empty.set()

    async def emptied(self) -> None:
        """Wait until no connection is left."""
        if self._all:
            if self._empty is None or self._empty.is_set():
                self._empty = asyncio.Event()
            await self._empty.wait()

    def has_group(self, name: str) -> bool:
        """Whether a member of this group is connected here (so the group exists)."""
        return name in self._groups

    def local_username(self, name: str) -> str | None:
        """The exact username of a connected user with this username (any case)."""
        outboxes = self._users.get(name.lower())
        return next(iter(outboxes)).user if outboxes else None

    def outboxes(self) -> list[Outbox]:
        """A snapshot of every local connection's outbox."""
        return list(self._all)

    def publish(self, publish: Publish) -> asyncio.Future[None] | None:
        """The one door: fan a message out to its recipients on every node.

        ``publish.target`` must already be resolved: the group's name, or the exact
        username for a direct message.

        Returns:
            None when it was delivered here and now (no backplane); otherwise a future
            that settles when the backplane has taken it, or fails with UnavailableError.

        Raises:
            UnavailableError: the hub is shutting down, or the backplane is away.
        """
        if self.closed:
            raise UnavailableError("the server is shutting down")
        frame = protocol.message(publish, time.time())
        backplane = self.backplane
        if backplane is None:
            self._push(self._recipients(publish.kind, publish.target), item(frame))
            done = None
        else:
            try:
                sent = backplane.publish(publish.kind, publish.target, frame)
            except BackplaneUnavailableError as exc:
                raise UnavailableError(str(exc)) from None
            done = asyncio.get_running_loop().create_future()
            sent.add_done_callback(functools.partial(_settle, done))
        self._count(publish)
        return done

    async def publish_paced(self, publish: Publish) -> asyncio.Future[None] | None:
        """``publish()``, but first wait for room in the recipients' outboxes (see Pacing).

        With a backplane every node paces what it receives, so this is ``publish()``.

        Raises:
            UnavailableError: as ``publish()``; also when shutting down during the wait.
        """
        if self.backplane is not None or self.closed:
            return self.publish(publish)
        entry = item(protocol.message(publish, time.time()))
        recipients = self._recipients(publish.kind, publish.target)
        full = _full(recipients, entry[1])
        if full:
            self.stats.paced += 1
            await self._room(full)
            if self.closed:
                raise UnavailableError("the server is shutting down")
            recipients = self._recipients(publish.kind, publish.target)
        self._push(recipients, entry)
        self._count(publish)
        return None

    def _count(self, publish: Publish) -> None:
        published = self.stats.published
        key = (publish.kind.value, publish.source.value)
        published[key] = published.get(key, 0) + 1

    def _deliver(self, kind: Kind, target: str, frame: str) -> Coroutine[Any, Any, None] | None:
        """What the backplane hands this node: fanned out now, or (some recipient's outbox
        is full) a coroutine for the backplane to await, which waits for room first."""
        entry = item(frame)
        recipients = self._recipients(kind, target)
        full = _full(recipients, entry[1])
        if full:
            self.stats.paced += 1
            return self._push_when_room(kind, target, entry, full)
        self._push(recipients, entry)
        return None

    async def _push_when_room(
        self, kind: Kind, target: str, entry: Item, full: list[Outbox]
    ) -> None:
        await self._room(full)
        self._push(self._recipients(kind, target), entry)

    async def _room(self, full: list[Outbox]) -> None:
        """Wait until each of these outboxes is down to a quarter of its bound, or closed;
        those that are not within ``pace_timeout`` are overflowed (closed with 1013)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.pace_timeout
        delay, longest = PACE_POLL
        while full and not self.closed:
            if loop.time() >= deadline:
                for outbox in full:
                    outbox.overflow()
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, longest)
            full = [o for o in full if o.close_code is None and o.queued_bytes > o.limit // 4]

    def make_room(self, count: int) -> None:
        """Check that ``count`` publishes can be taken now, before taking any of them.

        Raises:
            UnavailableError: the hub is shutting down, or the backplane cannot take them.
        """
        if self.closed:
            raise UnavailableError("the server is shutting down")
        if self.backplane is not None:
            try:
                self.backplane.make_room(count)
            except BackplaneUnavailableError as exc:
                raise UnavailableError(str(exc)) from None

    def _recipients(self, kind: Kind, target: str) -> Collection[Outbox]:
        if kind is Kind.BROADCAST:
            return self._all
        if kind is Kind.GROUP:
            return self._groups.get(target, ())
        return self._users.get(target.lower(), ())

    def _push(self, recipients: Collection[Outbox], entry: Item) -> None:
        """Hand an encoded event to every local recipient."""
        for outbox in recipients:
            outbox.push(entry)
        self.stats.deliveries += len(recipients)

    async def drain(self, code: int, batch: int, pause: float) -> None:
        """Stop taking publishes and ask every connection's writer to finish with ``code``,
        ``batch`` connections at a time, ``pause`` seconds apart, so a big node does not
        send every close (and cause every reconnect) at once."""
        self.closed = True
        self._close_code = code
        outboxes = self.outboxes()
        for start in range(0, len(outboxes), batch):
            if start:
                await asyncio.sleep(pause)
            for outbox in outboxes[start : start + batch]:
                outbox.close(code)


def _full(recipients: Collection[Outbox], size: int) -> list[Outbox]:
    """The open outboxes that a paced publish of ``size`` bytes would fill past half their
    bound (an event larger than a whole outbox is not waited for: it can never fit)."""
    return [
        o
        for o in recipients
        if o.queued_bytes + size > o.limit // 2 and o.close_code is None and size <= o.limit
    ]


def _settle(done: asyncio.Future[None], sent: asyncio.Future[None]) -> None:
    """Pass the backplane's answer on, in the hub's own terms."""
    if done.done():
        return
    if sent.cancelled():
        done.set_exception(UnavailableError("the backplane is shutting down"))
    elif (exc := sent.exception()) is not None:
        done.set_exception(UnavailableError(str(exc)))
    else:
        done.set_result(None)


def _add(index: dict[str, set[Outbox]], key: str, outbox: Outbox) -> bool:
    """Add to a key's set; True if the key is new."""
    members = index.get(key)
    if members is None:
        index[key] = {outbox}
        return True
    members.add(outbox)
    return False


def _discard(index: dict[str, set[Outbox]], key: str, outbox: Outbox) -> bool:
    """Remove from a key's set; True if that emptied (and dropped) the key."""
    members = index.get(key)
    if members is not None:
        members.discard(outbox)
        if not members:
            del index[key]
            return True
    return False
