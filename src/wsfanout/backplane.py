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

Redis going away takes nothing down: ``publish`` raises (or its future fails
with) ``BackplaneUnavailableError`` (the sender is told ``unavailable``), local
connections stay open, and a supervisor reconnects with backoff and subscribes
again to exactly what is wanted then. Each change of state is logged once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

import redis.asyncio as redis
from redis.exceptions import RedisError

from .protocol import Kind

log = logging.getLogger(__name__)

BROADCAST: Final = "all"
BACKOFF_MIN: Final = 0.1
BACKOFF_MAX: Final = 5.0
SYNC_TIMEOUT: Final = 2.0
IDLE_PING: Final = 5.0
PIPELINE_MAX: Final = 1000  # messages per round trip to Redis
MAX_WAITING: Final = 100_000  # messages queued for Redis before senders are told unavailable


class BackplaneUnavailableError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(f"the backplane is unavailable ({reason}), try again")
        self.reason = reason


OnMessage = Callable[[Kind, str, str], Awaitable[None] | None]
"""Takes (kind, target, encoded event) for what arrives from any node."""


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

    def __init__(self, url: str, prefix: str) -> None:
        self._prefix = prefix
        self._on_message: OnMessage | None = None
        self._client: Any = redis.Redis.from_url(
            url, socket_connect_timeout=2, socket_timeout=5, retry_on_timeout=False
        )
        self._wanted: set[str] = {BROADCAST}
        self._subscribed: set[str] = set()
        self._changed = asyncio.Event()
        self._synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._pubsub: Any = None
        self._closing = False
        self._outgoing: collections.deque[tuple[str, str, asyncio.Future[None]]] = (
            collections.deque()
        )
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
            self._synced.clear()

    def unwant(self, kind: Kind, target: str) -> None:
        """No local connection is left for this group or user."""
        channel = _channel(kind, target)
        if channel != BROADCAST and channel in self._wanted:
            self._wanted.discard(channel)
            self._changed.set()

    async def synced(self) -> None:
        """Wait (briefly) until what is wanted has been subscribed to, when Redis is up."""
        if self.healthy and not self._synced.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._synced.wait(), SYNC_TIMEOUT)

    def make_room(self, count: int) -> None:
        """Check that ``count`` messages can be queued now (so a batch goes all or none).

        Raises:
            BackplaneUnavailableError: Redis cannot be reached now, or too much waits.
        """
        if not self.healthy:
            raise BackplaneUnavailableError(self.reason)
        if len(self._outgoing) + count > MAX_WAITING:
            raise BackplaneUnavailableError(f"{MAX_WAITING} messages already wait for Redis")

    def publish(self, kind: Kind, target: str, frame: str) -> asyncio.Future[None]:
        """Queue one encoded event for every node; the future settles once Redis has it.

        Messages leave in the order queued, pipelined many to a round trip, so a
        sender need not wait for one before queueing the next.

        Raises:
            BackplaneUnavailableError: Redis cannot be reached now, or too much waits.
        """
        self.make_room(1)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._outgoing.append((self._prefix + _channel(kind, target), frame, done))
        waiter = self._publisher_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return done

    async def _publish_loop(self) -> None:
        """Send queued messages in pipelines, in order; fail them if Redis fails."""
        loop = asyncio.get_running_loop()
        outgoing = self._outgoing
        while True:
            if not outgoing:
                self._publisher_waiter = loop.create_future()
                try:
                    await self._publisher_waiter
                finally:
                    self._publisher_waiter = None
                continue
            batch = [outgoing.popleft() for _ in range(min(len(outgoing), PIPELINE_MAX))]
            try:
                pipe = self._client.pipeline(transaction=False)
                for channel, frame, _ in batch:
                    pipe.publish(channel, frame)
                await pipe.execute()
            except (RedisError, OSError) as exc:
                # Health is the subscriber's to judge (it reconnects); these messages failed.
                _fail(batch, BackplaneUnavailableError(_describe(exc)))
                continue
            except BaseException:  # cancelled (closing) mid-pipeline: answer every sender
                _fail(batch, BackplaneUnavailableError("shutting down"))
                raise
            for _, _, done in batch:
                if not done.done():
                    done.set_result(None)

    # Life cycle

    def start(self, on_message: OnMessage) -> None:
        """Connect and subscribe; hand everything that arrives to ``on_message``."""
        self._on_message = on_message
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._supervise(), name="wsfanout-backplane")
        self._publisher = loop.create_task(self._publish_loop(), name="wsfanout-publisher")

    async def close(self) -> None:
        self._closing = True
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            publisher.cancel()
            await asyncio.gather(publisher, return_exceptions=True)
        _fail(list(self._outgoing), BackplaneUnavailableError("shutting down"))
        self._outgoing.clear()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # redis-py can swallow a cancellation inside a read; closing the
            # connection ends that read, and the loops check ``_closing``.
            _, pending = await asyncio.wait({task}, timeout=0.5)
            if pending and self._pubsub is not None:
                with contextlib.suppress(Exception):
                    await self._pubsub.aclose()
                await asyncio.wait({task}, timeout=2)
        await self._client.aclose()

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
                await self._subscribe(pubsub, set(self._wanted), set())
                self._up()
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
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(backoff)
            backoff = min(BACKOFF_MAX, backoff * 2)

    async def _subscribe(self, pubsub: Any, add: set[str], remove: set[str]) -> None:
        if add:
            await pubsub.subscribe(*(self._prefix + channel for channel in sorted(add)))
            self._subscribed |= add
        if remove:
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
            self._synced.set()
            self._changed.clear()
            await self._changed.wait()

    async def _listen(self, pubsub: Any) -> None:
        prefix_length = len(self._prefix)
        deliver = self._on_message
        assert deliver is not None
        while not self._closing:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=IDLE_PING)
            if message is None:
                await pubsub.ping()  # quiet for a while: make sure the connection is alive
                continue
            # Deliver everything already received before letting the flusher run, so
            # a burst arriving from Redis leaves as batches too.
            while message is not None:
                if message.get("type") == "message":
                    channel = message["channel"].decode()[prefix_length:]
                    try:
                        waiting = deliver(*_route(channel), message["data"].decode())
                        if waiting is not None:  # a recipient's outbox is full: paced
                            await waiting
                    except Exception:
                        log.exception("delivering a message from channel %r failed", channel)
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0)

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


def _fail(batch: list[tuple[str, str, asyncio.Future[None]]], failure: Exception) -> None:
    for _, _, done in batch:
        if not done.done():
            done.set_exception(failure)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
