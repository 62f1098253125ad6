"""The interface between the hub and a backplane engine, both ways.

The hub talks to one ``Backplane``, always: the local engine (``local.py``, one node: the
embedded default) or the Redis engine (``redis/``, many nodes). An engine takes what the
hub publishes and hands it back to the hub's ``Node`` callbacks wherever it must reach:
the local engine at once (``fan_out``), the Redis engine on every node once Redis has it
(``deliver``, which paces backends' events through a backlog). So the hub asks no
question about which engine it has: each does the right thing for its kind of node.

What an engine must keep (the hub's docstring tells why):
- ``publish`` is a plain ``def`` that never awaits: the local engine fans out before it
  returns (and returns None), the Redis engine queues and returns a future;
- ``publish_paced`` paces a backend's event where the engine's node can: the local engine
  waits for room first (``Node.room``), the Redis engine leaves it to every receiver. It is
  a plain ``def`` too: only when it must wait for room does it hand back a coroutine;
- a publish with an idempotency ``key`` goes out only if its stream had no publish with
  that key within the engine's ttl (else it is dropped, counted in ``duplicates``, and its
  sender hears it was taken): the local engine keeps the keys in memory, the Redis engine
  in Redis, set in the same script as the publish;
- ``positions`` finds where a joining connection's streams stand, and what it missed,
  without a gap or a duplicate with what reaches its outbox live;
- presence (``arrive`` / ``regroup`` / ``depart``): a user's first and last connection,
  over all nodes the engine spans, told once to the groups chosen by the caller, and once
  to ``OnPresence`` (the lifecycle hooks) by the node that decided it; ``recount`` keeps
  every user's number of connections, over all nodes, for ``connections``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from ..outbox import Outbox
from ..protocol import Kind, Position

OnMessage = Callable[[Kind, str, str], None]
"""Takes (kind, target, encoded event) for what arrives from any node, never awaiting: a
node that stopped reading Redis would have its subscription dropped."""
OnControl = Callable[[dict[str, Any]], None]
"""Takes another node's control change (``Backplane.control``)."""
OnPresence = Callable[[str, str, float], None]
"""Takes ("online" or "offline", the user, when: seconds since the epoch), once per user's
first and last connection over all nodes, on the node that decided it; never awaiting."""
Paced = asyncio.Future[None] | Coroutine[Any, Any, None] | None
"""What a paced publish hands back at once: None (fanned out here), a future that settles
once the backplane has it (as ``publish``), or, when it must wait for room here first, a
coroutine to await before the next paced publish (it publishes once there is room)."""
Read = dict[str, tuple[Position, list[str] | None]]
"""Where each stream stands and, for a stream the client had seen, what it missed since
(None: that cannot be recovered)."""
Recent = tuple[Position, list[str]]
"""Where a stream stands, and its last messages (oldest first)."""


class BackplaneUnavailableError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(f"the backplane is unavailable ({reason}), try again")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Node:
    """The hub's side, handed to its engine once (``Backplane.bind``)."""

    deliver: OnMessage
    """An event from the backplane: pushed to the local recipients, or paced (a backend's)."""
    fan_out: Callable[[Kind, str, str], None]
    """An event pushed to the local recipients now, whatever their outboxes hold."""
    room: Callable[[Kind, str, int], Awaitable[None] | None]
    """None when the local recipients have room for a backend's event of this many bytes;
    else something to await until they have (or those that fall behind are closed), which
    raises if the hub begins draining meanwhile."""
    users_in: Callable[[str], Collection[str]]
    """The users connected here in a group."""
    missed: Callable[[], None]
    """Back on the backplane after losing it: what was published meanwhile never came."""
    connections: Callable[[str], int]
    """How many connections a user has here."""


class Backplane(Protocol):
    """What the hub talks to: fan-out, history positions, presence, control."""

    node: str
    """This node's name: in presence, new epochs and lifecycle events (random per process)."""

    @property
    def duplicates(self) -> int:
        """Publishes dropped because their stream had their idempotency key (``publish``)."""

    @property
    def healthy(self) -> bool:
        """Whether it can take publishes now."""

    def bind(self, node: Node) -> None:
        """Hand what reaches this node to ``node`` (called once, by the hub)."""

    def start(self, on_control: OnControl | None, on_presence: OnPresence | None) -> None:
        """Start sharing fan-out; other nodes' control changes go to ``on_control``; users
        coming online and going offline (decided here) to ``on_presence``."""

    async def close(self) -> None: ...

    async def health(self) -> dict[str, str]:
        """What ``/healthz`` says of it: each check's name and "ok" or "failing: why"."""

    # Fan-out

    def make_room(self, count: int) -> None:
        """Check that ``count`` publishes can be taken now (a batch goes all or none).

        Raises:
            BackplaneUnavailableError: they cannot.
        """

    def publish(
        self, kind: Kind, target: str, head: str, tail: str, key: str | None = None
    ) -> asyncio.Future[None] | None:
        """Send one encoded message (``protocol.message_parts``) to every node, never
        awaiting anyone: None once fanned out here, or a future that settles once the
        backplane has it (or fails with ``BackplaneUnavailableError``). With an
        idempotency ``key`` its stream already had within the engine's ttl, it is dropped
        instead, and answered the same.

        Raises:
            BackplaneUnavailableError: it cannot be taken now.
        """

    def publish_paced(
        self, kind: Kind, target: str, head: str, tail: str, key: str | None = None
    ) -> Paced:
        """``publish`` a backend's message, paced (see the hub's Pacing), never awaiting:
        what it hands back (``Paced``) is awaited only when it must wait for room first.

        Raises:
            BackplaneUnavailableError: it cannot be taken now.
        """

    async def control(self, change: dict[str, Any]) -> None:
        """Tell every other node of an operator's change (a JSON-able dict).

        Raises:
            BackplaneUnavailableError: the other nodes cannot be told now.
        """

    def want(self, kind: Kind, target: str) -> None:
        """Hear this group's or user's messages (the hub has a local connection for it)."""

    def unwant(self, kind: Kind, target: str) -> None:
        """No local connection is left for this group or user."""

    # History (DESIGN 5.1)

    async def positions(
        self, outbox: Outbox, streams: list[str], seen: dict[str, Position]
    ) -> Read | None:
        """Where a joining connection's streams stand, and (for those in ``seen``) what it
        missed, at most ``outbox.limit`` bytes of it; the outbox was just added to the hub.
        None when there is no history, or it cannot be read now."""

    async def recent(self, stream: str, limit: int, budget: int) -> Recent | None:
        """Where a stream stands and its last ``limit`` messages, oldest first, as many of
        the newest as fit in ``budget`` bytes (DESIGN 5.4). None when there is no history.

        Raises:
            BackplaneUnavailableError: it cannot be read now.
        """

    # Presence (DESIGN 5.2)

    def arrive(self, user: str, groups: tuple[str, ...], announce: tuple[str, ...]) -> None:
        """This node has its first connection of ``user``, who is in ``groups``; the groups
        in ``announce`` are told when the user comes online and goes offline."""

    def regroup(self, user: str, groups: tuple[str, ...], left: tuple[str, ...] = ()) -> None:
        """A user present here is now in these groups, and no longer in ``left`` (told no
        more of their comings and goings)."""

    def depart(self, user: str) -> None:
        """This node's last connection of ``user`` is gone."""

    def recount(self, user: str) -> None:
        """A user present here opened or closed a connection (``Node.connections``)."""

    async def connections(self, users: list[str]) -> dict[str, int]:
        """How many connections each of these users has over all nodes, for those with
        any, keyed by the name as given (matched case-insensitively).

        Raises:
            BackplaneUnavailableError: it cannot say now.
        """

    async def online(self, group: str, limit: int) -> tuple[list[str], int]:
        """The group's online users (at most ``limit`` names) and their exact count.

        Raises:
            BackplaneUnavailableError: it cannot say now.
        """

    async def present(self, kind: Kind, target: str) -> bool:
        """Whether someone is online in this group (or as this user) on another node.

        Raises:
            BackplaneUnavailableError: it cannot say now.
        """
