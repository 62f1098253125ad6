"""The local index of open connections, and ``publish()``: the one door for every message.

The index is sans-I/O: it only maps everyone, users and groups to outboxes.
Every source (a websocket, the HTTP API, RabbitMQ) hands the hub a ``Publish``
through ``publish()``, a plain ``def``: the event is encoded once, and without a
backplane the same object goes to every local recipient's outbox at once, never
awaiting anyone. With a backplane the encoded event goes to Redis once, and every
node (this one included) fans it out locally when it comes back; ``publish()``
then returns a future that settles when Redis has it. Either way, what the hub
cannot take now (it is shutting down, Redis is away) raises ``UnavailableError``.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Collection
from dataclasses import dataclass, field

from . import protocol
from .backplane import Backplane, BackplaneUnavailableError
from .outbox import Outbox, item
from .protocol import Kind, Publish


@dataclass(slots=True)
class HubStats:
    """Counters kept per publish, never per recipient."""

    published: dict[tuple[str, str], int] = field(default_factory=dict)
    deliveries: int = 0
    slow_consumers: int = 0


class UnavailableError(Exception):
    """The hub cannot take a publish now (shutting down, backplane away): try again."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Hub:
    """Who is connected here: everyone, by user, and by group."""

    def __init__(self, backplane: Backplane | None = None) -> None:
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
            self.backplane.start(self._fan_out)

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
            self._fan_out(publish.kind, publish.target, frame)
            done = None
        else:
            try:
                sent = backplane.publish(publish.kind, publish.target, frame)
            except BackplaneUnavailableError as exc:
                raise UnavailableError(str(exc)) from None
            done = asyncio.get_running_loop().create_future()
            sent.add_done_callback(functools.partial(_settle, done))
        published = self.stats.published
        key = (publish.kind.value, publish.source.value)
        published[key] = published.get(key, 0) + 1
        return done

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

    def _fan_out(self, kind: Kind, target: str, frame: str) -> int:
        """Hand an encoded event to every local recipient; return how many there were."""
        recipients: Collection[Outbox]
        if kind is Kind.BROADCAST:
            recipients = self._all
        elif kind is Kind.GROUP:
            recipients = self._groups.get(target, ())
        else:
            recipients = self._users.get(target.lower(), ())
        entry = item(frame)
        for outbox in recipients:
            outbox.push(entry)
        self.stats.deliveries += len(recipients)
        return len(recipients)

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
