"""Presence in Redis (DESIGN 5.2): who is online, on any node, and their comings and goings.

Theory of operation. ``<prefix>pu:<user>`` (case-folded) holds, per node, until when that
node vouches for the user (a sorted set scored by expiry, by Redis's clock), and
``<prefix>pn:<user>`` how many connections each node has of them;
``<prefix>pg:<group>`` the group's online users, and ``<prefix>pall`` every online user,
scored the same way. A node says a user is here on their first local connection, when
their number of connections here changes, and again every ``HEARTBEAT`` seconds
(``here.lua``), and gone on their last disconnection (``gone.lua``). The first node to make
a user present publishes their ``online`` events, the last to let go their ``offline``
events, from inside the script, so the two can never cross; the script's answer tells
that node to hand the same news to the lifecycle hooks (``OnPresence``): once over all
nodes. Every node also reaps, every ``HEARTBEAT``, the users whose every node stopped
vouching for them (``reap.lua``): a node that dies without a word loses its users within
``PRESENCE_TTL`` plus a heartbeat. Arrivals and departures are said in order by one task.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
from collections.abc import Callable
from typing import Any, Final

import orjson
from redis.exceptions import RedisError

from ... import protocol
from ...protocol import Kind
from ..base import BackplaneUnavailableError, OnPresence
from .link import PIPELINE_MAX, Link, Script, describe, stop
from .pubsub import channel_of

log = logging.getLogger(__name__)

HEARTBEAT: Final = 5.0  # seconds between a node's presence refreshes (and reaps)
PRESENCE_TTL: Final = 15.0  # seconds a node vouches for its users' presence at a time
REAP_MAX: Final = 500  # users reaped per script call ...
REAP_CALLS: Final = 20  # ... and calls per heartbeat, while there are more

_HERE: Final = Script.packaged("here")
_GONE: Final = Script.packaged("offline", "gone")
_REAP: Final = Script.packaged("offline", "reap")
_ONLINE: Final = Script.packaged("online")
_CONNECTIONS: Final = Script.packaged("connections")


@dataclasses.dataclass(frozen=True, slots=True)
class Present:
    """What a node tells Redis of a present user: their groups, and the ``online`` and
    ``offline`` events (channel, frame) for the groups small enough to be told."""

    groups: tuple[str, ...]
    online: tuple[tuple[str, str], ...]
    offline: tuple[tuple[str, str], ...]


class Presence:
    """The users this node vouches for, said to Redis in order by a task of its own."""

    def __init__(self, link: Link, node: str) -> None:
        self._link = link
        self._node = node
        self._present: dict[str, Present] = {}  # users this node vouches for
        self._ops: collections.deque[tuple[str, Present | None]] = collections.deque()
        self._wake = asyncio.Event()
        self._drops: list[tuple[str, str]] = []  # (group key, user) to remove now
        self._sending_gone: list[str] = []  # departures in the task's pipeline
        self._task: asyncio.Task[None] | None = None
        self.count: Callable[[str], int] = lambda user: 1  # the hub's ``Node.connections``
        self._on_presence: OnPresence | None = None

    def arrive(self, user: str, groups: tuple[str, ...], announce: tuple[str, ...]) -> None:
        """This node has its first connection of ``user``, who is in ``groups``: vouch for
        them (in order with ``depart``). The groups in ``announce`` are told when the user
        comes online and goes offline (on whichever node)."""
        prefix = self._link.prefix
        channels = [(prefix + channel_of(Kind.GROUP, g), g) for g in announce]
        present = self._present[user] = Present(
            groups,
            tuple((channel, protocol.arrival("online", user, g)) for channel, g in channels),
            tuple((channel, protocol.arrival("offline", user, g)) for channel, g in channels),
        )
        self._ops.append((user, present))
        self._wake.set()

    def regroup(self, user: str, groups: tuple[str, ...], left: tuple[str, ...] = ()) -> None:
        """A user present here is now in these groups (an operator changed them), and no
        longer in ``left``: vouch for them in these groups' presence from now on, drop
        them from the others' at once, and tell those no more of their comings and goings."""
        present = self._present.get(user)
        if present is None:
            return
        prefix = self._link.prefix
        gone = {prefix + channel_of(Kind.GROUP, group) for group in left}
        present = self._present[user] = Present(
            groups,
            tuple(event for event in present.online if event[0] not in gone),
            tuple(event for event in present.offline if event[0] not in gone),
        )
        self._drops += [(prefix + "pg:" + group, user) for group in left]
        self._ops.append((user, present))
        self._wake.set()

    def depart(self, user: str) -> None:
        """This node's last connection of ``user`` is gone."""
        self._present.pop(user, None)
        self._ops.append((user, None))
        self._wake.set()

    def recount(self, user: str) -> None:
        """A user present here opened or closed a connection: say how many they have."""
        present = self._present.get(user)
        if present is not None:
            self._ops.append((user, present))
            self._wake.set()

    async def connections(self, users: list[str]) -> dict[str, int]:
        """How many connections each of these users has over all live nodes (those with
        any), keyed as given.

        Raises:
            BackplaneUnavailableError: Redis cannot be reached now.
        """
        link = self._link
        link.check()
        if not users:
            return {}
        keys = [link.prefix + "pu:" + user.lower() for user in users]
        keys += [link.prefix + "pn:" + user.lower() for user in users]
        try:
            (counts,) = await link.pipeline([(_CONNECTIONS, len(keys), *keys)], client=link.queries)
        except (RedisError, OSError) as exc:
            raise BackplaneUnavailableError(describe(exc)) from None
        return {user: int(count) for user, count in zip(users, counts, strict=True) if count}

    async def online(self, group: str, limit: int) -> tuple[list[str], int]:
        """The group's online users (at most ``limit`` names) and their exact count.

        Raises:
            BackplaneUnavailableError: Redis cannot be reached now.
        """
        link = self._link
        link.check()
        try:
            (result,) = await link.pipeline(
                [(_ONLINE, 1, link.prefix + "pg:" + group, limit)], client=link.queries
            )
        except (RedisError, OSError) as exc:
            raise BackplaneUnavailableError(describe(exc)) from None
        return sorted(name.decode() for name in result[1:]), int(result[0])

    async def present(self, kind: Kind, target: str) -> bool:
        """Whether some node vouches for someone in this group (or for this user).

        Raises:
            BackplaneUnavailableError: Redis cannot be reached now.
        """
        link = self._link
        link.check()
        key = "pg:" + target if kind is Kind.GROUP else "pu:" + target.lower()
        try:
            (found,) = await link.pipeline([("EXISTS", link.prefix + key)], client=link.queries)
        except (RedisError, OSError) as exc:
            raise BackplaneUnavailableError(describe(exc)) from None
        return bool(found)

    def _here(self, user: str, present: Present) -> tuple[Any, ...]:
        prefix = self._link.prefix
        info = orjson.dumps(
            {"g": [prefix + "pg:" + group for group in present.groups], "e": present.offline}
        )
        keys = [*self._keys(user), *(prefix + "pg:" + group for group in present.groups)]
        events = [part for event in present.online for part in event]
        count = self.count(user)
        return (_HERE, len(keys), *keys, self._node, PRESENCE_TTL, user, info, count, *events)

    def _gone(self, user: str) -> tuple[Any, ...]:
        keys = self._keys(user)
        return (_GONE, len(keys), *keys, self._node, user)

    def _keys(self, user: str) -> tuple[str, str, str, str]:
        """The keys ``here.lua`` and ``gone.lua`` begin with: pu, pall, pi, pn."""
        prefix, key = self._link.prefix, user.lower()
        return prefix + "pu:" + key, prefix + "pall", prefix + "pi:" + key, prefix + "pn:" + key

    def start(self, on_presence: OnPresence | None = None) -> None:
        self._on_presence = on_presence
        self._task = asyncio.get_running_loop().create_task(self._run(), name="wsfanout-presence")

    def _told(self, commands: list[tuple[Any, ...]], results: list[Any]) -> None:
        """Hand the users these scripts made come online or go offline (their answer is
        Redis's time then) to the lifecycle hooks."""
        on_presence = self._on_presence
        if on_presence is None:
            return
        for command, result in zip(commands, results, strict=True):
            if command[0] is _REAP:
                for user in result[2:]:
                    on_presence("offline", user.decode(), float(result[1]))
            elif isinstance(result, bytes):
                online = command[0] is _HERE
                user = command[2 + command[1] + 2] if online else command[-1]
                on_presence("online" if online else "offline", user, float(result))

    async def _run(self) -> None:
        """Say who arrives and departs, in order; every HEARTBEAT, vouch again for everyone
        present here and reap the users of nodes that died."""
        link = self._link
        loop = asyncio.get_running_loop()
        ops = self._ops
        next_beat = loop.time()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_beat - loop.time())):
                    await self._wake.wait()
            self._wake.clear()
            commands: list[tuple[Any, ...]] = [("ZREM", *drop) for drop in self._drops]
            self._drops = []
            while ops:
                user, arrived = ops.popleft()
                commands.append(self._gone(user) if arrived is None else self._here(user, arrived))
            beat = loop.time() >= next_beat
            if beat:
                next_beat = loop.time() + HEARTBEAT
                commands += [self._here(user, info) for user, info in self._present.items()]
            self._sending_gone = [command[-1] for command in commands if command[0] is _GONE]
            try:
                for start in range(0, len(commands), PIPELINE_MAX):
                    chunk = commands[start : start + PIPELINE_MAX]
                    self._told(chunk, await link.pipeline(chunk))
                for _ in range(REAP_CALLS if beat else 0):
                    reap = [(_REAP, 1, link.prefix + "pall", link.prefix, REAP_MAX)]
                    reaped = await link.pipeline(reap)
                    self._told(reap, reaped)
                    if reaped[0][0] < REAP_MAX:
                        break
            except (RedisError, OSError) as exc:
                # The next heartbeat says again who is here; a departure said meanwhile
                # is lost, and expires with its TTL.
                log.debug("presence update failed: %s", describe(exc))
            self._sending_gone = []

    async def close(self) -> None:
        """Stop the task, and say goodbye for everyone who left and whose departure was
        not said yet, and for everyone still here, so they go offline now, not in
        PRESENCE_TTL."""
        task, self._task = self._task, None
        if task is None:
            return
        await stop(task)
        leaving = [*self._sending_gone]
        leaving += [user for user, arrived in self._ops if arrived is None]
        leaving += [user for user in self._present if user not in leaving]
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(2):
                goodbyes = [self._gone(user) for user in leaving]
                self._told(goodbyes, await self._link.pipeline(goodbyes))
        self._present.clear()
        self._ops.clear()
