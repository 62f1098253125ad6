"""The local engine: one node, no other to tell (the embedded default).

Theory of operation. A publish is fanned out here and now, in the same step as it is handed
over: with history on, the in-memory ``History`` gives the message its stream's next offset
in that step too, so every stream reaches every client in offset order. A backend's message
(``publish_paced``) first waits for room in its recipients' outboxes (``Node.room``) and gets
its offset only once it goes out; when there is room (the usual case) it goes out at once,
with no coroutine in its way. ``positions()`` reads the history without awaiting
anything: the hub's ``join()`` adds the connection and reads where its streams stand in one
step of the event loop, so nothing can be published in between (no gap, no duplicate).

A publish with an idempotency key is checked against the keys of the last ttl seconds
(``idempotency.RecentKeys``) as it is handed over (a paced one before it waits for room),
and dropped if its stream had the key.

Presence is this node's: a user's first connection here is their first anywhere, and their
``online`` / ``offline`` events are fanned out here, to the groups they were announced to,
and told to the lifecycle hooks (``OnPresence``); their connections are the hub's to count.
Control needs no telling: the operator's changes were applied here already.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine
from typing import Any, Final

from .. import protocol
from ..history import History
from ..idempotency import RecentKeys
from ..outbox import Outbox
from ..protocol import Kind, Position
from .base import Node, OnPresence, Read, Recent

OFFSET_BYTES: Final = 30  # what ',"offset":N' adds to a message, at most
IDEMPOTENCY_TTL: Final = 300.0  # seconds, unless given RecentKeys of another ttl


class LocalBackplane:
    """Fan-out, history and presence of one node (``Backplane``)."""

    def __init__(self, history: History | None = None, keys: RecentKeys | None = None) -> None:
        self.history = history
        self.keys = RecentKeys(IDEMPOTENCY_TTL) if keys is None else keys
        self.duplicates = 0
        self.healthy = True
        self.node = secrets.token_hex(4)
        self._on_presence: OnPresence | None = None
        self._announce: dict[str, tuple[str, ...]] = {}  # user -> groups told of them
        # The hub's callbacks (``bind``), kept as they are: one lookup per publish.
        self._fan_out: Callable[[Kind, str, str], None] = _unbound
        self._room: Callable[[Kind, str, int], Awaitable[None] | None] = _unbound
        self._users_in: Callable[[str], Collection[str]] = _unbound
        self._connections: Callable[[str], int] = _unbound

    def bind(self, node: Node) -> None:
        self._fan_out, self._room, self._users_in = node.fan_out, node.room, node.users_in
        self._connections = node.connections

    def start(self, on_control: Any = None, on_presence: OnPresence | None = None) -> None:
        """Nothing to start: no other node sends changes."""
        self._on_presence = on_presence

    async def close(self) -> None:
        """Nothing to close."""

    async def health(self) -> dict[str, str]:
        return {}

    # Fan-out

    def make_room(self, count: int) -> None:
        """Always room: what does not fit an outbox is the pacing's to handle."""

    def publish(
        self, kind: Kind, target: str, head: str, tail: str, key: str | None = None
    ) -> None:
        """Give the message its offset (with history on) and fan it out here, now; or drop
        it, if its stream had its idempotency key."""
        if key is not None and not self._new(kind, target, key):
            return
        self._publish(kind, target, head, tail)

    def _new(self, kind: Kind, target: str, key: str) -> bool:
        if self.keys.add(protocol.stream_of(kind, target), key):
            return True
        self.duplicates += 1
        return False

    def _publish(self, kind: Kind, target: str, head: str, tail: str) -> None:
        history = self.history
        if history is None:
            frame = head + tail
        else:
            frame = history.append(protocol.stream_of(kind, target), head, tail)
        self._fan_out(kind, target, frame)

    def publish_paced(
        self, kind: Kind, target: str, head: str, tail: str, key: str | None = None
    ) -> Coroutine[Any, Any, None] | None:
        """``publish`` now if the recipients' outboxes have room (None); else a coroutine
        that waits for it, then publishes: its offset only then, so each stream stays in
        order. Its idempotency key is checked first: a duplicate waits for nothing."""
        if key is not None and not self._new(kind, target, key):
            return None
        size = len(head.encode()) + len(tail.encode()) + OFFSET_BYTES
        waiting = self._room(kind, target, size)
        if waiting is None:
            self._publish(kind, target, head, tail)
            return None
        return self._publish_after(waiting, kind, target, head, tail, key)

    async def _publish_after(
        self,
        waiting: Awaitable[None],
        kind: Kind,
        target: str,
        head: str,
        tail: str,
        key: str | None,
    ) -> None:
        try:
            await waiting  # raises if the hub begins draining meanwhile: it does not go out
        except BaseException:
            if key is not None:
                self.keys.forget(protocol.stream_of(kind, target), key)
            raise
        self._publish(kind, target, head, tail)

    async def control(self, change: dict[str, Any]) -> None:
        """No other node to tell."""

    def want(self, kind: Kind, target: str) -> None:
        """Everything published here is heard here."""

    def unwant(self, kind: Kind, target: str) -> None:
        """Everything published here is heard here."""

    # History

    async def positions(
        self, outbox: Outbox, streams: list[str], seen: dict[str, Position]
    ) -> Read | None:
        """Read from the history, never awaiting: the caller's step is not interrupted."""
        history = self.history
        if history is None:
            return None
        positions = [(stream, history.position(stream)) for stream in streams]
        return {
            stream: (where, history.since(stream, seen[stream]) if stream in seen else None)
            for stream, where in positions
        }

    async def recent(self, stream: str, limit: int, budget: int) -> Recent | None:
        history = self.history
        return None if history is None else history.recent(stream, limit, budget)

    # Presence

    def arrive(self, user: str, groups: tuple[str, ...], announce: tuple[str, ...]) -> None:
        self._announce[user] = announce
        self._arrival("online", user, announce)

    def regroup(self, user: str, groups: tuple[str, ...], left: tuple[str, ...] = ()) -> None:
        announce = self._announce.get(user)
        if announce is not None and left:  # no more online / offline events to a group left
            self._announce[user] = tuple(group for group in announce if group not in left)

    def depart(self, user: str) -> None:
        self._arrival("offline", user, self._announce.pop(user, ()))

    def recount(self, user: str) -> None:
        """The hub counts them (``connections``)."""

    def _arrival(self, kind: str, user: str, groups: tuple[str, ...]) -> None:
        """``online`` / ``offline`` to each of these groups (one event per group), and to
        the lifecycle hooks."""
        fan_out = self._fan_out
        for group in groups:
            fan_out(Kind.GROUP, group, protocol.arrival(kind, user, group))
        if self._on_presence is not None:
            self._on_presence(kind, user, time.time())

    async def connections(self, users: list[str]) -> dict[str, int]:
        counts = {user: self._connections(user) for user in users}
        return {user: count for user, count in counts.items() if count}

    async def online(self, group: str, limit: int) -> tuple[list[str], int]:
        users = sorted(set(self._users_in(group)))
        return users[:limit], len(users)

    async def present(self, kind: Kind, target: str) -> bool:
        """No other node: whoever is present is in the hub's own index."""
        return False


def _unbound(*args: object) -> Any:
    raise RuntimeError("the local backplane is not bound to a hub yet")
