"""The per-connection bounded outbox, its writer, and the flusher that spares most wake-ups.

Theory of operation. Fan-out calls ``push()`` for every recipient: a plain ``def``
that appends the already-encoded event (one object shared by all recipients) to
a list and counts its bytes. It never awaits, so one slow client cannot hold up
a broadcast.

Each connection has a writer task, the only code that ever *waits* on the
client's socket; a connection's own starts it the first time it is needed (``lazy``):
most idle connections never need one. Waking one task per recipient per message would cost more than
the send itself, so while a writer is parked (nothing queued, nothing in flight)
its outbox is instead put on the loop's ``Flusher`` list. The flusher runs once
after the publishing code yields, and for each listed outbox takes up to
``batch_max`` queued events (one frame: the event itself, or a JSON array of
several) and starts ``send()`` without a task switch. Hypercorn's send almost
always completes without suspending; when it does suspend (the socket's buffer
is full, or a ping holds the lock), the half-done send is handed to that
connection's writer, which finishes it and keeps draining until it is parked
again. Either way, only one of the two sends for a connection at any time, in
queue order. Because the flusher runs only after the publisher yields, events
published back to back pile up and leave as batches: fewer frames under load, no
added latency when idle.

The bound is on bytes queued here. When a push would pass it, the outbox drops
what it holds, stops accepting, and calls ``on_overflow`` (which cancels the
writer, most likely stuck on a client that does not read); the endpoint then
closes the connection with 1013. Memory per connection therefore never grows past
the bound plus what the server's socket buffer holds.

Each send waits at most ``send_timeout`` on the client. When the server stops, the drain
closes every outbox with a deadline (``close(code, by)``): the send in progress and those
after it wait no later than that, so a writer stuck on a client that does not read gives
up (1013, as a stalled send does) in time for its connection to be reset before the server
cancels it (ws.py, ``ServerReach.flush_by``).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable, Coroutine
from types import CoroutineType
from typing import Any, Final, Protocol

from . import eager, protocol
from .types import Message, Send

Item = tuple[str, int, Message]
"""An encoded event, its size in bytes, and the ASGI message that sends it alone:
made once per publish and shared by every outbox (servers do not change messages)."""

log = logging.getLogger(__name__)

DRAIN_POLL: Final = (0.001, 0.05)  # the first and the longest sleep in ``drained()``


def item(frame: str) -> Item:
    """Pair a frame with its UTF-8 size."""
    return frame, protocol.utf8_size(frame), {"type": "websocket.send", "text": frame}


class DirectWriter(Protocol):
    """A server's connection that can write a ``websocket.send`` now, without a coroutine
    (servers/uvicorn_sansio.py): cheaper per frame than ``send()`` when it applies."""

    def write_now(self, message: Message) -> bool:
        """Write it, and True; or False: send it through ``send()`` instead."""


class WriterStats:
    """Per-frame counters, plain integers (read at scrape time, never locked)."""

    __slots__ = ("batch_sizes", "events", "frames")

    BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256)

    def __init__(self) -> None:
        self.frames = 0
        self.events = 0
        # batch_sizes[i] counts frames of n events where n.bit_length() == i + 1 (1, 2-3, 4-7, ...)
        self.batch_sizes = [0] * (len(self.BUCKETS) + 1)

    def count(self, events: int) -> None:
        self.frames += 1
        self.events += events
        if events == 1:
            self.batch_sizes[0] += 1
        else:
            self.batch_sizes[min(events.bit_length(), len(self.batch_sizes)) - 1] += 1


class Flushes(Protocol):
    """What an outbox asks of the loop's flusher (flusher.py)."""

    stats: WriterStats

    def schedule(self, outbox: Outbox) -> None:
        """Send for this parked writer at the next flush."""

    def batch(self, entries: list[Item]) -> Message:
        """The message that sends these events as one frame."""


class _Unstarted:
    """An outbox's writer that has no task yet (``Outbox.lazy``): parked, as a writer
    awaiting a future not yet done is."""

    __slots__ = ()

    def done(self) -> bool:
        return False


UNSTARTED: Final = _Unstarted()


class State(enum.Enum):
    """An outbox's life; it only moves down this list."""

    OPEN = "open"  # takes events
    CLOSING = "closing"  # takes no more: the writer sends what is queued, then returns the code
    CLOSED = "closed"  # the writer has returned, or an overflow dropped everything (1013)


_MOVES: Final = {State.OPEN: {State.CLOSING, State.CLOSED}, State.CLOSING: {State.CLOSED}}


class Outbox:
    """A bounded queue of encoded events for one connection, with one writer."""

    __slots__ = (
        "_batch_bytes",
        "_batch_max",
        "_error",
        "_flusher",
        "_frames",
        "_inflight",
        "_scheduled",
        "_send",
        "_sending",
        "_waiter",
        "close_code",
        "direct",
        "floors",
        "groups",
        "kept_pace",
        "limit",
        "on_overflow",
        "queued_bytes",
        "reason",
        "send_timeout",
        "session",
        "start_writer",
        "state",
        "stop_by",
        "user",
    )

    def __init__(
        self,
        *,
        user: str,
        groups: tuple[str, ...],
        send: Send,
        flusher: Flushes,
        limit: int,
        batch_max: int,
        batch_bytes: int,
        on_overflow: Callable[[], object] | None = None,
        send_timeout: float | None = None,
        session: str | None = None,
    ) -> None:
        self.user = user
        self.session = session  # the login session it belongs to (None: a token)
        self.groups = groups
        self._send = send
        self._flusher = flusher
        self.limit = limit
        self._batch_max = batch_max
        self._batch_bytes = batch_bytes
        # A list, not a deque: an empty deque holds a block of 64 slots (about 600 bytes),
        # and most connections' outboxes are empty most of the time (batches leave whole).
        self._frames: list[Item] = []
        # The parked writer's wake-up (None: it is awake; UNSTARTED: it has no task yet)
        self._waiter: asyncio.Future[None] | _Unstarted | None = None
        self.start_writer: Callable[[], object] | None = None  # see lazy()
        self._scheduled = False
        self._inflight: tuple[Coroutine[Any, Any, None], Any] | None = None
        self._error: BaseException | None = None
        self.queued_bytes = 0
        self.state = State.OPEN
        self.close_code: int | None = None  # why it closes, once it stops taking events
        self.reason: str | None = None  # what overflowed it, when not its bound (the log says)
        self.on_overflow = on_overflow
        # The offset a joining client's reply already covers, by the stream's message
        # prefix (``floor``); None once there are none.
        self.floors: dict[str, int] | None = None
        self.send_timeout = send_timeout  # a send blocked this long: the client does not read
        self.stop_by: float | None = None  # loop time the writer gives up by (a server's stop)
        self._sending: asyncio.Timeout | None = None  # the bound on the send in progress
        self.kept_pace = False  # it has drained a paced wait: its client reads (pacing.py)
        # The server's way to write a frame now, without a coroutine (servers/), or None.
        self.direct: DirectWriter | None = None

    def lazy(self, start_writer: Callable[[], object]) -> None:
        """From now on the writer's task is started (``start_writer()``, which runs ``run()``)
        only when the flusher cannot send for it or the outbox closes: till then it is
        parked without a task (one fewer task, coroutine and future per idle connection)."""
        self.start_writer = start_writer
        self._waiter = UNSTARTED
        if self.state is not State.OPEN:
            self._wake()  # to return the close code, as a writer started now would at once
        elif self._frames and not self._scheduled:  # queued before (a presence event)
            self._scheduled = True
            self._flusher.schedule(self)

    def _move(self, state: State, code: int | None = None) -> None:
        if state not in _MOVES.get(self.state, ()):
            raise RuntimeError(f"an outbox in state {self.state!r} cannot move to {state!r}")
        self.state = state
        if code is not None:
            self.close_code = code

    def push(self, entry: Item) -> bool:
        """Queue one encoded event; False if this outbox no longer takes any."""
        if self.close_code is not None:  # set on every move out of OPEN; cheaper to test
            return False
        if self.floors is not None and self._below_floor(entry[0]):
            return True
        queued = self.queued_bytes + entry[1]
        if queued > self.limit:
            self.overflow()
            return False
        self._frames.append(entry)
        self.queued_bytes = queued
        if not self._scheduled:
            waiter = self._waiter
            if waiter is not None and not waiter.done():  # parked: the flusher sends for it
                self._scheduled = True
                self._flusher.schedule(self)
        return True

    def floor(self, tops: dict[str, int]) -> None:
        """A joining client's reply (its welcome and replay) covers these streams up to
        these offsets: drop queued messages at or below them, and those still on their way
        (from Redis, or paced in the hub's backlog). A stream's floor goes once a message
        above it passes: a stream arrives in offset order, so nothing older follows. A
        stream at offset 0 has nothing to drop. The check is a few ``startswith`` per
        message while floors are left, and nothing once they are gone."""
        floors = {protocol.offset_prefix(stream): top for stream, top in tops.items() if top}
        self.floors = floors or None
        kept = [entry for entry in self._frames if not self._below_floor(entry[0])]
        self._frames.clear()  # in place: the writer may hold it
        self._frames.extend(kept)
        self.queued_bytes = sum(entry[1] for entry in kept)

    def _below_floor(self, frame: str) -> bool:
        floors = self.floors
        if floors is None:
            return False
        for prefix, top in floors.items():
            if frame.startswith(prefix):
                if protocol.offset_after(frame, prefix) <= top:
                    return True
                del floors[prefix]
                if not floors:
                    self.floors = None
                return False
        return False

    async def drained(self, gone: Callable[[], bool]) -> None:
        """Wait until this outbox is down to a quarter of its bound, or closes, or ``gone()``
        (its client has left). Polled with a short, growing sleep, as pacing waits: only a
        reader whose client does not read what it is sent ever waits here (ws.py)."""
        low = self.limit // 4
        delay, longest = DRAIN_POLL
        while self.queued_bytes > low and self.close_code is None and not gone():
            await asyncio.sleep(delay)
            delay = min(delay * 2, longest)

    def overflow(self, reason: str | None = None) -> None:
        """The client does not read: drop what is queued, take no more, close with 1013.
        ``reason``: why, when it is not the outbox's bound (pacing closes it, for one)."""
        if self.close_code is not None:
            return
        self.reason = reason
        self._frames.clear()
        self.queued_bytes = 0
        self._move(State.CLOSED, protocol.CloseCode.TRY_AGAIN_LATER)
        if self.on_overflow is not None:
            self.on_overflow()

    def _stalled(self) -> int:
        """A send has been blocked for ``send_timeout`` (or past ``stop_by``): the client
        does not read (however little traffic there is). Drop what is queued, end with 1013."""
        if self.stop_by is not None and self.reason is None:
            self.reason = "it had not read what was queued for it when the server stopped"
        self._frames.clear()
        self.queued_bytes = 0
        if self.state is not State.CLOSED:
            self._move(State.CLOSED, protocol.CloseCode.TRY_AGAIN_LATER)
        self.close_code = protocol.CloseCode.TRY_AGAIN_LATER
        return protocol.CloseCode.TRY_AGAIN_LATER

    def close(self, code: int, by: float | None = None) -> None:
        """Take no more events; the writer sends what is queued, then returns ``code``.

        Closing again keeps the first code: the first reason to close is the one given.

        Args:
            by: the loop time the writer gives up on a client that has not read it all
                by then (the server stops): it ends as a stalled send does (1013).
        """
        if self.state is State.OPEN:
            self._move(State.CLOSING, code)
        if by is not None:
            self.stop_by = by if self.stop_by is None else min(by, self.stop_by)
            sending = self._sending
            if sending is not None and not sending.expired():
                when = sending.when()
                if when is None or when > by:
                    sending.reschedule(by)  # the send blocked now waits no longer
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if isinstance(waiter, _Unstarted):
            self._waiter = None  # awake from now on
            if self.start_writer is not None:
                self.start_writer()
        elif waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _take(self) -> tuple[Message, int]:
        """Pop up to a batch of events: (the ASGI message to send, how many events)."""
        frames = self._frames
        count = len(frames)
        if 1 < count <= self._batch_max and self.queued_bytes <= self._batch_bytes:
            # All of it in one frame (a burst's usual case): taken whole, not event by event.
            entries = list(frames)
            frames.clear()
            self.queued_bytes = 0
            return self._flusher.batch(entries), count
        size, message = frames[0][1], frames[0][2]
        most = min(count, self._batch_max)
        count = 1
        while count < most and size + frames[count][1] <= self._batch_bytes:
            size += frames[count][1]
            count += 1
        if count > 1:
            message = self._flusher.batch(frames[:count])
        del frames[:count]  # one move of what is left, not one per event
        self.queued_bytes -= size
        return message, count

    def _flush(self) -> None:
        """Called by the flusher: send what is queued while the writer stays parked."""
        self._scheduled = False
        frames = self._frames
        stats = self._flusher.stats
        while frames:
            waiter = self._waiter
            if waiter is None or waiter.done():  # the writer is awake and does it
                return
            if len(frames) == 1:
                _, size, message = frames.pop()
                self.queued_bytes -= size
                count = 1
            else:
                message, count = self._take()
            direct = self.direct
            if direct is not None and direct.write_now(message):
                stats.count(count)
                continue
            send = self._send(message)
            if type(send) is not CoroutineType:
                send = eager.as_coroutine(send)
            try:
                blocked_on = send.send(None)  # the first step, without a task: see eager.py
            except StopIteration:
                if count == 1:  # the common case, inlined: this runs once per delivery
                    stats.frames += 1
                    stats.events += 1
                    stats.batch_sizes[0] += 1
                else:
                    stats.count(count)
                continue
            except BaseException as exc:  # handed to the writer, which raises it
                self._error = exc
                self._wake()
                return
            stats.count(count)
            self._inflight = (send, blocked_on)
            self._wake()  # the writer finishes this send, then drains the rest
            return

    def ended(self, writer: asyncio.Task[int]) -> tuple[int | None, str | None]:
        """The writer (``run()``'s task) ended before the reader: the close code that
        means (None: the client is gone, a send raised OSError) and, for a client that does
        not read (1013), why; a writer that failed is logged (1011)."""
        if not writer.cancelled():
            exc = writer.exception()
            if isinstance(exc, OSError):  # ASGI: a send to a connection that is gone
                return None, None
            if exc is not None:
                log.error("websocket writer for %s failed", self.user, exc_info=exc)
                return protocol.CloseCode.INTERNAL_ERROR, None
            code = writer.result()
            if code != protocol.CloseCode.TRY_AGAIN_LATER:
                return code, None
            # _stalled, or pacing overflowed it before its writer could be cancelled
            return code, self.reason or f"a send blocked for {self.send_timeout:g} s"
        if self.close_code == protocol.CloseCode.TRY_AGAIN_LATER:  # overflowed
            return self.close_code, self.reason or f"more than {self.limit} bytes queued"
        return protocol.CloseCode.INTERNAL_ERROR, None

    def drop_inflight(self) -> None:
        """End a send the flusher started that no writer finished (its writer was cancelled
        before it ran: ``run()`` ends it otherwise); it may hold the server's send lock."""
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            inflight[0].close()

    async def run(self) -> int:
        """The writer: drain the outbox until closed; return the close code."""
        try:
            return await self._drain()
        finally:
            inflight, self._inflight = self._inflight, None
            if inflight is not None:
                # Cancelled before it could finish a send the flusher started: end that send
                # (it may hold the server's send lock), rather than leave it suspended.
                inflight[0].close()

    async def _drain(self) -> int:
        frames = self._frames
        stats = self._flusher.stats
        loop = asyncio.get_running_loop()
        while True:
            inflight = self._inflight
            if inflight is not None:
                self._inflight = None
                if not await self._bounded(eager.finish(*inflight)):
                    return self._stalled()
            if self._error is not None:
                raise self._error
            if not frames:
                if self.state is not State.OPEN:
                    if self.state is State.CLOSING:
                        self._move(State.CLOSED)
                    assert self.close_code is not None
                    return self.close_code
                self._waiter = loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
                continue
            message, count = self._take()
            if not await self._bounded(self._send(message)):
                return self._stalled()
            stats.count(count)

    async def _bounded(self, send: Awaitable[None]) -> bool:
        """Await one send for at most ``send_timeout``, and no later than ``stop_by``;
        False if it took longer (the client does not read)."""
        stop_by = self.stop_by
        if stop_by is None:
            bound = asyncio.timeout(self.send_timeout)
        else:
            if self.send_timeout is not None:
                stop_by = min(stop_by, asyncio.get_running_loop().time() + self.send_timeout)
            bound = asyncio.timeout_at(stop_by)
        try:
            async with bound:
                self._sending = bound
                await send
        except TimeoutError:
            return False
        finally:
            self._sending = None
        return True
