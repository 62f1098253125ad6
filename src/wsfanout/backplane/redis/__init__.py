"""The Redis engine: fan-out, history positions, presence and control shared by many nodes.

Its jobs, each in a module of its own: the connection pools, pipelines and Lua scripts
(``link.py``); pub/sub between nodes and the operator's changes (``pubsub.py``); streams'
offsets and history (``positions.py``); who is online (``presence.py``). The scripts are
the ``.lua`` files beside them (``count_failure.lua`` is the login throttle's, run through
the link by ``failures.RedisCounts``). ``RedisBackplane`` puts them together behind the hub's
``Backplane`` interface.

Joining (DESIGN 5.1). A joining connection's positions are read only once this node hears
its streams (Redis confirmed the subscriptions): what is published after the read then
reaches the outbox. Live events that came (or are on their way) while Redis was read are
covered by the reply up to the tops it read, and the outbox drops those (``Outbox.floor``).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any

from ...outbox import Outbox
from ...protocol import Kind, Position
from ..base import BackplaneUnavailableError, Node, OnControl, OnPresence, Read, Recent
from .link import Link
from .positions import Positions
from .presence import Presence
from .pubsub import PubSub

log = logging.getLogger(__name__)


class RedisBackplane:
    """Many nodes through one Redis (``Backplane``)."""

    def __init__(
        self,
        url: str,
        prefix: str,
        *,
        history_size: int = 0,
        history_ttl: float = 0,
        idempotency_ttl: float = 300,
    ) -> None:
        self.node = secrets.token_hex(4)  # this process, in presence and new epochs
        self.link = Link(url, prefix)
        self._positions = Positions(
            self.link, self.node, history_size, history_ttl, idempotency_ttl
        )
        self._pubsub = PubSub(self.link, self._positions, self.node)
        self._presence = Presence(self.link, self.node)
        self._node: Node | None = None
        # What the hub calls most, as they are (no lookup through this object).
        self.want = self._pubsub.want
        self.unwant = self._pubsub.unwant
        self.make_room = self._pubsub.make_room
        self.publish = self._pubsub.publish
        self.arrive = self._presence.arrive
        self.regroup = self._presence.regroup
        self.depart = self._presence.depart
        self.online = self._presence.online
        self.present = self._presence.present
        self.recount = self._presence.recount
        self.connections = self._presence.connections

    @property
    def healthy(self) -> bool:
        return self.link.healthy

    @property
    def duplicates(self) -> int:
        return self._pubsub.duplicates

    def bind(self, node: Node) -> None:
        self._node = node
        self._presence.count = node.connections

    def start(
        self, on_control: OnControl | None = None, on_presence: OnPresence | None = None
    ) -> None:
        """Connect and subscribe: what any node publishes reaches the hub's
        ``Node.deliver``, every other node's control change ``on_control``; users this
        node brings online or sees go offline, ``on_presence``."""
        node = self._node
        if node is None:
            raise RuntimeError("the Redis backplane is not bound to a hub yet")
        self._pubsub.start(node.deliver, node.missed, on_control)
        self._presence.start(on_presence)

    async def close(self) -> None:
        await self._pubsub.close_publisher()
        await self._presence.close()
        await self._pubsub.close_subscriber()
        await self.link.close()

    async def health(self) -> dict[str, str]:
        try:
            await self.link.ping()
        except BackplaneUnavailableError as exc:
            return {"redis": f"failing: {exc.reason}"}
        return {"redis": "ok"}

    def publish_paced(
        self, kind: Kind, target: str, head: str, tail: str, key: str | None = None
    ) -> asyncio.Future[None]:
        """``publish``, its future as it is: every node paces what it receives (the
        hub's backlog), so nothing waits here."""
        return self._pubsub.publish(kind, target, head, tail, key)

    async def control(self, change: dict[str, Any]) -> None:
        await self._pubsub.control(change)

    async def positions(
        self, outbox: Outbox, streams: list[str], seen: dict[str, Position]
    ) -> Read | None:
        if not self._positions.enabled:
            return None
        wanted = [(Kind.DIRECT, outbox.user), *((Kind.GROUP, g) for g in outbox.groups)]
        if not await self._pubsub.subscribed(wanted):
            log.info("a welcome without positions: Redis did not confirm the subscriptions")
            return None
        try:
            read = await self._positions.read(streams, seen, outbox.limit)
        except BackplaneUnavailableError as exc:
            log.info("a welcome without positions: %s", exc.reason)
            return None
        outbox.floor({stream: where.offset for stream, (where, _) in read.items()})
        return read

    async def recent(self, stream: str, limit: int, budget: int) -> Recent | None:
        return (
            await self._positions.recent(stream, limit, budget) if self._positions.enabled else None
        )
