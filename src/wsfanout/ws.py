"""The websocket endpoint: the handshake's outcome, the receive loop, cleanup.

Theory of operation: a connection is two tasks. The reader (the endpoint's own task)
awaits ``receive()``, validates each frame and publishes it (awaiting only the store, to
resolve a group or user). The writer, started the first time it is needed (most idle
connections never need one), drains the outbox into ``send()`` when the flusher cannot
(outbox.py): the only task that waits on the client. Whichever finishes first decides the
close code, and the other is cancelled (the writer wakes a reader blocked on ``receive()``
by cancelling it; the reader takes that cancellation back):

- reader sees the client leave          -> nothing more to send;
- the client leaves while the reader is paused (below): the server knows
  (``ServerReach.gone``) before its disconnect reaches us, or a send raises OSError
  -> no close, the connection is reset and let go (one debug line);
- reader finds a fatal frame (1009, 1008) -> flush queued frames, then close;
- outbox overflows (the client does not read fast enough) -> writer cancelled, 1013;
- hub shuts down -> writer flushes, 1001;
- the session's max age (or the token's ``exp``) passes (``Admission.deadlines``) -> a
  ``forbidden`` frame is queued, writer flushes, 1008;
- the session is revoked (``Hub.disconnect``, on every node) -> the same, 1008; the reader
  publishes nothing it reads after that;
- anything raises -> logged, 1011; no other connection notices.

Inbound work is bounded like the outbox: the rate, what makes a flood (1008) and the slow
lane refused frames wait in are inbound.py's; while the outbox is over half full, the
reader reads nothing (the server's queue fills, then TCP holds the client back).

The handshake is checked by ``Admission.admit`` (admission.py), which takes a seat before
it awaits anything, so the limits hold under concurrent handshakes; the seat is given back
here, once the connection is closed. Closing is the close frame, then the client's answer
(its close, or leaving); a client that has not answered within ``WSFANOUT_CLOSE_TIMEOUT``
(it does not read), or sends ``UNANSWERED_FRAMES`` more frames instead (one, if closed for
a flood), has its TCP connection reset (``ServerReach.abort``), freeing what the kernel
held for it with its seat. Cleanup (the hub, the writer, the seat) runs in ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import functools
import logging
import time
from typing import Any, Final

from . import protocol, queries
from .admission import Login, Refusal, refuse
from .control import REVOKED
from .inbound import FLOOD_WINDOW, Inbound, Verdict, frame_size
from .outbox import Outbox, item
from .protocol import CloseCode, ErrorCode, Kind, Position, ProtocolError, Publish
from .servers import ABORT_GRACE, TOO_LARGE_KEY
from .service import Service
from .types import Receive, Scope, Send

log = logging.getLogger(__name__)

FLUSH_BEFORE_CLOSE: Final = 2.0  # seconds a writer gets to send queued frames before a close
EXPIRED: Final = "the session has expired: log in again"
TOKEN_EXPIRED: Final = "the token (or the host's session) has expired: connect again"  # noqa: S105
YIELD_EVERY: Final = 32  # frames a reader handles before letting other tasks run
UNANSWERED_FRAMES: Final = 64  # frames a client may send after our close before it is reset
NO_STATUS, ABNORMAL = 1005, 1006  # closed with no code; closed with no close frame at all


async def endpoint(
    scope: Scope, receive: Receive, send: Send, svc: Service, owner: bool = False
) -> None:
    """Serve one websocket from handshake to close. ``owner``: wsfanout owns the process
    (``wsfanout:app``), the scope's headers go once accepted (nothing reads them then)."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    try:
        login, seen, announce, since = await svc.admission.admit(scope)
    except Refusal as refusal:
        svc.stats.refuse(refusal.label)
        log.info("websocket refused (%s): %s", refusal.status, refusal.reason)
        await refuse(scope, send, refusal.status, refusal.reason)
        return
    try:
        accept = svc.server.accept_message()
        svc.server.accepting(receive)  # uvicorn's 101 waits to go out with the welcome
        await send(accept)
        if owner:
            scope["headers"] = ()
        connection = Connection(svc, login, receive, send)
        stream = connection.stream = svc.server.accepted(accept, receive)  # abort (or None)
        del message, accept  # this frame lives as long as the connection
        connection.outbox.direct = svc.server.direct(stream, send)  # or None
        await connection.run(seen, announce, since)
    finally:
        svc.admission.seats.give_back(login.username)


class Stage(enum.Enum):
    """Where a connection is in its life; it only ever moves down this list."""

    STARTING = "starting"  # accepted; joining the hub and sending the welcome
    READING = "reading"  # the reader waits on receive(); the writer drains the outbox
    CLOSING = "closing"  # the reader is done: the writer finishes, then the close goes out


_NEXT_STAGE: Final = {Stage.STARTING: Stage.READING, Stage.READING: Stage.CLOSING}


class Connection:
    """One accepted websocket: its outbox, its reader (the endpoint's own task) and its writer."""

    # Slots: tens of thousands live at once, and every object is one more for the GC to walk.
    __slots__ = (
        "_flooding",
        "_interrupted",
        "_reader",
        "_writer",
        "announce",
        "code",
        "expires_at",
        "gone",
        "login",
        "outbox",
        "receive",
        "send",
        "stage",
        "stream",
        "svc",
    )

    def __init__(self, svc: Service, login: Login, receive: Receive, send: Send) -> None:
        settings = svc.settings
        self.svc = svc
        self.login = login
        self.expires_at = login.expires_at
        self.receive = receive
        self.send = send
        self.outbox = Outbox(
            user=login.username,
            groups=login.groups,
            session=login.session_id,
            send=send,
            flusher=svc.flusher,
            limit=settings.outbox_bytes,
            batch_max=settings.batch_max,
            batch_bytes=settings.batch_bytes,
            send_timeout=settings.send_timeout,
        )
        self.stage = Stage.STARTING
        self.stream: object = None
        self._reader: asyncio.Task[Any] | None = None
        self._writer: asyncio.Task[int] | None = None  # started when needed (Outbox.lazy)
        self._interrupted = False  # the writer finished first and cancelled the reader
        self._flooding = False  # closing a flood (inbound.py)
        self.announce: tuple[str, ...] = ()  # groups told of this user's presence
        self.code: int = ABNORMAL  # how it closed: ours, or the client's
        self.gone = False  # the client left while this connection was not reading (1006)

    def _move(self, stage: Stage) -> None:
        if _NEXT_STAGE.get(self.stage) is not stage:
            raise RuntimeError(f"a connection in stage {self.stage!r} cannot move to {stage!r}")
        self.stage = stage

    async def run(
        self, seen: dict[str, Position] | None, announce: tuple[str, ...], since: float
    ) -> None:
        """Join the hub, say welcome (and replay what the client missed), then serve.

        ``since``: when the login was checked. A change the operator made since then did
        not find this connection (it was not in the hub yet): if its session was revoked,
        it is told so and closed (1008) instead of welcomed; if its groups changed, 1012, to
        reconnect with the new ones; if Redis could not say where its streams stand, 1013."""
        outbox, user, hub, hooks = self.outbox, self.login, self.svc.hub, self.svc.hooks
        self.announce = announce
        groups = list(outbox.groups)
        streams = queries.streams_of(outbox)
        told = hooks.connected(user.username)  # the lifecycle hooks (DESIGN 12)
        code: int | None = None
        try:
            # Joined before the welcome: messages from now on queue up behind it (and behind
            # the replay, which join() makes sure they do not repeat). See Joined for 1013.
            joined = await hub.join(outbox, streams, seen or {}, announce)
            changed = self.svc.control.changed_since(user, since)
            if changed is None and joined.positions is None and self.svc.settings.history_on:
                changed = CloseCode.TRY_AGAIN_LATER
            timeout = self.svc.settings.send_timeout
            # What is sent before the writer starts gets send_timeout in all, as the
            # writer's sends do (outbox.py): a deadline, armed only if a send has to wait.
            loop = asyncio.get_running_loop()  # once: each call asks the OS for the pid
            deadline = loop.time() + timeout
            try:
                if changed is not None:
                    if changed == CloseCode.POLICY:
                        forbidden = protocol.error(ErrorCode.FORBIDDEN, REVOKED)
                        await self._send_now([forbidden], deadline)
                    await self._close(changed)
                    return
                welcome = protocol.welcome(user.username, user.first_name, groups, joined.positions)
                await self._send_now([welcome], deadline)
                if seen is not None:
                    stats = self.svc.stats
                    stats.resumes["lost" if joined.lost else "recovered"] += 1
                    stats.replayed += len(joined.replay)
                    await self._send_now(joined.replay, deadline)
                    resumed = protocol.resumed(len(joined.replay), joined.lost)
                    await self._send_now([resumed], deadline)
                # What joining needed is let go: these locals would live as long as the socket.
                del joined, welcome, groups, streams
            except TimeoutError:
                hub.stats.slow_consumers += 1
                log.warning(
                    "closing a slow consumer (%s): its welcome blocked for %g s",
                    user.username,
                    timeout,
                )
                code = CloseCode.TRY_AGAIN_LATER
            else:
                code = await self._serve(loop)
        finally:
            # Before leaving the hub: a user's last ``disconnected`` comes before ``offline``.
            hooks.disconnected(user.username, told, self.code if code is None else int(code))
            hub.remove(outbox)
        if code is not None:
            await self._close(code)
        elif self.gone and self.svc.server.abort(self.stream):
            await self._read_on()

    async def _send_now(self, frames: list[str], deadline: float) -> None:
        """Send frames before the writer starts (the welcome, a replay), batched as it would:
        at once where the server can (``write_now``), else by ``deadline`` (loop time)."""
        settings, stats, direct = self.svc.settings, self.svc.flusher.stats, self.outbox.direct
        for text, count in protocol.batches(frames, settings.batch_max, settings.batch_bytes):
            message = {"type": "websocket.send", "text": text}
            if direct is None or not direct.write_now(message):
                async with asyncio.timeout_at(deadline):
                    await self.send(message)
            stats.count(count)

    async def _close(self, code: int) -> None:
        """Send the close, await the client's answer (holding its seat), else reset it."""
        self.code = int(code)
        try:
            wait = self.svc.server.within_stop(self.svc.settings.close_timeout, ABORT_GRACE)
            async with asyncio.timeout(wait):
                await self.send({"type": "websocket.close", "code": code})
                # a flood has said enough: its first frame more, and it is reset
                answered = await self._until_gone(1 if self._flooding else UNANSWERED_FRAMES)
        except TimeoutError:
            answered = False
        if not answered and self.svc.server.abort(self.stream):
            log.info("reset the connection of %s: it did not answer the close", self.login.username)
            await self._read_on()

    async def _read_on(self) -> None:
        """After a reset, the server hands over the disconnect only once its queue to us has
        room: read on (briefly), or it would hold the connection's task forever."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.svc.server.within_stop(ABORT_GRACE)):
                await self._until_gone()

    async def _until_gone(self, most: int = 0) -> bool:
        """Drop what the client sends until it is gone (its close, or the connection's
        end): True. False once it has sent ``most`` frames more (0: no limit) without
        answering: it floods rather than closes, and every frame costs the server parsing."""
        receive = self.receive
        seen = 0
        while (await receive())["type"] != "websocket.disconnect":
            seen += 1
            if seen == most:
                return False
            await self.svc.slow_lane.wait()  # a client flooding while closing: the slow lane
        return True

    def expire(self) -> None:
        """The session's max age (or the token's ``exp``) has passed: say so, and close with
        1008 once that is sent."""
        if self.stage is Stage.READING:
            self._tell(ErrorCode.FORBIDDEN, self._expired)
            self.outbox.close(CloseCode.POLICY)

    @property
    def _expired(self) -> str:
        return EXPIRED if self.login.session_id is not None else TOKEN_EXPIRED

    def _start_writer(self) -> asyncio.Task[int]:
        """The writer's task, started the first time the outbox needs it."""
        writer = self._writer
        if writer is None:
            writer = self._writer = asyncio.get_running_loop().create_task(self.outbox.run())
            writer.add_done_callback(self._writer_done)
        return writer

    def _overflowed(self) -> None:
        self._start_writer().cancel()  # as a writer stuck on the client is

    def _writer_done(self, _: object) -> None:
        if self.stage is Stage.READING:  # the reader is blocked on receive(): wake it to close
            self._interrupted = True
            assert self._reader is not None
            self._reader.cancel()

    async def _serve(self, loop: asyncio.AbstractEventLoop) -> int | None:
        """Read in this task, write in another; return the close code (None: client left)."""
        outbox, user = self.outbox, self.login
        reader = self._reader = asyncio.current_task(loop)
        assert reader is not None
        outbox.on_overflow = self._overflowed
        outbox.lazy(self._start_writer)
        deadlines = self.svc.admission.deadlines  # the session ends when it says, even ...
        deadlines.add(self.expires_at, self)  # ... on a socket that only listens
        try:
            self._move(Stage.READING)
            try:
                result = await self._read()
            finally:
                self._move(Stage.CLOSING)
            return await self._after_reading(result)
        except asyncio.CancelledError:
            if not self._interrupted:
                raise  # the server is cancelling us
            reader.uncancel()
            return self._writer_code(self._start_writer())  # the writer that ended first
        except Exception:
            log.exception("websocket reader for %s failed", user.username)
            return CloseCode.INTERNAL_ERROR
        finally:
            deadlines.discard(self.expires_at, self)
            outbox.start_writer = None  # none is started to end it
            outbox.close(CloseCode.NORMAL)
            writer = self._writer
            if writer is not None:
                writer.remove_done_callback(self._writer_done)
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
            outbox.drop_inflight()  # a writer cancelled before it ran could not end it
            # No cycle left (outbox <-> writer): freed as its last reference goes, not by the GC.
            self._reader = self._writer = outbox.on_overflow = None

    async def _after_reading(self, code: int | None) -> int | None:
        """The reader is done: None (the client left) or a close code from a fatal frame."""
        if code is None:
            return None
        self.outbox.close(code)  # the writer sends what is queued (the error that explains)
        # wait() neither raises when the writer was cancelled nor hides our own cancellation.
        await asyncio.wait((self._start_writer(),), timeout=FLUSH_BEFORE_CLOSE)
        return code

    def _writer_code(self, writer: asyncio.Task[int]) -> int | None:
        """The writer finished first: why, as a close code (None: the client left)."""
        code, slow = self.outbox.ended(writer)
        if code is None:
            self._left()
        elif slow is not None:
            self.svc.hub.stats.slow_consumers += 1
            log.warning("closing a slow consumer (%s): %s", self.login.username, slow)
        return code

    async def _read(self) -> int | None:
        """Read frames until the client leaves (None) or a frame ends the connection (a code)."""
        settings = self.svc.settings
        max_bytes = settings.max_frame_bytes
        rate = settings.rate_limit
        inbound = Inbound(rate, settings.rate_burst, time.monotonic())
        outbox, hub = self.outbox, self.svc.hub
        pause_at = outbox.limit // 2
        flusher, slow_lane = self.svc.flusher, self.svc.slow_lane
        frames, passes = 0, flusher.passes
        while True:
            frames += 1
            if frames >= YIELD_EVERY:
                # The server's receive() returns without yielding while frames are queued.
                # If the flusher has not run meanwhile, this reader is hogging the loop: let
                # the others run. (Yielding regardless would split a burst's batches.)
                if flusher.passes == passes:
                    await asyncio.sleep(0)
                frames, passes = 0, flusher.passes
            message = await self.receive()
            kind = message["type"]
            if kind == "websocket.disconnect":
                sent = self.svc.server.client_code(self.stream)
                self.code = message.get("code", NO_STATUS) if sent is None else sent
                return None
            if kind != "websocket.receive":
                continue
            if outbox.queued_bytes > pause_at:
                # Reading pauses while this client does not read what it is sent: what it
                # sends meanwhile waits in the server's queue, then in the kernel (TCP's own
                # backpressure), not in this process.
                gone = functools.partial(self.svc.server.gone, self.stream)
                await outbox.drained(gone)
                if gone():  # the server knows; its disconnect waits behind what we do not read
                    self._left()
                    return None
            if outbox.close_code is not None:  # revoked, expired, draining: no more
                return outbox.close_code
            frame: str | bytes | None = message.get("text")
            if frame is None:
                frame = message.get("bytes")
                if frame is None:  # the server dropped a frame over the limit (servers/)
                    frame = b"" if TOO_LARGE_KEY not in message else None
            if frame is None or frame_size(frame, max_bytes) > max_bytes:
                outbox.push(item(protocol.too_large(max_bytes)))
                return CloseCode.TOO_LARGE
            now = time.monotonic()
            if self.svc.codec.clock() >= self.expires_at:
                self._tell(ErrorCode.FORBIDDEN, self._expired)
                return CloseCode.POLICY
            verdict = inbound.check(now)
            if verdict is not Verdict.TAKE:
                # A request over the rate is answered if it asked (its id): its sender must
                # not wait in vain. At most the burst are, then the flood closes (inbound.py).
                frame_id = protocol.frame_id_of(frame) if verdict is not Verdict.FLOOD else None
                if verdict is Verdict.TELL or frame_id is not None:
                    self._tell(
                        ErrorCode.RATE_LIMITED, f"at most {rate:g} messages per second", frame_id
                    )
                elif verdict is Verdict.FLOOD:
                    return self._flooded(
                        ErrorCode.RATE_LIMITED,
                        f"more than {inbound.burst} messages over the rate limit "
                        f"in {FLOOD_WINDOW:g} s",
                    )
                await slow_lane.wait()  # with every other frame over the rate (inbound.py)
                continue
            try:
                if isinstance(frame, bytes):
                    raise ProtocolError(
                        ErrorCode.BAD_MESSAGE, "send JSON as text frames, not binary"
                    )
                request = protocol.parse(frame)
                if isinstance(request, Publish):
                    await self._publish(request)
                else:
                    size = settings.history_size
                    answer = await queries.answer(hub, outbox, request, self.announce, size)
                    outbox.push(item(answer))
                inbound.accepted()
            except ProtocolError as exc:
                self._tell(exc.code, exc.detail, exc.frame_id)
                if inbound.refused():  # nothing but errors: a flood, or errors never read
                    return self._flooded(
                        ErrorCode.BAD_MESSAGE,
                        f"{inbound.refused_in_a_row} messages in a row refused",
                    )
                await slow_lane.wait()  # bad frames too

    def _left(self) -> None:
        """The client left while this connection was not reading: one debug line, no close."""
        self.gone = True
        log.debug("%s's client left without a close while not being read", self.login.username)

    def _flooded(self, code: ErrorCode, why: str) -> int:
        """The client floods (inbound.py): say why, and close (1008)."""
        self.svc.stats.floods += 1
        self._flooding = True
        log.info("closing %s's connection: %s", self.login.username, why)
        self._tell(code, f"{why}: closing")
        return CloseCode.POLICY

    async def _publish(self, publish: Publish) -> None:
        """Publish through the service as this connection's user; answer with an ack.

        Raises:
            ProtocolError: unknown group or user, or the service cannot take it now.
        """
        if (
            publish.kind is Kind.GROUP
            and self.svc.settings.group_write == "members"
            and publish.target not in self.outbox.groups
        ):
            raise ProtocolError(
                ErrorCode.FORBIDDEN,
                f"only members of {publish.target!r} write to it",
                publish.frame_id,
            )
        pending = await self.svc.publishing.publish(
            dataclasses.replace(publish, sender=self.login.username)
        )
        if pending is None:
            if publish.frame_id is not None:
                self.outbox.push(item(protocol.ack(publish.frame_id)))
        else:
            # The next frame is read meanwhile; the answer comes once Redis has this one.
            pending.add_done_callback(functools.partial(self._published, publish.frame_id))

    def _published(self, frame_id: str | None, done: asyncio.Future[None]) -> None:
        # The hub settles it with a result or UnavailableError; cancelled only at loop exit.
        exc = None if done.cancelled() else done.exception()
        if done.cancelled() or exc is not None:
            self._tell(ErrorCode.UNAVAILABLE, str(exc or "the server is shutting down"), frame_id)
        elif frame_id is not None:
            self.outbox.push(item(protocol.ack(frame_id)))

    def _tell(self, code: ErrorCode, detail: str, frame_id: str | None = None) -> None:
        """An error frame to this connection only."""
        self.outbox.push(item(protocol.error(code, detail, frame_id)))
