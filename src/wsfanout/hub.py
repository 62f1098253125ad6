"""The local index of open connections and ``publish()``.

Sans-I/O: the hub only indexes outboxes and pushes into them. ``publish`` is a
plain ``def``: it encodes the event once and hands the same object to every
recipient's outbox, never awaiting anyone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from dataclasses import dataclass, field

from . import protocol
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

    def __len__(self) -> int:
        return len(self._all)

    def add(self, outbox: Outbox) -> None:
        """Index an outbox under everyone, its user (case-folded) and its groups."""
        self._all.add(outbox)
        self._users.setdefault(outbox.user.lower(), set()).add(outbox)
        for group in outbox.groups:
            self._groups.setdefault(group, set()).add(outbox)

    def remove(self, outbox: Outbox) -> None:
        """Forget an outbox; unknown ones are ignored, so cleanup may run twice."""
        self._all.discard(outbox)
        _discard(self._users, outbox.user.lower(), outbox)
        for group in outbox.groups:
            _discard(self._groups, group, outbox)
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
        stamp = time.time() if ts is None else ts
        recipients: Collection[Outbox]
        if kind is Kind.BROADCAST:
            frame = protocol.message(kind, sender, text, stamp)
            recipients = self._all
        elif kind is Kind.GROUP:
            frame = protocol.message(kind, sender, text, stamp, group=target)
            recipients = self._groups.get(target, ())
        else:
            frame = protocol.message(kind, sender, text, stamp, to=target)
            recipients = self._users.get(target.lower(), ())
        entry = item(frame)
        for outbox in recipients:
            outbox.push(entry)
        stats = self.stats
        key = (kind.value, source)
        stats.published[key] = stats.published.get(key, 0) + 1
        stats.deliveries += len(recipients)
        return len(recipients)

    def close_all(self, code: int) -> None:
        """Stop taking publishes and ask every connection's writer to finish with ``code``."""
        self.closed = True
        for outbox in self._all:
            outbox.close(code)

    async def drain(self, code: int, batch: int, pause: float) -> None:
        """Like ``close_all``, ``batch`` connections at a time, ``pause`` seconds apart,
        so a big node does not send every close (and cause every reconnect) at once."""
        self.closed = True
        outboxes = self.outboxes()
        for start in range(0, len(outboxes), batch):
            if start:
                await asyncio.sleep(pause)
            for outbox in outboxes[start : start + batch]:
                outbox.close(code)


def _discard(index: dict[str, set[Outbox]], key: str, outbox: Outbox) -> None:
    members = index.get(key)
    if members is not None:
        members.discard(outbox)
        if not members:
            del index[key]
