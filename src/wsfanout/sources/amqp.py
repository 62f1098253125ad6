"""A RabbitMQ consumer (optional: ``WSFANOUT_AMQP_URL``) whose handler publishes through
``publishing.py``, and so through the hub's one door like every other source (``start()``).

Each message body is one publish (or an array of up to 1000), in the same JSON as
``POST /api/publish``. Delivery is at least once:

- a message is acked only after the hub (or the backplane) has taken all of it; they are
  published one at a time, in the queue's order, and while one is paced (its recipients'
  outboxes are full) the others wait unacked: past ``prefetch`` the broker keeps the rest,
  so a node that cannot take more stops consuming rather than lose anything;
- an invalid body is rejected without requeue, and logged with the reason;
- when the backplane cannot take it, or the node is stopping, it is nacked with
  requeue (after a pause, so an outage does not spin), and comes back;
- if the connection drops after a message was published but before its ack
  reached the broker, the broker delivers it again (to this node or another): recipients
  can see it twice, unless it has an idempotency key. At most ``prefetch`` messages are in
  that window. A message's ``message_id`` property is its body's idempotency key (each item
  of an array gets ``<message_id>#<index>``) where the body gives none: a redelivery within
  ``WSFANOUT_IDEMPOTENCY_TTL`` is acked but not published again.

The queue is declared durable and shared: with several nodes, each message goes
to one of them (competing consumers) and the backplane takes it everywhere. The
connection is aio-pika's robust one: a broker restart or a dropped connection is
reconnected and consuming resumes; the state shows in ``/healthz``.

While the broker is away, aiormq and aio-pika log every attempt (an ERROR and an INFO a
second); this source logs each change of its state once instead, with the reason, and
filters out their attempt-by-attempt records (``_Attempts``) while it runs. What else they
log (a broker blocking the connection, say) still shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, Final

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from ..config import Settings
from ..hub import UnavailableError
from ..protocol import ErrorCode, Source
from ..publishing import BatchError, Publishing

log = logging.getLogger(__name__)

RETRY_PAUSE: Final = 1.0
CONNECT_BACKOFF_MAX: Final = 10.0
RECONNECT_INTERVAL: Final = 1.0  # seconds between aio-pika's reconnect attempts
# The records of connection attempts and drops that this source's state lines replace: by
# logger, the start of the message's format string.
ATTEMPT_RECORDS: Final = {
    "aiormq.connection": (
        "error when creating transport",
        "Unexpected connection close from remote",
        "Cancelling cause reader exited abnormally",  # the connection dropped
    ),
    "aio_pika.robust_connection": (
        "Connection to %s closed. Reconnecting",
        'Connection attempt to "%s" failed',
        "Reconnect attempt failed",
    ),
    # a channel's close callback, run on a connection that is already closed (a drop)
    "aio_pika.tools": ("Callback %r error",),
}


class _Attempts(logging.Filter):
    """Drops aiormq's and aio-pika's records of connection attempts and drops."""

    def filter(self, record: logging.LogRecord) -> bool:
        starts = ATTEMPT_RECORDS.get(record.name, ())
        if not (isinstance(record.msg, str) and record.msg.startswith(starts)):
            return True
        if record.name == "aio_pika.tools":  # only a callback that found the connection closed
            args = record.args if isinstance(record.args, tuple) else ()
            return not (len(args) == 3 and args[1] == "RuntimeError" and "closed" in str(args[2]))
        return False


class State(enum.Enum):
    """Where the consumer is; ``/healthz`` shows it with the last reason."""

    CONNECTING = "connecting"  # not connected yet, retrying with backoff
    CONSUMING = "consuming"
    RECONNECTING = "reconnecting"  # the connection dropped; aio-pika reconnects
    STOPPED = "stopped"


# Which state may follow which; anything else is a bug and raises.
_MOVES: Final = {
    State.CONNECTING: {State.CONNECTING, State.CONSUMING, State.STOPPED},
    State.CONSUMING: {State.RECONNECTING, State.STOPPED},
    State.RECONNECTING: {State.CONSUMING, State.RECONNECTING, State.STOPPED},
    State.STOPPED: {State.STOPPED},
}


class Rejected(Exception):
    """The body can never be published (bad JSON, bad message, unknown target)."""


class Retry(Exception):
    """The body is fine but cannot be published now (backplane down, shutting down)."""


Handler = Callable[[Any, str | None], Awaitable[None]]
"""Validates and publishes one decoded body, given its message's ``message_id``; raises
Rejected or Retry."""


class AmqpSource:
    """Consumes one queue and hands each decoded body to ``handle``."""

    def __init__(
        self,
        url: str,
        queue: str,
        prefetch: int,
        handle: Handler,
        *,
        connection_name: str = "wsfanout",
    ) -> None:
        self.url = url
        self.queue = queue
        self.prefetch = prefetch
        self._handle = handle
        self._connection_name = connection_name
        self._connection: AbstractRobustConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self.state = State.CONNECTING
        self.reason = "not connected yet"
        self.stats = {"acked": 0, "rejected": 0, "requeued": 0, "reconnects": 0}
        self._quiet = _Attempts()

    def start(self) -> None:
        for name in ATTEMPT_RECORDS:
            logging.getLogger(name).addFilter(self._quiet)
        self._task = asyncio.get_running_loop().create_task(self._connect(), name="wsfanout-amqp")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._move(State.STOPPED, "stopped")  # before closing: this close is no loss
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
        for name in ATTEMPT_RECORDS:
            logging.getLogger(name).removeFilter(self._quiet)

    async def _connect(self) -> None:
        """Connect and start consuming (retrying until it works), then let aio-pika keep
        the connection up. The reconnect callbacks are added only once consuming: a drop
        before that is this loop's to retry."""
        backoff = 0.5
        while True:
            connection = None
            try:
                connection = await aio_pika.connect_robust(
                    self.url,
                    client_properties={"connection_name": self._connection_name},
                    reconnect_interval=RECONNECT_INTERVAL,
                )
                channel = await connection.channel()
                await channel.set_qos(prefetch_count=self.prefetch)
                # Publishers declare it the same way (examples/publish_amqp.py): durable, no
                # arguments. Any change here conflicts with queues declared so.
                queue = await channel.declare_queue(self.queue, durable=True)
                await queue.consume(self._on_message)
                break
            except (OSError, aio_pika.exceptions.AMQPError) as exc:
                if connection is not None:
                    with contextlib.suppress(Exception):
                        await connection.close()
                self._move(State.CONNECTING, f"cannot connect: {type(exc).__name__}: {exc}")
                await asyncio.sleep(backoff)
                backoff = min(CONNECT_BACKOFF_MAX, backoff * 2)
        self._connection = connection
        connection.close_callbacks.add(self._on_close)
        connection.reconnect_callbacks.add(self._on_reconnect)
        self._move(State.CONSUMING, "consuming")

    @property
    def consuming(self) -> bool:
        return self.state is State.CONSUMING

    def _on_close(self, *args: Any) -> None:
        if self.state is not State.STOPPED:
            why = args[-1] if args and isinstance(args[-1], BaseException) else None
            cause = f" ({type(why).__name__}: {why})" if why is not None else ""
            self._move(State.RECONNECTING, f"connection lost{cause}, reconnecting")

    def _on_reconnect(self, *args: Any) -> None:
        if self.state is State.STOPPED:
            return  # a reconnect that finished while closing
        self.stats["reconnects"] += 1
        self._move(State.CONSUMING, "consuming")

    def _move(self, state: State, reason: str) -> None:
        if state not in _MOVES[self.state]:
            raise RuntimeError(f"RabbitMQ source in state {self.state!r} cannot move to {state!r}")
        if state is not self.state or reason != self.reason:
            level = (
                logging.WARNING if state in {State.CONNECTING, State.RECONNECTING} else logging.INFO
            )
            log.log(level, "RabbitMQ queue %r: %s", self.queue, reason)
        self.state = state
        self.reason = reason

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            data = orjson.loads(message.body)
        except orjson.JSONDecodeError:
            await self._reject(message, "the body is not valid JSON")
            return
        try:
            await self._handle(data, message.message_id or None)
        except Rejected as exc:
            await self._reject(message, str(exc))
            return
        except Retry as exc:
            log.warning("requeueing message %s: %s", message.delivery_tag, exc)
            await asyncio.sleep(RETRY_PAUSE)
            await message.nack(requeue=True)
            self.stats["requeued"] += 1
            return
        try:
            await message.ack()
        except aio_pika.exceptions.AMQPError as exc:
            # The connection dropped after publishing: the broker will deliver it again.
            log.info("could not ack message %s (%s): it will come again", message.delivery_tag, exc)
            return
        self.stats["acked"] += 1

    async def _reject(self, message: AbstractIncomingMessage, reason: str) -> None:
        log.warning("rejecting message %s (not requeued): %s", message.delivery_tag, reason)
        await message.reject(requeue=False)
        self.stats["rejected"] += 1


def start(settings: Settings, publishing: Publishing) -> AmqpSource:
    """Consume the configured queue into the hub (through the backplane, if any): each
    body validated and published as ``POST /api/publish`` does, one at a time in the
    queue's order (aio-pika hands over up to ``prefetch`` at once)."""
    order = asyncio.Lock()  # FIFO: taken in the order the broker delivered

    async def handle(data: object, message_id: str | None) -> None:
        async with order:
            try:
                batch = await publishing.validate_batch(data, Source.AMQP, message_id)
            except BatchError as exc:
                if exc.code is ErrorCode.UNAVAILABLE:
                    raise Retry(exc.detail) from None
                raise Rejected(f"item {exc.index}: {exc.code}: {exc.detail}") from None
            try:
                await publishing.publish_batch(batch)
            except UnavailableError as exc:
                raise Retry(str(exc)) from None

    source = AmqpSource(
        settings.amqp_url,
        settings.amqp_queue,
        settings.amqp_prefetch,
        handle,
        connection_name=f"wsfanout {settings.amqp_queue} pid {os.getpid()}",
    )
    source.start()
    return source
