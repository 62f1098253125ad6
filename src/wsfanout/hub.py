"""The local index of open connections, ``publish()`` and ``send()``.

The index is sans-I/O: it only maps everyone, users and groups to outboxes.
``publish`` is a plain ``def``: it encodes the event once and hands the same
object to every local recipient's outbox, never awaiting anyone. ``send`` is
what senders call: without a backplane it is ``publish``; with one, the encoded
event goes to Redis once and comes back to every node (this one included)
through ``deliver``, which fans it out locally the same way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from dataclasses import dataclass, field

from . import protocol
from .backplane import BROADCAST, Backplane, group_channel, user_channel
from .outbox import Outbox, item
from .protocol import Kind


@dataclass(slots=True)
class HubStats:
    """Counters kept per publish, never per recipient."""

    published: dict[tuple[str, str], int] = field(default_factory=dict)
    deliveries: int = 0
    slow_consumers: int = 0


class HubClosedError(Exception):
    """The hub is shutting down and takes no more publishes."""

    def __init__(self) -> None:
        super().__init__("the server is shutting down")


class Hub:
    """Who is connected here: everyone, by user, and by group."""

    def __init__(self) -> None:
        self._all: set[Outbox] = set()
        self._users: dict[str, set[Outbox]] = {}
        self._groups: dict[str, set[Outbox]] = {}
        self.stats = HubStats()
        self.closed = False
        self._empty: asyncio.Event | None = None
        self.backplane: Backplane | None = None

    def attach(self, backplane: Backplane) -> None:
        """Share fan-out with other nodes through ``backplane`` (before any connection)."""
        self.backplane = backplane

    def __len__(self) -> int:
        return len(self._all)

    def add(self, outbox: Outbox) -> None:
        """Index an outbox under everyone, its user (case-folded) and its groups.

        A user or group seen here for the first time is subscribed to on the backplane.
        """
        self._all.add(outbox)
        user = outbox.user.lower()
        if _add(self._users, user, outbox) and self.backplane is not None:
            self.backplane.want(user_channel(user))
        for group in outbox.groups:
            if _add(self._groups, group, outbox) and self.backplane is not None:
                self.backplane.want(group_channel(group))

    def remove(self, outbox: Outbox) -> None:
        """Forget an outbox; unknown ones are ignored, so cleanup may run twice.

        A user or group with no connection left here is unsubscribed from.
        """
        self._all.discard(outbox)
        user = outbox.user.lower()
        if _discard(self._users, user, outbox) and self.backplane is not None:
            self.backplane.unwant(user_channel(user))
        for group in outbox.groups:
            if _discard(self._groups, group, outbox) and self.backplane is not None:
                self.backplane.unwant(group_channel(group))
        if not self._all and self._empty is not None:
            self._empty.set()

    async def emptied(self) -> None:
        """Wait until no connection is left."""
        if self._all:
            self._empty = asyncio.Event()
            await self._empty.wait()

    def has_group(self, name: str) -> bool:
        """Whether a member of this group is connected here (so the group exists)."""
        return name in self._groups

    def local_username(self, name: str) -> str | None:
        """The exact username of a connected user with this username (any case)."""
        outboxes = self._users.get(name.lower())
        return next(iter(outboxes)).user if outboxes else None

    def connected(self, user: str) -> int:
        """How many connections this user has open here."""
        return len(self._users.get(user.lower(), ()))

    def outboxes(self) -> list[Outbox]:
        """A snapshot of every local connection's outbox."""
        return list(self._all)

    def publish(
        self,
        kind: Kind,
        sender: str,
        text: str,
        *,
        target: str = "",
        ts: float | None = None,
        source: str = "websocket",
    ) -> int:
        """Deliver one message to every local recipient; return the local recipient count.

        ``target`` is the group name for a group message and the (resolved) username
        for a direct one.

        Raises:
            HubClosedError: the hub is shutting down.
        """
        if self.closed:
            raise HubClosedError
        self._count(kind, source)
        return self._deliver(kind, target, _encode(kind, sender, text, target, ts))

    def send(
        self, kind: Kind, sender: str, text: str, *, target: str = "", source: str = "websocket"
    ) -> asyncio.Future[None] | None:
        """Publish to every node: through the backplane when there is one.

        Returns:
            None when it was delivered here and now (no backplane); otherwise a future
            that settles when the backplane has taken it (and fails if it could not).

        Raises:
            HubClosedError: the hub is shutting down.
            BackplaneUnavailableError: the backplane cannot take it now.
        """
        backplane = self.backplane
        if backplane is None:
            self.publish(kind, sender, text, target=target, source=source)
            return None
        if self.closed:
            raise HubClosedError
        frame = _encode(kind, sender, text, target, None)
        if kind is Kind.BROADCAST:
            channel = BROADCAST
        elif kind is Kind.GROUP:
            channel = group_channel(target)
        else:
            channel = user_channel(target)
        done = backplane.publish(channel, frame)
        self._count(kind, source)
        return done

    def deliver(self, channel: str, frame: str) -> int:
        """Fan out an encoded event that arrived from the backplane on ``channel``."""
        if channel == BROADCAST:
            return self._deliver(Kind.BROADCAST, "", frame)
        prefix, _, name = channel.partition(":")
        return self._deliver(Kind.GROUP if prefix == "g" else Kind.DIRECT, name, frame)

    def _count(self, kind: Kind, source: str) -> None:
        published = self.stats.published
        key = (kind.value, source)
        published[key] = published.get(key, 0) + 1

    def _deliver(self, kind: Kind, target: str, frame: str) -> int:
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
        outboxes = self.outboxes()
        for start in range(0, len(outboxes), batch):
            if start:
                await asyncio.sleep(pause)
            for outbox in outboxes[start : start + batch]:
                outbox.close(code)


def _encode(kind: Kind, sender: str, text: str, target: str, ts: float | None) -> str:
    stamp = time.time() if ts is None else ts
    if kind is Kind.GROUP:
        return protocol.message(kind, sender, text, stamp, group=target)
    if kind is Kind.DIRECT:
        return protocol.message(kind, sender, text, stamp, to=target)
    return protocol.message(kind, sender, text, stamp)


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
