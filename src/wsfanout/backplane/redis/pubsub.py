"""Redis pub/sub between nodes, and the operator's changes (DESIGN 5.3). Knows no hub.

Theory of operation. Every publish from any node goes to Redis once, already encoded, on one
channel: ``<prefix>all`` for broadcasts, ``<prefix>g:<group>`` for a group,
``<prefix>u:<username>`` for a user's connections. Channel names are this module's alone:
callers speak of a message's kind and target. Every node (including the sender's) receives
it on its one subscriber connection and hands ``(kind, target, frame)`` to ``on_message``,
which fans it out locally. Redis keeps the order of messages on a subscriber connection, and
messages leave this node in the order queued (pipelined, many to a round trip: a sender
need not wait for one before queueing the next), so each sender's messages reach each
recipient in order. With history on, a message is published by ``positions.py``'s script,
which gives it its offset; so is a message with an idempotency key, which that script drops
if its stream had the key (``duplicates`` counts them).

A node is subscribed to ``all`` always, and to a group's or user's channel only while it
wants it (``want``/``unwant``, which the hub calls when a group or user gets its first or
loses its last local connection). The wanted set is applied by one task, so a burst of
connections becomes one SUBSCRIBE.

Control. Every node also hears ``<prefix>ctl``: ``control()`` publishes a change made by the
operator (a revocation, a membership) as a small JSON object, ahead of any queued message,
and every other node hands it to ``on_control``; a node's own changes are not handed back.

Keeping up. The listener hands every message on without awaiting anything (what a node's
connections cannot take yet waits in the hub's bounded backlog): a subscriber that stops
reading is dropped by Redis once its output buffer passes ``client-output-buffer-limit
pubsub``, and its node misses what came meanwhile. A node can still fall behind by itself
(its CPU is starved). To know, while messages flow it sends itself a tick every ``TICK``
seconds on a channel only it hears (``<prefix>n:<node>``): the tick comes back behind all
that Redis holds for this node, so its round trip is how far behind the node is, on one
clock. Past ``BEHIND`` seconds the node says so on ``ctl`` (``{"op": "behind"}``, at most
that often), and for ``BEHIND_HOLD`` seconds every node refuses backends' batches
(``make_room``: the API answers 503 with Retry-After, RabbitMQ requeues) rather than take
messages that would be lost when Redis drops the subscriber. Users' own messages are still
taken.

Redis going away takes nothing down: ``publish`` raises (or its future fails with)
``BackplaneUnavailableError`` (the sender is told ``unavailable``), local connections stay
open, and the supervisor reconnects with backoff and subscribes again to exactly what is
wanted then (and calls ``on_missed``: what was published meanwhile never came). Each change
of state is logged once (``Link.up`` / ``down``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Final

import orjson
from redis.exceptions import RedisError

from ... import protocol
from ...protocol import Kind
from ..base import BackplaneUnavailableError, OnControl, OnMessage
from .link import PIPELINE_MAX, STOP_TIMEOUT, SYNC_TIMEOUT, Link, describe, stop
from .positions import Positions

log = logging.getLogger(__name__)

BROADCAST: Final = "all"
CONTROL: Final = "ctl"  # the operator's changes (DESIGN 5.3), heard by every node
BACKOFF_MIN: Final = 0.1
BACKOFF_MAX: Final = 5.0
IDLE_PING: Final = 5.0
MAX_WAITING: Final = 100_000  # messages queued for Redis before senders are told unavailable
TICK: Final = 0.25  # seconds between the ticks a node sends itself while messages flow
BEHIND: Final = 0.5  # seconds a tick may take to come back before the node says it is behind
BEHIND_HOLD: Final = 2.0  # seconds every node refuses backends' batches after hearing it
LISTEN_TURN: Final = 0.02  # seconds the listener hands messages on before others may run
LISTEN_CHECK: Final = 32  # messages between looks at the clock

Outgoing = tuple[str, str | None, str, str, str | None, asyncio.Future[None]]
"""(channel, stream or None, head, tail, idempotency key or None, done): the stream when
history is on or the message has a key."""


def channel_of(kind: Kind, target: str) -> str:
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


class PubSub:
    """One publisher task pipelining what is queued, one subscriber connection."""

    def __init__(self, link: Link, positions: Positions, node: str) -> None:
        self._link = link
        self._positions = positions
        self._node = node
        self._on_message: OnMessage | None = None
        self._on_missed: Callable[[], None] | None = None
        self._on_control: OnControl | None = None
        self._own = "n:" + node  # this node's ticks (see Keeping up)
        self._wanted: set[str] = {BROADCAST, CONTROL, self._own}
        self._subscribed: set[str] = set()
        self._changed = asyncio.Event()
        self._confirmed: set[str] = set()  # channels Redis said it subscribed us to
        self._confirmation = asyncio.Event()  # set (and replaced) on each confirmation
        self._connected_before = False
        self._task: asyncio.Task[None] | None = None
        self._pubsub: Any = None
        self._closing = False
        self._outgoing: collections.deque[Outgoing] = collections.deque()
        self._controls: collections.deque[Outgoing] = collections.deque()  # sent first
        self._publisher_waiter: asyncio.Future[None] | None = None
        self._publisher: asyncio.Task[None] | None = None
        self._refuse_until = 0.0  # a node fell behind Redis: backends' batches wait till then
        self._said_behind = -BEHIND_HOLD  # when this node last said it fell behind
        self._tick_sent: float | None = None  # the tick on its way back, if any
        self._heard = 0  # messages the listener handled (ticks are sent only while they flow)
        self.duplicates = 0  # keyed messages Redis dropped: their stream had the key

    # What the hub calls (plain defs: nothing here waits on Redis)

    def want(self, kind: Kind, target: str) -> None:
        channel = channel_of(kind, target)
        if channel not in self._wanted:
            self._wanted.add(channel)
            self._changed.set()

    def unwant(self, kind: Kind, target: str) -> None:
        channel = channel_of(kind, target)
        if channel not in (BROADCAST, CONTROL, self._own) and channel in self._wanted:
            self._wanted.discard(channel)
            self._changed.set()

    async def subscribed(self, wanted: list[tuple[Kind, str]]) -> bool:
        """Wait (up to SYNC_TIMEOUT) until Redis has confirmed that this node hears these
        groups' and users' channels (and everyone's); False if it has not by then, or
        Redis is known to be away. A node that has just started waits for its first
        connection: clients resuming on it the moment it listens are not told they lost
        what Redis still holds."""
        channels = {BROADCAST, CONTROL, *(channel_of(kind, target) for kind, target in wanted)}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SYNC_TIMEOUT
        link = self._link
        while not channels <= self._confirmed:
            left = deadline - loop.time()
            if left <= 0 or not (link.healthy or link.starting):
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._confirmation.wait(), left)
        return True

    def make_room(self, count: int) -> None:
        """Check that a backend's batch of ``count`` messages can be queued now (so it goes
        all or none).

        Raises:
            BackplaneUnavailableError: Redis cannot be reached now, too much waits, or a
            node said it fell behind Redis (see Keeping up).
        """
        self._room(count)
        if asyncio.get_running_loop().time() < self._refuse_until:
            raise BackplaneUnavailableError("a node is behind Redis")

    def _room(self, count: int) -> None:
        self._link.check()
        if len(self._outgoing) + count > MAX_WAITING:
            raise BackplaneUnavailableError(f"{MAX_WAITING} messages already wait for Redis")

    def publish(
        self, kind: Kind, target: str, head: str, tail: str, key: str | None = None
    ) -> asyncio.Future[None]:
        """Queue one encoded message (``protocol.message_parts``) for every node; with
        history on, Redis gives it its offset and keeps it; with an idempotency ``key``
        its stream had lately, Redis drops it. The future settles once Redis has it (or
        has dropped it).

        Raises:
            BackplaneUnavailableError: Redis cannot be reached now, or too much waits.
        """
        self._room(1)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        stream = None
        if self._positions.enabled or key is not None:
            stream = protocol.stream_of(kind, target)
        channel = self._link.prefix + channel_of(kind, target)
        self._outgoing.append((channel, stream, head, tail, key, done))
        self._wake_publisher()
        return done

    def control(self, change: dict[str, Any]) -> asyncio.Future[None]:
        """Tell every other node of an operator's change (a JSON-able dict); the future
        settles once Redis has it.

        Raises:
            BackplaneUnavailableError: Redis cannot be reached now.
        """
        self._link.check()  # but never "too much waits": changes go ahead of messages
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        frame = orjson.dumps({**change, "node": self._node}).decode()
        self._controls.append((self._link.prefix + CONTROL, None, frame, "", None, done))
        self._wake_publisher()
        return done

    # The publisher side

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
                results = await self._link.pipeline(self._commands(batch), each=True)
            except (RedisError, OSError) as exc:
                # Health is the subscriber's to judge (it reconnects); these messages failed.
                _fail(batch, BackplaneUnavailableError(describe(exc)))
                continue
            except BaseException:  # cancelled (closing) mid-pipeline: answer every sender
                _fail(batch, BackplaneUnavailableError("shutting down"))
                raise
            for (*_, key, done), result in zip(batch, results, strict=True):
                if done.done():
                    continue
                if isinstance(result, Exception):  # this one only (out of memory, say)
                    done.set_exception(BackplaneUnavailableError(describe(result)))
                else:
                    if key is not None and result == 0:  # its stream had the key: dropped
                        self.duplicates += 1
                    done.set_result(None)

    def _commands(self, batch: list[Outgoing]) -> list[tuple[Any, ...]]:
        positions = self._positions
        return [
            ("PUBLISH", channel, head + tail)
            if stream is None
            else positions.publish(channel, stream, head, tail, key)
            for channel, stream, head, tail, key, _ in batch
        ]

    # Life cycle

    def start(
        self,
        on_message: OnMessage,
        on_missed: Callable[[], None] | None,
        on_control: OnControl | None,
    ) -> None:
        """Connect and subscribe; hand every message that arrives to ``on_message``, every
        other node's control change to ``on_control``; ``on_missed`` is called when the
        node is subscribed again after losing Redis."""
        self._on_message = on_message
        self._on_missed = on_missed
        self._on_control = on_control
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._supervise(), name="wsfanout-backplane")
        self._publisher = loop.create_task(self._publish_loop(), name="wsfanout-publisher")

    async def close_publisher(self) -> None:
        """Stop sending; what is still queued fails (its senders are told)."""
        self._closing = True
        publisher, self._publisher = self._publisher, None
        await stop(publisher)
        for queue in (self._controls, self._outgoing):
            _fail(list(queue), BackplaneUnavailableError("shutting down"))
            queue.clear()

    async def close_subscriber(self) -> None:
        self._closing = True
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
            await stop(task)

    # The subscriber side

    async def _supervise(self) -> None:
        link = self._link
        backoff = BACKOFF_MIN
        while not self._closing:
            pubsub = self._pubsub = link.client.pubsub()
            try:
                if self._connected_before:
                    await link.renew()
                await self._subscribe(pubsub, set(self._wanted), set())
                link.up(len(self._subscribed))
                if self._connected_before and self._on_missed is not None:
                    self._on_missed()
                self._connected_before = True
                backoff = BACKOFF_MIN
                self._tick_sent = None
                tasks = (
                    asyncio.create_task(self._listen(pubsub)),
                    asyncio.create_task(self._manage(pubsub)),
                    asyncio.create_task(self._tick()),
                )
                try:
                    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        task.result()  # re-raise what ended it
                finally:
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
            except (RedisError, OSError) as exc:
                link.down(exc)
            finally:
                self._subscribed = set()
                self._confirmed = set()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(backoff)
            backoff = min(BACKOFF_MAX, backoff * 2)

    async def _subscribe(self, pubsub: Any, add: set[str], remove: set[str]) -> None:
        prefix = self._link.prefix
        if add:
            await pubsub.subscribe(*(prefix + channel for channel in sorted(add)))
            self._subscribed |= add
        if remove:
            self._confirmed -= remove
            await pubsub.unsubscribe(*(prefix + channel for channel in sorted(remove)))
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
        loop = asyncio.get_running_loop()
        prefix_length = len(self._link.prefix)
        deliver = self._on_message
        assert deliver is not None
        while not self._closing:
            message = await pubsub.get_message(timeout=IDLE_PING)
            if message is None:
                await pubsub.ping()  # quiet for a while: make sure the connection is alive
                continue
            # Deliver what is already received before letting the flusher run, so a burst
            # arriving from Redis leaves as batches too; but a turn at a time, or a node
            # with a backlog in its socket would hold the loop (and its tick, and its
            # telling the other nodes it is behind) for seconds.
            turn_ends, handed = loop.time() + LISTEN_TURN, 0
            while message is not None:
                handed += 1
                if handed % LISTEN_CHECK == 0 and loop.time() > turn_ends:
                    await asyncio.sleep(0)
                    turn_ends = loop.time() + LISTEN_TURN
                kind = message.get("type")
                if kind == "message":
                    channel = message["channel"].decode()[prefix_length:]
                    if channel == CONTROL:
                        self._controlled(message["data"])
                    elif channel == self._own:
                        self._ticked()
                    else:
                        self._heard += 1
                        try:
                            # Never awaits: a subscriber that stops reading is dropped.
                            deliver(*_route(channel), message["data"].decode())
                        except Exception:
                            log.exception("delivering a message from channel %r failed", channel)
                elif kind == "subscribe":  # from now on, Redis sends us this channel
                    self._confirmed.add(message["channel"].decode()[prefix_length:])
                    self._confirmation.set()
                    self._confirmation = asyncio.Event()
                message = await pubsub.get_message(timeout=0)

    async def _tick(self) -> None:
        """While messages flow, send this node a tick every TICK seconds and see how long
        it takes to come back (see Keeping up); one at a time."""
        loop = asyncio.get_running_loop()
        channel = self._link.prefix + self._own
        heard = self._heard
        while True:
            await asyncio.sleep(TICK)
            now = loop.time()
            sent = self._tick_sent
            if sent is not None:
                if now - sent > BEHIND:  # not back yet
                    self._fell_behind(now - sent)
            elif self._heard != heard:
                heard = self._heard
                self._tick_sent = now
                try:
                    await self._link.client.publish(channel, b"")
                except (RedisError, OSError):
                    self._tick_sent = None  # Redis's health is the listener's to judge

    def _ticked(self) -> None:
        """This node's tick is back: it was that far behind Redis."""
        sent, self._tick_sent = self._tick_sent, None
        if sent is not None and (took := asyncio.get_running_loop().time() - sent) > BEHIND:
            self._fell_behind(took)

    def _fell_behind(self, seconds: float) -> None:
        """This node's subscriber is ``seconds`` behind Redis: refuse backends' batches
        here and tell every other node to (see Keeping up)."""
        now = asyncio.get_running_loop().time()
        if now - self._said_behind < BEHIND:
            return
        if now - self._said_behind > BEHIND_HOLD:  # once per spell, not every BEHIND
            log.warning(
                "this node is %.1f s behind Redis: backends' batches are refused on every "
                "node until it catches up",
                seconds,
            )
        self._said_behind = now
        self._refuse_until = now + BEHIND_HOLD
        with contextlib.suppress(BackplaneUnavailableError):
            self.control({"op": "behind"}).add_done_callback(_retrieved)

    def _controlled(self, data: bytes) -> None:
        """Hand another node's control change on (a bad one is logged, never raised); a
        node that fell behind makes this one refuse backends' batches for a while."""
        try:
            change = orjson.loads(data)
            if not isinstance(change, dict):
                raise TypeError("not an object")
            if change.get("op") == "behind":
                self._refuse_until = asyncio.get_running_loop().time() + BEHIND_HOLD
            elif change.get("node") != self._node and self._on_control is not None:
                self._on_control(change)
        except Exception:
            log.exception("handling a control change %.200r failed", data)


def _retrieved(done: asyncio.Future[None]) -> None:
    """A notice nobody awaits: its failure (Redis away) is the subscriber's to report."""
    if not done.cancelled():
        done.exception()


def _fail(batch: list[Outgoing], failure: Exception) -> None:
    for *_, done in batch:
        if not done.done():
            done.set_exception(failure)
