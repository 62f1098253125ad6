"""The client: one task that connects, reads and reconnects; the application's side of it
(events to iterate, requests to await).

Theory of operation. ``connect()`` starts the runner task and waits for the first
``welcome``. The runner loops: credentials (``credentials.py``), a handshake that carries
the positions (``?resume=``), then reading frames until the connection ends; an attempt that
brings no welcome within ``connect_timeout`` is given up. ``reconnect.py`` says what follows
each end, and the runner waits and goes round again, or stops. ``events.py`` makes the
frames into events for the application, which go through a bounded buffer (``inbox.py``),
and settles requests with their answers; a ``joined`` group's epoch, which no welcome gave,
is asked for with a history request of no messages. When the inbox is full the runner stops
reading: the socket's buffers fill, the server finds a slow consumer and closes (1013), and
the client comes back and resumes where the application is: memory stays bounded, and what
the server can no longer replay is named
lost. Requests sent while not connected fail at once with ``disconnected``; those in flight
when a connection ends fail with it.

The JavaScript client (web/wsfanout.js) behaves the same, with the same state reasons.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import ssl
import urllib.parse
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Final

import orjson
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.uri import parse_uri

from .credentials import Credentials, NoCredential, TokenSource
from .events import ClientError, EventReader
from .inbox import Inbox
from .login import LoginError
from .reconnect import (
    CLOSED,
    CONNECTION_LOST,
    REFUSED,
    RESTART_JITTER,
    TIMEOUT,
    TOKEN_FAILED,
    UNAUTHORIZED,
    UNREACHABLE,
    Action,
    Backoff,
    Next,
    after_close,
    after_refusal,
)
from .streams import Streams

log = logging.getLogger(__name__)

MIB: Final = 1024 * 1024
CLOSE_TIMEOUT: Final = 2.0  # seconds a close waits for the server's answer
StateListener = Callable[[str, "str | None"], None]


class State(enum.StrEnum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"  # will retry
    CLOSED = "closed"  # will not: closed by the application, or refused for good


class Client:
    """A wsfanout client that reconnects and resumes by itself (DESIGN 11).

    Args:
        url: the service's websocket URL (``ws://host:8000/``, ``wss://host/chat/``).
        username, password: log in with ``POST /login`` and keep the session cookie.
        token: a connection token (JWT), sent as ``?token=``.
        get_token: a callable (sync or async) returning a token, called before each
            connection attempt and once more after an auth refusal.
        positions: ``{stream: {"epoch", "offset"}}`` to resume from (``Client.positions``
            of an earlier run).
        on_state: called with ``(state, reason)`` at each change of ``state``.
        headers: sent with every handshake, e.g. ``{"Cookie": "session=…"}`` when wsfanout is
            embedded in a host app whose own session logs users in (its ``authenticate``).
    """

    def __init__(
        self,
        url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        token: str | None = None,
        get_token: TokenSource | None = None,
        positions: Mapping[str, Mapping[str, Any]] | None = None,
        on_state: StateListener | None = None,
        headers: Mapping[str, str] | None = None,
        # Reconnecting
        min_delay: float = 0.5,  # seconds, the first backoff ceiling
        max_delay: float = 20.0,  # seconds, the backoff's ceiling
        reset_after: float = 10.0,  # seconds a connection lives to start the backoff over
        # Timeouts
        request_timeout: float = 10.0,  # seconds for an ack or an answer
        connect_timeout: float = 10.0,  # seconds from an attempt's start to its welcome
        # Limits
        max_queue: int = 10_000,  # events held for the application before reading stops
        max_size: int | None = 16 * MIB,  # bytes in one frame from the server
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        try:
            parse_uri(url)
        except InvalidURI:
            raise ValueError(f"expected a ws:// or wss:// URL, got {url!r}") from None
        self.url = url
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.max_size = max_size
        self._credentials = Credentials(
            url,
            username=username,
            password=password,
            token=token,
            get_token=get_token,
            ssl_context=ssl_context,
        )
        self._ssl = ssl_context
        self._headers = dict(headers or {})
        self._on_state = on_state
        self._streams = Streams(positions)
        self._backoff = Backoff(min_delay, max_delay, reset_after)
        self._inbox = Inbox(max_queue)
        self._state: State = State.CLOSED
        self._reason: str | None = None
        self._detail = ""
        self._retry_in: float | None = None
        self._renewed = False  # the credential was renewed since the last welcome
        self._closing = False  # the application called close()
        self._ws: ClientConnection | None = None
        self._events = EventReader(self._streams, self._welcome, self._learn)
        self._runner: asyncio.Task[None] | None = None
        self._welcomed: asyncio.Future[None] | None = None
        self._ids = itertools.count(1)
        self._learning: set[asyncio.Task[None]] = set()  # epochs asked for (joined groups)

    # -- what the application sees --------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def reason(self) -> str | None:
        """Why the state changed, in the JavaScript client's words: ``closed`` or
        ``unauthorized`` when closed; ``going_away``, ``restart``, ``slow_consumer``,
        ``unauthorized``, ``connection_lost``, ``unreachable``, ``refused``,
        ``token_failed``, ``timeout`` when disconnected; ``retry`` or None otherwise."""
        return self._reason

    @property
    def detail(self) -> str:
        """What ``reason`` leaves out, for people: ``the handshake was refused (429)``."""
        return self._detail

    @property
    def retry_in(self) -> float | None:
        """While ``disconnected``: the seconds it chose to wait before the next attempt."""
        return self._retry_in

    @property
    def positions(self) -> dict[str, dict[str, Any]]:
        """A copy of ``{stream: {"epoch", "offset"}}``: where the application stands, to
        resume from in another run (``Client(..., positions=...)``)."""
        return self._streams.positions()

    async def connect(self) -> None:
        """Connect, and return once the server said welcome.

        Raises:
            ClientError: refused for good (``unauthorized``, ``refused``), or closed by the
                application meanwhile (``closed``). A server that cannot be reached is
                retried: wrap the call in ``asyncio.timeout`` to give up.
        """
        if self._runner is None or self._runner.done():
            self._start()
        if self._state is State.CONNECTED:
            return
        assert self._welcomed is not None and self._runner is not None
        try:
            await asyncio.shield(self._welcomed)
        except asyncio.CancelledError:  # given up on (a timeout): stop trying, too
            if not self._welcomed.done():
                self._closing = True
                self._runner.cancel()
            raise

    async def close(self) -> None:
        """Close (1000) and stop reconnecting; the iteration ends after the events held."""
        runner = self._runner
        if runner is None or runner.done():
            return
        self._closing = True
        ws = self._ws
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        if ws is not None:
            await _goodbye(ws)

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def __aiter__(self) -> Client:
        if self._runner is None:
            self._start()
        return self

    async def __anext__(self) -> dict[str, Any]:
        return await self._inbox.get()

    async def send(self, frame: Mapping[str, Any]) -> dict[str, Any]:
        """Send a frame (``broadcast``, ``group``, ``direct``); its ``ack``. The client sets
        the frame's ``id``.

        Raises:
            ClientError: the server's ``error`` code, ``disconnected`` or ``timeout``.
        """
        return await self._request(dict(frame))

    async def presence(self, group: str) -> dict[str, Any]:
        """Who of a group is online: ``{"online": [...], "count": N, ...}`` (DESIGN 5.2)."""
        return await self._request({"type": "presence", "group": group})

    async def history(self, stream: str, limit: int = 50) -> dict[str, Any]:
        """A stream's epoch, offset and last ``limit`` messages, oldest first (DESIGN 5.4)."""
        return await self._request({"type": "history", "stream": stream, "limit": limit})

    # -- the runner -----------------------------------------------------------------------

    def _start(self) -> None:
        self._closing = self._renewed = False
        self._backoff.failures = 0
        self._inbox.reopen()
        self._welcomed = asyncio.get_running_loop().create_future()
        self._runner = asyncio.create_task(self._run(), name=f"wsfanout client {self.url}")

    def _set_state(self, state: State, reason: str | None, detail: str = "") -> None:
        self._detail = detail
        if (state, reason) == (self._state, self._reason):
            return
        self._state, self._reason = state, reason
        if self._on_state is not None:
            try:
                self._on_state(state.value, reason)
            except Exception:
                log.exception("on_state(%r, %r) raised", state.value, reason)

    async def _run(self) -> None:
        step = Next(Action.STOP, CLOSED)
        renew, first = False, True
        try:
            while True:
                if not first:
                    self._retry_in = self._wait(step)
                    self._set_state(State.DISCONNECTED, step.reason, step.detail)
                    await asyncio.sleep(self._retry_in)
                    self._retry_in = None
                self._set_state(State.CONNECTING, None if first else "retry")
                first = False
                step, renew = await self._attempt(renew), False
                if step.action is Action.RENEW:
                    if self._renewed or not (self._credentials.renewable or step.again):
                        step = Next(Action.STOP, UNAUTHORIZED, step.detail)
                    else:  # one more try, with a new token or login (or the same: Next.again)
                        self._renewed = renew = True
                        wait = self._backoff.jitter(self._backoff.min_delay)
                        step = Next(Action.RETRY, step.reason, step.detail, wait=wait)
                elif step.action is Action.FRESH:
                    self._streams.forget()
                    step = Next(Action.RETRY, step.reason, step.detail, wait=0.0)
                if step.action is Action.STOP:
                    return
        except asyncio.CancelledError:
            step = Next(Action.STOP, CLOSED)
            raise
        finally:
            self._ws = None
            self._events.end()
            self._retry_in = None
            self._set_state(State.CLOSED, step.reason, step.detail)
            self._inbox.end()
            if self._welcomed is not None and not self._welcomed.done():
                self._welcomed.set_exception(ClientError(step.reason, step.detail))
                self._welcomed.exception()  # retrieved: connect() may never be awaited

    def _wait(self, step: Next) -> float:
        if step.wait is not None:
            return step.wait
        if step.soon:
            return self._backoff.jitter(RESTART_JITTER)
        return self._backoff.delay(step.failures)

    async def _attempt(self, renew: bool) -> Next:
        """One connection, from credentials to its end; what follows it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        try:
            headers, query = await self._credentials.handshake(renew, self.connect_timeout)
        except LoginError as exc:
            if exc.status is None:
                return Next(Action.RETRY, UNREACHABLE, exc.detail)
            detail = f"the login was refused ({exc.status}): {exc.detail}"
            if exc.status in (400, 401, 403):
                return Next(Action.STOP, UNAUTHORIZED, detail)
            if exc.status in (404, 405):  # no login there: a wrong URL, not a passing fault
                return Next(Action.STOP, REFUSED, detail + f" (is {self.url} wsfanout's?)")
            return Next(Action.RETRY, REFUSED, detail, wait=exc.retry_after)
        except NoCredential as exc:
            return Next(Action.STOP, UNAUTHORIZED, str(exc))
        except Exception as exc:  # get_token() failed: try again later
            log.warning("get_token() raised: %r", exc)
            return Next(Action.RETRY, TOKEN_FAILED, f"get_token() raised {exc!r}")
        resume = self._streams.resume()
        if resume is not None:
            query["resume"] = resume
        options: dict[str, Any] = {"ssl": self._ssl} if self._ssl is not None else {}
        try:
            ws = await ws_connect(
                _with_query(self.url, query),
                additional_headers={**self._headers, **headers},
                max_size=self.max_size,
                open_timeout=max(deadline - loop.time(), 0.001),
                close_timeout=CLOSE_TIMEOUT,
                **options,
            )
        except InvalidStatus as exc:
            response = exc.response
            retry_after = response.headers.get("retry-after")
            return after_refusal(response.status_code, retry_after, resume is not None)
        except TimeoutError:
            return Next(Action.RETRY, TIMEOUT, "the handshake timed out")
        except OSError as exc:
            return Next(Action.RETRY, UNREACHABLE, str(exc) or type(exc).__name__)
        except InvalidHandshake as exc:
            return Next(Action.RETRY, CONNECTION_LOST, str(exc) or type(exc).__name__)
        return await self._serve(ws, resume is not None, deadline)

    async def _serve(self, ws: ClientConnection, resuming: bool, deadline: float) -> Next:
        """Read one connection until it ends (or brings no welcome by ``deadline``)."""
        self._ws = ws
        self._events.begin(resuming)
        loop = asyncio.get_running_loop()
        welcomed_at: float | None = None
        last_error: str | None = None  # the code of the last error frame given to the app
        try:
            while True:
                try:
                    if welcomed_at is None:
                        async with asyncio.timeout_at(deadline):
                            frame = await ws.recv()
                    else:
                        frame = await ws.recv()
                except TimeoutError:
                    await _goodbye(ws)
                    return Next(Action.RETRY, TIMEOUT, "no welcome in time")
                except ConnectionClosed as exc:
                    code = exc.rcvd.code if exc.rcvd is not None else 1006
                    break
                events = self._events.take(frame)
                for event in events:
                    if event.get("type") == "error":
                        last_error = event.get("code")
                if welcomed_at is None and self._state is State.CONNECTED:
                    welcomed_at = loop.time()
                await self._inbox.put(events)
        finally:
            self._ws = None
            replayed = self._events.end()
        await self._inbox.put(replayed)  # ended before resumed: what was replayed
        if welcomed_at is not None:
            self._backoff.lived(loop.time() - welcomed_at)
        return after_close(code, by_application=self._closing, last_error=last_error)

    def _welcome(self) -> None:
        self._renewed = False
        self._set_state(State.CONNECTED, None)
        if self._welcomed is not None and not self._welcomed.done():
            self._welcomed.set_result(None)

    def _learn(self, stream: str) -> None:
        """Ask for a joined group's epoch (a history answer of no messages), so that it
        can be resumed too; without an answer, the next resumed names it lost."""

        async def ask() -> None:
            with contextlib.suppress(ClientError):
                await self.history(stream, 0)

        task = asyncio.create_task(ask())
        self._learning.add(task)
        task.add_done_callback(self._learning.discard)

    async def _request(self, frame: dict[str, Any]) -> dict[str, Any]:
        ws = self._ws
        if ws is None or self._state is not State.CONNECTED:
            raise ClientError("disconnected", f"the client is {self._state.value}")
        frame_id = str(next(self._ids))
        frame["id"] = frame_id
        future = self._events.expect(frame_id)
        try:
            await ws.send(orjson.dumps(frame).decode())
            async with asyncio.timeout(self.request_timeout):
                return await future
        except ConnectionClosed:
            raise ClientError("disconnected", "the connection ended before the answer") from None
        except TimeoutError:
            raise ClientError("timeout", f"no answer within {self.request_timeout:g} s") from None
        finally:
            self._events.forget(frame_id)
            if future.done() and not future.cancelled():
                # The connection's end may have failed the answer while send() was still
                # waiting to write (a full socket): what was raised is the answer, so that
                # asyncio does not log it as "never retrieved".
                future.exception()


async def _goodbye(ws: ClientConnection) -> None:
    """Close with 1000, reading (and dropping) what is still on its way meanwhile: with the
    application behind, websockets has stopped reading, and the server's answer to the
    close would wait behind the frames it did not read."""

    async def drain() -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.recv()

    draining = asyncio.create_task(drain())
    try:
        with contextlib.suppress(Exception):
            await ws.close()
    finally:
        draining.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await draining


def _with_query(url: str, extra: dict[str, str]) -> str:
    if not extra:
        return url
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    query = [(name, value) for name, value in query if name not in extra]
    query += list(extra.items())
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))
