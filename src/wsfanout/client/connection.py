"""The client: one task that connects, reads and reconnects; the application's side of it
(events to iterate, requests to await).

Theory of operation. ``connect()`` starts the runner task and waits for the first
``welcome``. The runner loops: credentials (a token, ``get_token()``, or the session cookie
from logging in), a handshake that carries the positions (``?resume=``), then reading frames
until the connection ends; ``reconnect.py`` says what follows, and the runner waits and goes
round again, or stops. Each frame is one event or an array of them: answers to requests
(``ack``, an ``error`` or ``presence`` or ``history`` with our ``id``) settle their futures;
everything else goes to the application through a bounded buffer, after ``streams.py`` has
dropped what it already gave (a ``joined`` group's epoch, which no welcome gave, is asked
for with a history request of no messages). When the buffer (``inbox.py``) is full the
runner stops reading: the socket's buffers fill, the server finds a slow consumer and closes
(1013), and the client comes back and resumes where the application is: memory stays
bounded, and what the server can no longer replay is named lost. Requests sent while not
connected fail at once with ``disconnected``; those in flight when a connection ends fail
with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import itertools
import logging
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, Final

import orjson
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from .inbox import Inbox
from .login import LoginError, log_in
from .reconnect import RESTART_JITTER, Action, Backoff, Next, after_close, after_refusal
from .streams import Streams

log = logging.getLogger(__name__)

MIB: Final = 1024 * 1024
UNAUTHORIZED: Final = "unauthorized"
TokenSource = Callable[[], "str | Awaitable[str | None] | None"]
StateListener = Callable[[str, str], None]
_ANSWERS: Final = frozenset({"ack", "error", "presence", "history"})


class State(enum.StrEnum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"  # will retry
    CLOSED = "closed"  # will not: closed by the application, or refused for good


class ClientError(Exception):
    """A request or a connection that failed. ``code``: the server's error code
    (``forbidden``, ``unknown_group``, …), or the client's own: ``disconnected`` (not
    connected, or the connection ended before the answer), ``timeout``, ``unauthorized``
    (refused for good: no credential the server takes), ``refused``, ``closed``."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail


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
        # Reconnecting
        min_delay: float = 0.5,  # seconds, the first backoff ceiling
        max_delay: float = 20.0,  # seconds, the backoff's ceiling
        reset_after: float = 10.0,  # seconds a connection lives to start the backoff over
        # Timeouts
        request_timeout: float = 10.0,  # seconds for an ack or an answer
        open_timeout: float = 10.0,  # seconds for a login or a handshake
        # Limits
        max_queue: int = 10_000,  # events held for the application before reading stops
        max_size: int | None = 16 * MIB,  # bytes in one frame from the server
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        scheme = urllib.parse.urlsplit(url).scheme
        if scheme not in ("ws", "wss"):
            raise ValueError(f"expected a ws:// or wss:// URL, got {url!r}")
        if (username is None) != (password is None):
            raise ValueError("give username and password together")
        if sum(given is not None for given in (username, token, get_token)) > 1:
            raise ValueError("give one of username and password, token, get_token")
        self.url = url
        self.request_timeout = request_timeout
        self.open_timeout = open_timeout
        self.max_size = max_size
        self._username, self._password = username, password
        self._token, self._get_token = token, get_token
        self._ssl = ssl_context
        self._on_state = on_state
        self._streams = Streams(positions)
        self._backoff = Backoff(min_delay, max_delay, reset_after)
        self._state, self._reason = State.CLOSED, "not connected yet"
        self._cookie: str | None = None
        self._renewed = False  # the credential was renewed since the last welcome
        self._ws: ClientConnection | None = None
        self._runner: asyncio.Task[None] | None = None
        self._welcomed: asyncio.Future[None] | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._inbox = Inbox(max_queue)
        self._learning: set[asyncio.Task[None]] = set()  # epochs asked for (joined groups)
        self._closing = False  # the application called close()
        self._retry_in: float | None = None

    # -- what the application sees --------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def reason(self) -> str:
        """Why the state is what it is (``unauthorized`` when refused for good)."""
        return self._reason

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
        self._closing = False
        self._inbox.reopen()
        self._welcomed = asyncio.get_running_loop().create_future()
        self._runner = asyncio.create_task(self._run(), name=f"wsfanout client {self.url}")

    def _set_state(self, state: State, reason: str) -> None:
        if (state, reason) == (self._state, self._reason):
            return
        self._state, self._reason = state, reason
        if self._on_state is not None:
            try:
                self._on_state(state.value, reason)
            except Exception:
                log.exception("on_state(%r, %r) raised", state.value, reason)

    async def _run(self) -> None:
        step = Next(Action.STOP, "closed")
        renew = first = True
        try:
            while True:
                if not first:
                    self._retry_in = self._wait(step)
                    self._set_state(State.DISCONNECTED, step.reason)
                    await asyncio.sleep(self._retry_in)
                    self._retry_in = None
                self._set_state(State.CONNECTING, "" if first else "reconnecting")
                first = False
                step, renew = await self._attempt(renew), False
                if step.action is Action.RENEW:
                    if self._renewed or (self._get_token is None and self._username is None):
                        step = Next(Action.STOP, UNAUTHORIZED, detail=step.reason)
                    else:
                        self._renewed = renew = True
                        step = Next(Action.RETRY, step.reason, wait=0.0)
                elif step.action is Action.FRESH:
                    self._streams.forget()
                    step = Next(Action.RETRY, step.reason, wait=0.0)
                if step.action is Action.STOP:
                    return
        except asyncio.CancelledError:
            step = Next(Action.STOP, "closed")
            raise
        finally:
            self._ws = None
            self._fail_pending()
            self._set_state(State.CLOSED, step.reason)
            self._retry_in = None
            self._inbox.end()
            if self._welcomed is not None and not self._welcomed.done():
                code = step.reason if step.reason in (UNAUTHORIZED, "closed") else "refused"
                self._welcomed.set_exception(ClientError(code, step.detail or step.reason))
                self._welcomed.exception()  # retrieved: connect() may never be awaited

    def _wait(self, step: Next) -> float:
        if step.wait is not None:
            return step.wait
        if step.soon:
            return self._backoff.jitter(RESTART_JITTER)
        return self._backoff.delay()

    async def _attempt(self, renew: bool) -> Next:
        """One connection, from credentials to its end; what follows it."""
        try:
            headers, query = await self._credentials(renew)
        except LoginError as exc:
            if exc.status in (400, 401, 403):
                return Next(
                    Action.STOP,
                    UNAUTHORIZED,
                    detail=f"the login was refused ({exc.status}): {exc.detail}",
                )
            return Next(Action.RETRY, str(exc), wait=exc.retry_after)
        except ClientError as exc:
            return Next(Action.STOP, exc.code, detail=exc.detail)
        except Exception as exc:  # get_token failed: as if the server was not reached
            log.warning("get_token() raised: %r", exc)
            return Next(Action.RETRY, f"get_token() raised {exc!r}")
        resume = self._streams.resume()
        if resume is not None:
            query["resume"] = resume
        try:
            ws = await ws_connect(
                _with_query(self.url, query),
                additional_headers=headers,
                max_size=self.max_size,
                ssl=self._ssl,
                open_timeout=self.open_timeout,
            )
        except InvalidStatus as exc:
            response = exc.response
            retry_after = response.headers.get("retry-after")
            return after_refusal(response.status_code, retry_after, resume is not None)
        except InvalidURI as exc:
            return Next(Action.STOP, str(exc))
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            return Next(Action.RETRY, _describe(exc))
        return await self._serve(ws)

    async def _credentials(self, renew: bool) -> tuple[dict[str, str], dict[str, str]]:
        """The handshake's headers and query: a token, or the session cookie."""
        if self._get_token is not None:
            token = self._get_token()
            if inspect.isawaitable(token):
                token = await token
            if not token:
                raise ClientError(UNAUTHORIZED, "get_token() gave no token")
            return {}, {"token": token}
        if self._token is not None:
            return {}, {"token": self._token}
        if self._username is not None and self._password is not None:
            if renew or self._cookie is None:
                self._cookie = None
                self._cookie = await log_in(
                    self.url,
                    self._username,
                    self._password,
                    timeout=self.open_timeout,
                    ssl_context=self._ssl,
                )
            return {"Cookie": self._cookie}, {}
        return {}, {}

    async def _serve(self, ws: ClientConnection) -> Next:
        """Read one connection until it ends."""
        self._ws = ws
        loop = asyncio.get_running_loop()
        welcomed_at: float | None = None
        try:
            while True:
                try:
                    frame = await ws.recv()
                except ConnectionClosed as exc:
                    code = exc.rcvd.code if exc.rcvd is not None else 1006
                    break
                events = self._take(frame)
                if welcomed_at is None and self._state is State.CONNECTED:
                    welcomed_at = loop.time()
                await self._inbox.put(events)
        finally:
            self._ws = None
            self._fail_pending()
        if welcomed_at is not None:
            self._backoff.lived(loop.time() - welcomed_at)
        return after_close(code, by_application=self._closing)

    def _take(self, frame: str | bytes) -> list[dict[str, Any]]:
        """The events of one frame for the application; answers settle their requests."""
        try:
            data = orjson.loads(frame)
        except orjson.JSONDecodeError:
            log.warning("ignored a frame that is not JSON: %.80r", frame)
            return []
        out: list[dict[str, Any]] = []
        for event in data if isinstance(data, list) else [data]:
            if not isinstance(event, dict):
                continue
            kind = event.get("type")
            if kind in _ANSWERS and self._answer(event):
                continue
            if kind == "message":
                if not self._streams.message(event):
                    continue
            elif kind == "welcome":
                made = self._streams.welcome(event)
                self._renewed = False
                self._set_state(State.CONNECTED, "welcome")
                if self._welcomed is not None and not self._welcomed.done():
                    self._welcomed.set_result(None)
                out.append(event)
                if made is not None:
                    out.append(made)
                continue
            elif kind == "resumed":
                event = self._streams.resumed(event)
            elif kind == "joined" and isinstance(event.get("group"), str):
                self._learn(self._streams.joined(event["group"]))
            elif kind == "left" and isinstance(event.get("group"), str):
                self._streams.left(event["group"])
            out.append(event)
        return out

    def _answer(self, event: dict[str, Any]) -> bool:
        """Settle the request this event answers; whether it answered one."""
        future = self._pending.pop(str(event.get("id")), None)
        if future is None or future.done():
            return False
        if event["type"] == "error":
            code = event.get("code")
            future.set_exception(ClientError(str(code), str(event.get("detail", ""))))
        else:
            if event["type"] == "history":
                self._streams.history(event)
            future.set_result(event)
        return True

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
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[frame_id] = future
        try:
            await ws.send(orjson.dumps(frame).decode())
            async with asyncio.timeout(self.request_timeout):
                return await future
        except ConnectionClosed:
            raise ClientError("disconnected", "the connection ended before the answer") from None
        except TimeoutError:
            raise ClientError("timeout", f"no answer within {self.request_timeout:g} s") from None
        finally:
            self._pending.pop(frame_id, None)

    def _fail_pending(self) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(
                    ClientError("disconnected", "the connection ended before the answer")
                )


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


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "the handshake timed out"
    return str(exc) or type(exc).__name__
