"""Redis pub/sub between nodes (optional). Knows no hub: what arrives goes to a callback.

Theory of operation. Every publish from any node goes to Redis once, already
encoded, on one channel: ``<prefix>all`` for broadcasts, ``<prefix>g:<group>``
for a group, ``<prefix>u:<username>`` for a user's connections. Channel names are
this module's alone: callers speak of a message's kind and target. Every node
(including the sender's) receives it on its one subscriber connection and hands
``(kind, target, frame)`` to ``on_message``, which fans it out locally. Redis keeps
the order of messages on a subscriber connection, and a sender awaits each
publish before the next, so each sender's messages reach each recipient in order.

A node is subscribed to ``all`` always, and to a group's or user's channel only
while it wants it (``want``/``unwant``, which the hub calls when a group or user
gets its first or loses its last local connection). The wanted set is applied
by one task, so a burst of connections becomes one SUBSCRIBE.

History (DESIGN 5.1). With history on, a message is not PUBLISHed as is: one Lua script
(``_PUBLISH``) gives it its stream's next offset (``INCR`` of a field of the stream's meta
hash, ``<prefix>s:<stream>``, which also holds the epoch), joins the encoded parts around it,
appends it to the stream's history (``XADD`` with ``MAXLEN`` on ``<prefix>h:<stream>``, the
offset as the entry's ID) and PUBLISHes it, in one atomic step. So two nodes never hand out
the same offset, and every node receives a stream's messages in offset order. ``positions()``
reads where streams stand and, for a resume, what a client missed (``_POSITIONS``), also in
one step per stream. A stream whose meta is gone (expired, or Redis lost its data) gets a
new epoch from Redis's clock, and its old history is dropped with it.

Presence (DESIGN 5.2). ``<prefix>pu:<user>`` (case-folded) holds, per node, until when that
node vouches for the user (a sorted set scored by expiry, by Redis's clock);
``<prefix>pg:<group>`` the group's online users, and ``<prefix>pall`` every online user,
scored the same way. A node says a user is here on their first local connection and again
every ``HEARTBEAT`` seconds (``_HERE``), and gone on their last disconnection (``_GONE``).
The first node to make a user present publishes their ``online`` events, the last to let go
their ``offline`` events, from inside the script, so the two can never cross. Every node
also reaps, every ``HEARTBEAT``, the users whose every node stopped vouching for them
(``_REAP``): a node that dies without a word loses its users within ``PRESENCE_TTL`` plus a
heartbeat.

Control (DESIGN 5.3). Every node also hears ``<prefix>ctl``: ``control()`` publishes a change
made by the operator (a revocation, a membership) as a small JSON object, and every other
node hands it to ``on_control``; a node's own changes are not handed back to it.

Redis going away takes nothing down: ``publish`` raises (or its future fails
with) ``BackplaneUnavailableError`` (the sender is told ``unavailable``), local
connections stay open, and a supervisor reconnects with backoff and subscribes
again to exactly what is wanted then. Each change of state is logged once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, Final

import orjson
import redis.asyncio as redis
from redis.exceptions import NoScriptError, RedisError

from . import protocol
from .protocol import Kind, Position

log = logging.getLogger(__name__)

BROADCAST: Final = "all"
CONTROL: Final = "ctl"  # the operator's changes (DESIGN 5.3), heard by every node
BACKOFF_MIN: Final = 0.1
BACKOFF_MAX: Final = 5.0
SYNC_TIMEOUT: Final = 2.0
IDLE_PING: Final = 5.0
PIPELINE_MAX: Final = 1000  # messages per round trip to Redis
POOL_MAX: Final = 50  # connections for publishing, joins and presence updates ...
QUERY_POOL_MAX: Final = 4  # ... and for users' presence requests
MAX_WAITING: Final = 100_000  # messages queued for Redis before senders are told unavailable
META_TTL: Final = 30 * 86400  # seconds a stream's epoch and offset outlive its last message
STOP_TIMEOUT: Final = 5.0  # seconds close() waits for each task and connection pool
HEARTBEAT: Final = 5.0  # seconds between a node's presence refreshes (and reaps)
PRESENCE_TTL: Final = 15.0  # seconds a node vouches for its users' presence at a time
REAP_MAX: Final = 500  # users reaped per script call ...
REAP_CALLS: Final = 20  # ... and calls per heartbeat, while there are more


class _Script:
    """A Lua script run by its SHA (loaded again when Redis has forgotten it)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()


_PUBLISH: Final = _Script("""
-- KEYS: meta, history. ARGV: channel, head, tail, size, ttl, meta ttl, node
local now = redis.call('TIME')
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  redis.call('DEL', KEYS[2])
  local run = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)')
  redis.call('HSET', KEYS[1], 'e', ARGV[7] .. now[1] .. now[2], 'r', run)
end
local offset = redis.call('HINCRBY', KEYS[1], 'o', 1)
local frame = ARGV[2] .. ',"offset":' .. offset .. ARGV[3]
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[4], offset .. '-0', 't', now[1], 'd', frame)
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('PUBLISH', ARGV[1], frame)
return offset
""")

_POSITIONS: Final = _Script("""
-- KEYS: meta and history of each stream. ARGV: node, meta ttl, ttl, size, most bytes to
-- return in all, then for each stream the epoch seen ('' if none) and the offset seen.
-- Returns for each stream {epoch, offset} and, if it was seen, a flag (1: recovered) and
-- the messages after that offset.
-- An epoch belongs to one run of Redis: a Redis restarted from an older snapshot (or a
-- promoted replica) may have lost messages, so its streams get new epochs here.
local now = redis.call('TIME')
local run = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)')
local budget = tonumber(ARGV[5])
local found = {}
for s = 1, #KEYS / 2 do
  local meta, history = KEYS[2 * s - 1], KEYS[2 * s]
  local seen_epoch, seen = ARGV[4 + 2 * s], tonumber(ARGV[5 + 2 * s])
  local epoch = redis.call('HGET', meta, 'e')
  if not epoch or redis.call('HGET', meta, 'r') ~= run then
    epoch = ARGV[1] .. now[1] .. now[2]
    redis.call('DEL', history)
    redis.call('HSET', meta, 'e', epoch, 'r', run)
  end
  redis.call('EXPIRE', meta, ARGV[2])
  local top = tonumber(redis.call('HGET', meta, 'o') or '0')
  local answer = {epoch, top}
  if seen_epoch ~= '' then
    answer[3] = 0
    if seen_epoch == epoch and seen == top then
      answer[3] = 1
    elseif seen_epoch == epoch and seen < top then
      local entries = redis.call('XRANGE', history, tostring(seen + 1), '+', 'COUNT', ARGV[4])
      if #entries > 0 and tonumber(string.match(entries[1][1], '^(%d+)')) == seen + 1
         and tonumber(entries[1][2][2]) >= tonumber(now[1]) - tonumber(ARGV[3]) then
        local size = 0
        for i = 1, #entries do size = size + #entries[i][2][4] end
        if size <= budget then
          budget = budget - size
          answer[3] = 1
          for i = 1, #entries do answer[i + 3] = entries[i][2][4] end
        end
      end
    end
  end
  found[s] = answer
end
return found
""")

_HERE: Final = _Script("""
-- KEYS: pu, pall, pi, then pg of each group. ARGV: node, ttl, user, info, online events
-- (channel, frame, ...). This node vouches for the user; if no node did, they are online.
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1e6
local until_ = t + tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', t)
local first = redis.call('ZCARD', KEYS[1]) == 0
redis.call('ZADD', KEYS[1], until_, ARGV[1])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2])) + 1)
redis.call('ZADD', KEYS[2], 'GT', until_, ARGV[3])
for i = 4, #KEYS do redis.call('ZADD', KEYS[i], 'GT', until_, ARGV[3]) end
if first then
  redis.call('SET', KEYS[3], ARGV[4])
  for i = 5, #ARGV, 2 do redis.call('PUBLISH', ARGV[i], ARGV[i + 1]) end
  return 1
end
redis.call('SET', KEYS[3], ARGV[4])
return 0
""")

_OFFLINE: Final = """
local function offline(pi, pall, user)
  local info = redis.call('GET', pi)
  if info then
    info = cjson.decode(info)
    for _, key in ipairs(info.g) do redis.call('ZREM', key, user) end
    for _, event in ipairs(info.e) do redis.call('PUBLISH', event[1], event[2]) end
    redis.call('DEL', pi)
  end
  redis.call('ZREM', pall, user)
end
"""

_GONE: Final = _Script(
    _OFFLINE
    + """
-- KEYS: pu, pall, pi. ARGV: node, user. This node no longer vouches for the user.
local now = redis.call('TIME')
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(now[1]) + tonumber(now[2]) / 1e6)
if redis.call('ZCARD', KEYS[1]) == 0 then
  offline(KEYS[3], KEYS[2], ARGV[2])
  return 1
end
return 0
"""
)

_REAP: Final = _Script(
    _OFFLINE
    + """
-- KEYS: pall. ARGV: key prefix, most users to look at.
-- Users no node vouches for any longer (their nodes died) go offline.
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1e6
local stale = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', t, 'LIMIT', 0, tonumber(ARGV[2]))
for _, user in ipairs(stale) do
  local pu = ARGV[1] .. 'pu:' .. string.lower(user)
  redis.call('ZREMRANGEBYSCORE', pu, '-inf', t)
  local last = redis.call('ZRANGE', pu, -1, -1, 'WITHSCORES')
  if #last == 0 then
    offline(ARGV[1] .. 'pi:' .. string.lower(user), KEYS[1], user)
  else
    redis.call('ZADD', KEYS[1], last[2], user)
  end
end
return #stale
"""
)

_ONLINE: Final = _Script("""
-- KEYS: pg. ARGV: most names. Returns the count, then up to that many names.
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1e6
local count = redis.call('ZCOUNT', KEYS[1], t, '+inf')
local names = redis.call('ZRANGEBYSCORE', KEYS[1], t, '+inf', 'LIMIT', 0, tonumber(ARGV[1]))
table.insert(names, 1, count)
return names
""")

_COUNT_FAILURE: Final = _Script("""
-- KEYS: the throttle's keys (sorted sets of attempts scored by time). ARGV: now, window,
-- attempt, then each key's limit. Counts the attempt under every key, unless one has its
-- limit already: then returns the seconds until it has not (as a string), counting nothing.
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local wait = 0
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  local limit = tonumber(ARGV[3 + i])
  local count = redis.call('ZCARD', key)
  if count >= limit then
    local oldest = redis.call('ZRANGE', key, count - limit, count - limit, 'WITHSCORES')
    wait = math.max(wait, tonumber(oldest[2]) + window - now)
  end
end
if wait > 0 then return tostring(wait) end
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, now, ARGV[3])
  redis.call('PEXPIRE', key, math.ceil(window * 1000))
end
return '0'
""")

_SCRIPTS: Final = (_PUBLISH, _POSITIONS, _HERE, _GONE, _REAP, _ONLINE, _COUNT_FAILURE)


@dataclasses.dataclass(frozen=True, slots=True)
class Presence:
    """What a node tells Redis of a present user: their groups, and the ``online`` and
    ``offline`` events (channel, frame) for the groups small enough to be told."""

    groups: tuple[str, ...]
    online: tuple[tuple[str, str], ...]
    offline: tuple[tuple[str, str], ...]


class BackplaneUnavailableError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(f"the backplane is unavailable ({reason}), try again")
        self.reason = reason


OnMessage = Callable[[Kind, str, str], Awaitable[None] | None]
"""Takes (kind, target, encoded event) for what arrives from any node."""
OnControl = Callable[[dict[str, Any]], None]
"""Takes another node's control change (``control()``)."""


def _channel(kind: Kind, target: str) -> str:
    if kind is Kind.GROUP:
        return "g:" + target
    if kind is Kind.DIRECT:
        return "u:" + target.lower()
    return BROADCAST


def _route(channel: str) -> tuple[Kind, str]:
    if channel == BROADCAST:
        return Kind.BROADCAST, ""
    prefix, _, name = channel.partition(":")
    return (Kind.GROUP if prefix == "g" else Kind.DIRECT), name


class Backplane:
    """One publisher pool and one subscriber connection to Redis."""

    def __init__(
        self, url: str, prefix: str, *, history_size: int = 0, history_ttl: float = 0
    ) -> None:
        self._prefix = prefix
        self.history = history_size > 0 and history_ttl > 0
        self._history_size = history_size
        self._history_ttl = max(1, round(history_ttl))
        self.node = secrets.token_hex(4)  # this process, in presence and new epochs
        self._present: dict[str, Presence] = {}  # users this node vouches for
        self._presence_ops: collections.deque[tuple[str, Presence | None]] = collections.deque()
        self._presence_wake = asyncio.Event()
        self._presence_drops: list[tuple[str, str]] = []  # (group key, user) to remove now
        self._presence_task: asyncio.Task[None] | None = None
        self._on_message: OnMessage | None = None
        # Connections are bounded, and a command waits (up to SYNC_TIMEOUT) for a free
        # one rather than failing: publishing, joins and heartbeats share this pool;
        # users' presence requests get a small one of their own, so that no number of
        # them can take the connections the others need.
        self._client: Any = _client(url, POOL_MAX)
        self._queries: Any = _client(url, QUERY_POOL_MAX)
        self._on_control: OnControl | None = None
        self._wanted: set[str] = {BROADCAST, CONTROL}
        self._subscribed: set[str] = set()
        self._changed = asyncio.Event()
        self._confirmed: set[str] = set()  # channels Redis said it subscribed us to
        self._confirmation = asyncio.Event()  # set (and replaced) on each confirmation
        self._connected_before = False
        self._on_missed: Callable[[], None] | None = None
        self._sending_gone: list[str] = []  # departures in the presence task's pipeline
        self._task: asyncio.Task[None] | None = None
        self._pubsub: Any = None
        self._closing = False
        # (channel, stream or None, head, tail, done): the stream when history is on
        self._outgoing: collections.deque[
            tuple[str, str | None, str, str, asyncio.Future[None]]
        ] = collections.deque()
        self._controls: collections.deque[
            tuple[str, str | None, str, str, asyncio.Future[None]]
        ] = collections.deque()  # control changes, sent before any queued message
        self._publisher_waiter: asyncio.Future[None] | None = None
        self._publisher: asyncio.Task[None] | None = None
        self.healthy = False
        self.reason = "not connected yet"

    # What the hub calls (plain defs: nothing here waits on Redis)

    def want(self, kind: Kind, target: str) -> None:
        """Hear this group's or user's messages (the hub has a local connection for it)."""
        channel = _channel(kind, target)
        if channel not in self._wanted:
            self._wanted.add(channel)
            self._changed.set()

    def unwant(self, kind: Kind, target: str) -> None:
        """No local connection is left for this group or user."""
        channel = _channel(kind, target)
        if channel not in (BROADCAST, CONTROL) and channel in self._wanted:
            self._wanted.discard(channel)
            self._changed.set()

    async def subscribed(self, wanted: list[tuple[Kind, str]]) -> bool:
        """Wait (up to SYNC_TIMEOUT) until Redis has confirmed that this node hears these
        groups' and users' channels (and everyone's); False if it has not by then."""
        channels = {BROADCAST, CONTROL, *(_channel(kind, target) for kind, target in wanted)}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SYNC_TIMEOUT
        while not channels <= self._confirmed:
            left = deadline - loop.time()
            if left <= 0 or not self.healthy:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._confirmation.wait(), left)
        return True

    def make_room(self, count: int) -> None:
        """Check that ``count`` messages can be queued now (so a batch goes all or none).

        Raises:
            BackplaneUnavailableError: Redis cannot be reached now, or too much waits.
        """
        if not self.healthy:
            raise BackplaneUnavailableError(self.reason)
        if len(self._outgoing) + count > MAX_WAITING:
            raise BackplaneUnavailableError(f"{MAX_WAITING} messages already wait for Redis")

    def publish(self, kind: Kind, target: str, head: str, tail: str) -> asyncio.Future[None]:
        """Queue one encoded message (``protocol.message_parts``) for every node; with
        history on, Redis gives it its offset and keeps it. The future settles once Redis
        has it.

        Messages leave in the order queued, pipelined many to a round trip, so a
        sender need not wait for one before queueing the next.

        Raises:
            BackplaneUnavailableError: Redis cannot be reached now, or too much waits.
        """
        self.make_room(1)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        stream = protocol.stream_of(kind, target) if self.history else None
        self._outgoing.append((self._prefix + _channel(kind, target), stream, head, tail, done))
        self._wake_publisher()
        return done

    def control(self, change: dict[str, Any]) -> asyncio.Future[None]:
        """Tell every other node of an operator's change (a JSON-able dict); the future
        settles once Redis has it.

        Raises:
            BackplaneUnavailableError: Redis cannot be reached now, or too much waits.
        """
        if not self.healthy:  # but never "too much waits": changes go ahead of messages
            raise BackplaneUnavailableError(self.reason)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        frame = orjson.dumps({**change, "node": self.node}).decode()
        self._controls.append((self._prefix + CONTROL, None, frame, "", done))
        self._wake_publisher()
        return done

    def _wake_publisher(self) -> None:
        waiter = self._publisher_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _publish_loop(self) -> None:
        """Send queued messages in pipelines, in order; fail them if Redis fails."""
        loop = asyncio.get_running_loop()
        outgoing, controls = self._outgoing, self._controls
        while True:
            if not outgoing and not controls:
                self._publisher_waiter = loop.create_future()
                try:
                    await self._publisher_waiter
                finally:
                    self._publisher_waiter = None
                continue
            batch = [controls.popleft() for _ in range(min(len(controls), PIPELINE_MAX))]
            room = PIPELINE_MAX - len(batch)
            batch += [outgoing.popleft() for _ in range(min(len(outgoing), room))]
            try:
                results = await self._pipeline(self._publish_commands(batch), each=True)
            except (RedisError, OSError) as exc:
                # Health is the subscriber's to judge (it reconnects); these messages failed.
                _fail(batch, BackplaneUnavailableError(_describe(exc)))
                continue
            except BaseException:  # cancelled (closing) mid-pipeline: answer every sender
                _fail(batch, BackplaneUnavailableError("shutting down"))
                raise
            for (*_, done), result in zip(batch, results, strict=True):
                if done.done():
                    continue
                if isinstance(result, Exception):  # this one only (out of memory, say)
                    done.set_exception(BackplaneUnavailableError(_describe(result)))
                else:
                    done.set_result(None)

    def _publish_commands(
        self, batch: list[tuple[str, str | None, str, str, asyncio.Future[None]]]
    ) -> list[tuple[Any, ...]]:
        prefix = self._prefix
        size, ttl, meta_ttl, node = self._history_size, self._history_ttl, META_TTL, self.node
        commands: list[tuple[Any, ...]] = []
        for channel, stream, head, tail, _ in batch:
            if stream is None:
                commands.append(("PUBLISH", channel, head + tail))
            else:
                keys = (prefix + "s:" + stream, prefix + "h:" + stream)
                args = (channel, head, tail, size, ttl, meta_ttl, node)
                commands.append((_PUBLISH, *keys, *args))
        return commands

    async def _pipeline(
        self, commands: list[tuple[Any, ...]], each: bool = False, client: Any = None
    ) -> list[Any]:
        """Run commands in one round trip (``_add_command`` says how they are written).
        Scripts Redis has forgotten (it restarted) are loaded and those commands run
        again, in order.

        Returns:
            Each command's reply; with ``each``, a command's error reply in its place.

        Raises:
            RedisError, OSError: Redis failed; without ``each``, the first error reply.
        """
        client = self._client if client is None else client
        pipe = client.pipeline(transaction=False)
        for command in commands:
            _add_command(pipe, command)
        results = await pipe.execute(raise_on_error=False)
        if any(isinstance(result, NoScriptError) for result in results):
            for script in _SCRIPTS:
                await client.script_load(script.source)
            again = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
            pipe = client.pipeline(transaction=False)
            for i in again:
                _add_command(pipe, commands[i])
            for i, result in zip(again, await pipe.execute(raise_on_error=False), strict=True):
                results[i] = result
        for result in results:
            if isinstance(result, Exception) and not each:
                raise result
        return list(results)

    # Login failures (DESIGN 8): the throttle's counts, shared by every node

    async def count_failure(
        self, limits: dict[str, int], window: float, now: float, attempt: str
    ) -> float:
        """As ``Store.count_failure``, in Redis (``<prefix>lf:<key>``).

        Raises:
            BackplaneUnavailableError: Redis cannot be reached now.
        """
        keys = [self._prefix + "lf:" + key for key in limits]
        command = (_COUNT_FAILURE, len(keys), *keys, repr(now), repr(window), attempt)
        try:
            (wait,) = await self._pipeline([(*command, *limits.values())], client=self._queries)
        except (RedisError, OSError) as exc:
            raise BackplaneUnavailableError(_describe(exc)) from None
        return float(wait)

    async def forgive_failure(self, keys: list[str], attempt: str, clear: list[str]) -> None:
        """As ``Store.forgive_failure``, in Redis.

        Raises:
            BackplaneUnavailableError: Redis cannot be reached now.
        """
        prefix = self._prefix + "lf:"
        commands: list[tuple[Any, ...]] = [("ZREM", prefix + key, attempt) for key in keys]
        if clear:
            commands.append(("DEL", *(prefix + key for key in clear)))
        try:
            await self._pipeline(commands, client=self._queries)
        except (RedisError, OSError) as exc:
            raise BackplaneUnavailableError(_describe(exc)) from None

    # History (DESIGN 5.1)

    async def positions(
        self, streams: list[str], seen: dict[str, Position], budget: int
    ) -> dict[str, tuple[Position, list[str] | None]]:
        """Where each stream stands and, for those in ``seen``, the messages after that
        position (None: not recoverable: another epoch, history that does not reach
        back, or more than ``budget`` bytes of it). One round trip, each stream read in
        one atomic step.

        Raises:
            BackplaneUnavailableError: Redis cannot be reached now.
        """
        if not self.healthy:
            raise BackplaneUnavailableError(self.reason)
        prefix = self._prefix
        keys: list[str] = []
        args: list[Any] = [self.node, META_TTL, self._history_ttl, self._history_size, budget]
        for stream in streams:
            keys += (prefix + "s:" + stream, prefix + "h:" + stream)
            was = seen.get(stream)
            args += ("", 0) if was is None else (was.epoch, was.offset)
        try:
            (results,) = await self._pipeline([(_POSITIONS, len(keys), *keys, *args)])
        except (RedisError, OSError) as exc:
            raise BackplaneUnavailableError(_describe(exc)) from None
        found: dict[str, tuple[Position, list[str] | None]] = {}
        for stream, result in zip(streams, results, strict=True):
            where = Position(result[0].decode(), int(result[1]))
            replay = None
            if len(result) > 2 and result[2] == 1:
                replay = [frame.decode() for frame in result[3:]]
            found[stream] = (where, replay)
        return found

    # Presence (DESIGN 5.2)

    def arrive(self, user: str, groups: tuple[str, ...], announce: tuple[str, ...]) -> None:
        """This node has its first connection of ``user``, who is in ``groups``: vouch for
        them (in order with ``depart``, by the presence task). The groups in ``announce``
        are told when the user comes online and goes offline (on whichever node)."""
        prefix = self._prefix
        presence = self._present[user] = Presence(
            groups,
            tuple(
                (prefix + _channel(Kind.GROUP, g), protocol.arrival("online", user, g))
                for g in announce
            ),
            tuple(
                (prefix + _channel(Kind.GROUP, g), protocol.arrival("offline", user, g))
                for g in announce
            ),
        )
        self._presence_ops.append((user, presence))
        self._presence_wake.set()

    def regroup(self, user: str, groups: tuple[str, ...], left: tuple[str, ...] = ()) -> None:
        """A user present here is now in these groups (an operator changed them), and no
        longer in ``left``: vouch for them in these groups' presence from now on, drop
        them from the others' at once, and tell those no more of their comings and goings."""
        presence = self._present.get(user)
        if presence is None:
            return
        prefix = self._prefix
        gone = {prefix + _channel(Kind.GROUP, group) for group in left}
        presence = self._present[user] = Presence(
            groups,
            tuple(event for event in presence.online if event[0] not in gone),
            tuple(event for event in presence.offline if event[0] not in gone),
        )
        self._presence_drops += [(prefix + "pg:" + group, user) for group in left]
        self._presence_ops.append((user, presence))
        self._presence_wake.set()

    def depart(self, user: str) -> None:
        """This node's last connection of ``user`` is gone."""
        self._present.pop(user, None)
        self._presence_ops.append((user, None))
        self._presence_wake.set()

    async def online(self, group: str, limit: int) -> tuple[list[str], int]:
        """The group's online users (at most ``limit`` names) and their exact count.

        Raises:
            BackplaneUnavailableError: Redis cannot be reached now.
        """
        if not self.healthy:
            raise BackplaneUnavailableError(self.reason)
        try:
            (result,) = await self._pipeline(
                [(_ONLINE, 1, self._prefix + "pg:" + group, limit)], client=self._queries
            )
        except (RedisError, OSError) as exc:
            raise BackplaneUnavailableError(_describe(exc)) from None
        return sorted(name.decode() for name in result[1:]), int(result[0])

    async def present(self, kind: Kind, target: str) -> bool:
        """Whether some node vouches for someone in this group (or for this user).

        Raises:
            BackplaneUnavailableError: Redis cannot be reached now.
        """
        if not self.healthy:
            raise BackplaneUnavailableError(self.reason)
        key = "pg:" + target if kind is Kind.GROUP else "pu:" + target.lower()
        try:
            (found,) = await self._pipeline([("EXISTS", self._prefix + key)], client=self._queries)
        except (RedisError, OSError) as exc:
            raise BackplaneUnavailableError(_describe(exc)) from None
        return bool(found)

    def _here(self, user: str, presence: Presence) -> tuple[Any, ...]:
        prefix = self._prefix
        info = orjson.dumps(
            {"g": [prefix + "pg:" + group for group in presence.groups], "e": presence.offline}
        )
        keys = [prefix + "pu:" + user.lower(), prefix + "pall", prefix + "pi:" + user.lower()]
        keys += [prefix + "pg:" + group for group in presence.groups]
        events = [part for event in presence.online for part in event]
        return (_HERE, len(keys), *keys, self.node, PRESENCE_TTL, user, info, *events)

    def _gone(self, user: str) -> tuple[Any, ...]:
        prefix = self._prefix
        keys = (prefix + "pu:" + user.lower(), prefix + "pall", prefix + "pi:" + user.lower())
        return (_GONE, len(keys), *keys, self.node, user)

    async def _presence(self) -> None:
        """Say who arrives and departs, in order; every HEARTBEAT, vouch again for everyone
        present here and reap the users of nodes that died."""
        loop = asyncio.get_running_loop()
        ops = self._presence_ops
        next_beat = loop.time()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_beat - loop.time())):
                    await self._presence_wake.wait()
            self._presence_wake.clear()
            commands: list[tuple[Any, ...]] = [("ZREM", *drop) for drop in self._presence_drops]
            self._presence_drops = []
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
                    await self._pipeline(commands[start : start + PIPELINE_MAX])
                for _ in range(REAP_CALLS if beat else 0):
                    reap = (_REAP, 1, self._prefix + "pall", self._prefix, REAP_MAX)
                    if (await self._pipeline([reap]))[0] < REAP_MAX:
                        break
            except (RedisError, OSError) as exc:
                # The next heartbeat says again who is here; a departure said meanwhile
                # is lost, and expires with its TTL.
                log.debug("presence update failed: %s", _describe(exc))
            self._sending_gone = []

    # Life cycle

    def start(
        self,
        on_message: OnMessage,
        on_missed: Callable[[], None] | None = None,
        on_control: OnControl | None = None,
    ) -> None:
        """Connect and subscribe; hand every message that arrives to ``on_message``, and
        every other node's control change to ``on_control``.

        ``on_missed`` is called when the node is subscribed again after losing Redis: what
        was published meanwhile never reached this node's connections."""
        self._on_message = on_message
        self._on_missed = on_missed
        self._on_control = on_control
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._supervise(), name="wsfanout-backplane")
        self._publisher = loop.create_task(self._publish_loop(), name="wsfanout-publisher")
        self._presence_task = loop.create_task(self._presence(), name="wsfanout-presence")

    async def close(self) -> None:
        self._closing = True
        publisher, self._publisher = self._publisher, None
        await _stop(publisher)
        for queue in (self._controls, self._outgoing):
            _fail(list(queue), BackplaneUnavailableError("shutting down"))
            queue.clear()
        presence, self._presence_task = self._presence_task, None
        if presence is not None:
            await _stop(presence)
            # Say goodbye for everyone who left and whose departure was not said yet, and for
            # everyone still here, so they go offline now, not in PRESENCE_TTL.
            leaving = [*self._sending_gone]
            leaving += [user for user, arrived in self._presence_ops if arrived is None]
            leaving += [user for user in self._present if user not in leaving]
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(2):
                    await self._pipeline([self._gone(user) for user in leaving])
            self._present.clear()
            self._presence_ops.clear()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # redis-py can swallow a cancellation inside a read; closing the
            # connection ends that read, and the loops check ``_closing``.
            _, pending = await asyncio.wait({task}, timeout=0.5)
            if pending and self._pubsub is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(STOP_TIMEOUT):
                        await self._pubsub.aclose()
            await _stop(task)
        for client in (self._client, self._queries):
            with contextlib.suppress(Exception):
                async with asyncio.timeout(STOP_TIMEOUT):
                    await client.aclose()

    async def check(self) -> None:
        """Raise if Redis does not answer a PING (for /healthz)."""
        if not self.healthy:
            raise BackplaneUnavailableError(self.reason)
        try:
            await asyncio.wait_for(self._client.ping(), 2)
        except (RedisError, OSError, TimeoutError) as exc:
            raise BackplaneUnavailableError(_describe(exc)) from None

    # The subscriber side

    async def _supervise(self) -> None:
        backoff = BACKOFF_MIN
        while not self._closing:
            pubsub = self._pubsub = self._client.pubsub()
            try:
                if self._connected_before:
                    # The pooled connections may be dead sockets to a Redis that restarted:
                    # open new ones, so the first command after this one does not fail.
                    # (Nothing is retried: a script might have run before its reply was lost.)
                    await self._client.connection_pool.disconnect()
                    await self._queries.connection_pool.disconnect()
                await self._subscribe(pubsub, set(self._wanted), set())
                self._up()
                if self._connected_before and self._on_missed is not None:
                    self._on_missed()
                self._connected_before = True
                backoff = BACKOFF_MIN
                listen = asyncio.create_task(self._listen(pubsub))
                manage = asyncio.create_task(self._manage(pubsub))
                try:
                    done, _ = await asyncio.wait(
                        (listen, manage), return_when=asyncio.FIRST_COMPLETED
                    )
                    for task in done:
                        task.result()  # re-raise what ended it
                finally:
                    listen.cancel()
                    manage.cancel()
                    await asyncio.gather(listen, manage, return_exceptions=True)
            except (RedisError, OSError) as exc:
                self._down(exc)
            finally:
                self._subscribed = set()
                self._confirmed = set()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(backoff)
            backoff = min(BACKOFF_MAX, backoff * 2)

    async def _subscribe(self, pubsub: Any, add: set[str], remove: set[str]) -> None:
        if add:
            await pubsub.subscribe(*(self._prefix + channel for channel in sorted(add)))
            self._subscribed |= add
        if remove:
            self._confirmed -= remove
            await pubsub.unsubscribe(*(self._prefix + channel for channel in sorted(remove)))
            self._subscribed -= remove

    async def _manage(self, pubsub: Any) -> None:
        """Apply changes to the wanted set, many at a time."""
        while True:
            wanted = set(self._wanted)
            add, remove = wanted - self._subscribed, self._subscribed - wanted
            if add or remove:
                await self._subscribe(pubsub, add, remove)
                continue
            self._changed.clear()
            await self._changed.wait()

    async def _listen(self, pubsub: Any) -> None:
        prefix_length = len(self._prefix)
        deliver = self._on_message
        assert deliver is not None
        while not self._closing:
            message = await pubsub.get_message(timeout=IDLE_PING)
            if message is None:
                await pubsub.ping()  # quiet for a while: make sure the connection is alive
                continue
            # Deliver everything already received before letting the flusher run, so
            # a burst arriving from Redis leaves as batches too.
            while message is not None:
                kind = message.get("type")
                if kind == "message":
                    channel = message["channel"].decode()[prefix_length:]
                    if channel == CONTROL:
                        self._controlled(message["data"])
                        message = await pubsub.get_message(timeout=0)
                        continue
                    try:
                        waiting = deliver(*_route(channel), message["data"].decode())
                        if waiting is not None:  # a recipient's outbox is full: paced
                            await waiting
                    except Exception:
                        log.exception("delivering a message from channel %r failed", channel)
                elif kind == "subscribe":  # from now on, Redis sends us this channel
                    self._confirmed.add(message["channel"].decode()[prefix_length:])
                    self._confirmation.set()
                    self._confirmation = asyncio.Event()
                message = await pubsub.get_message(timeout=0)

    def _controlled(self, data: bytes) -> None:
        """Hand another node's control change on (a bad one is logged, never raised)."""
        try:
            change = orjson.loads(data)
            if not isinstance(change, dict):
                raise TypeError("not an object")
            if change.get("node") != self.node and self._on_control is not None:
                self._on_control(change)
        except Exception:
            log.exception("handling a control change %.200r failed", data)

    def _up(self) -> None:
        if not self.healthy:
            log.info("backplane connected: subscribed to %d channels", len(self._subscribed))
        self.healthy = True
        self.reason = "ok"

    def _down(self, exc: BaseException) -> None:
        reason = _describe(exc)
        if self.healthy or self.reason != reason:
            log.warning("backplane unavailable (%s); reconnecting with backoff", reason)
        self.healthy = False
        self.reason = reason


def _client(url: str, connections: int) -> Any:
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=connections,
        timeout=SYNC_TIMEOUT,  # waiting for a free connection
        socket_connect_timeout=2,
        socket_timeout=5,
        retry_on_timeout=False,
    )
    return redis.Redis.from_pool(pool)


async def _stop(task: asyncio.Task[None] | None) -> None:
    """Cancel a task and wait until it ends, cancelling it again every 0.1 s, for up to
    STOP_TIMEOUT: redis-py can swallow a cancellation that lands inside a read (it becomes
    a timeout, or a retry), and a task that missed it would keep ``close()`` waiting for
    ever."""
    if task is None:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STOP_TIMEOUT
    while not task.done():
        if loop.time() > deadline:
            log.warning("%s did not stop within %g s; left behind", task.get_name(), STOP_TIMEOUT)
            return
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    if not task.cancelled():
        task.exception()  # retrieved: a failure there was the loop's to log, not asyncio's


def _fail(batch: list[tuple[Any, ...]], failure: Exception) -> None:
    for *_, done in batch:
        if not done.done():
            done.set_exception(failure)


def _add_command(pipe: Any, command: tuple[Any, ...]) -> None:
    """Queue one command: plain, or ``(_Script, *keys, *args)`` with two keys, or
    ``(_Script, number of keys, *keys, *args)``."""
    head = command[0]
    if isinstance(head, _Script):
        if isinstance(command[1], int):
            pipe.evalsha(head.sha, command[1], *command[2:])
        else:
            pipe.evalsha(head.sha, 2, *command[1:])
    else:
        pipe.execute_command(*command)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
