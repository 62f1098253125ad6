"""``create_app()``: the ASGI callable, its route table and its lifespan, and what the host
app's own code calls on it (DESIGN 12): ``publish``, ``publish_sync``, ``online``."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

from . import admin, collector, http, queries, views, ws
from .admission import Identity, refuse
from .config import ConfigError, Settings
from .hub import UnavailableError
from .protocol import ErrorCode, Source
from .publishing import ServiceUnavailableError
from .service import Service
from .store import DatabaseError, StoreError
from .tokens import KeyConfigError
from .types import Message, Receive, Scope, Send

log = logging.getLogger("wsfanout")

Handler = Callable[[Scope, Receive, Send, Service], Awaitable[None]]

ROUTES: Final[dict[str, dict[str, Handler]]] = {
    "/": {"GET": views.index},
    "/login": {"GET": views.login_page, "POST": views.login},
    "/logout": {"POST": views.logout},
    "/api/directory": {"GET": views.directory},
    "/api/publish": {"POST": views.publish_api},
    "/api/online": {"POST": views.online_api},
    "/healthz": {"GET": views.healthz},
    "/metrics": {"GET": views.metrics},
    **{path: methods for path, methods in admin.ROUTES.items() if "{" not in path},
}
# Routes with parameters: the path's segments, "{name}" standing for any one segment.
PATTERNS: Final = [
    (tuple(path.split("/")), methods) for path, methods in admin.ROUTES.items() if "{" in path
]
WEBSOCKET_PATHS: Final = frozenset({"/"})
PAGES: Final = frozenset({"/", "/login", "/logout"})  # not served with WSFANOUT_PAGES=off
HOST_THREADS: Final = 16  # threads for the host's plain (blocking) authenticate and hooks

T = TypeVar("T")


def match(scope: Scope, path: str) -> tuple[dict[str, Handler], dict[str, str]] | None:
    """The methods of the route this (normalised) path names, and the values of its
    parameters. Parameters are read from the path as sent: an empty one stays empty
    (``/api/users//password`` names no user), and one holding an encoded ``/`` matches
    no route."""
    methods = ROUTES.get(path)
    if methods is not None:
        return methods, {}
    if b"%2f" in bytes(scope.get("raw_path") or b"").lower():
        return None
    segments = _below_root(scope).split("/")
    for pattern, methods in PATTERNS:
        if len(pattern) == len(segments):
            params = {}
            for want, given in zip(pattern, segments, strict=True):
                if want.startswith("{"):
                    params[want[1:-1]] = given
                elif want != given:
                    break
            else:
                return methods, params
    return None


def _below_root(scope: Scope) -> str:
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class App:
    """The wsfanout ASGI application.

    Starts its parts on lifespan startup, or lazily on the first request when the
    server (or an enclosing app) does not forward lifespan events.
    """

    def __init__(
        self,
        settings: Settings,
        clock: Callable[[], float] = time.time,
        *,
        authenticate: Callable[[Any], Any] | None = None,
        hooks: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None
        self._authenticate = None if authenticate is None else self._as_async(authenticate)
        self._hook = None if hooks is None else self._as_async(hooks)
        self._service: Service | None = None
        self._starting: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shut = False  # shut down: only startup() starts it again, not a late request
        # wsfanout's own process (``wsfanout:app``), not a host's: WSFANOUT_GC=auto tunes
        # the garbage collector there (collector.py)
        self.owns_process = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        svc = self._service or await self._started()
        if svc is None:
            if kind == "websocket":
                await refuse(scope, send, 503, "the server is shut down")
            elif kind == "http":
                await http.error_response(send, 503, "The server is shut down")
            return
        path = http.route_path(scope)
        if kind == "websocket":
            if path in WEBSOCKET_PATHS:
                await ws.endpoint(scope, receive, send, svc, self.owns_process)
            else:
                await refuse(scope, send, 404, "no websocket endpoint here")
            return
        if kind != "http":
            return
        await self._http(scope, receive, send, svc, path)

    async def _http(
        self, scope: Scope, receive: Receive, send: Send, svc: Service, path: str | None
    ) -> None:
        method = scope["method"]
        if method == "HEAD":
            method = "GET"  # the server drops the body
        if path == "":
            await http.redirect(send, http.app_root(scope))
            return
        if path is not None and path.startswith("/static/"):
            if method != "GET":
                await http.error_response(
                    send, 405, "Method not allowed", [(b"allow", b"GET, HEAD")]
                )
                return
            await views.static(scope, receive, send, svc, path[len("/static/") :])
            return
        found = match(scope, path) if path is not None else None
        if found is None or (path in PAGES and not self.settings.pages):
            await _error(send, _below_root(scope), 404, "not_found", "Not found")
            return
        methods, params = found
        if not all(params.values()):  # /api/users//password names no user
            await _error(send, path, 404, "not_found", "Not found")
            return
        handler = methods.get(method)
        if handler is None:
            allow = ", ".join(sorted(methods)).encode()
            headers = [(b"allow", allow)]
            await _error(send, path, 405, "method_not_allowed", "Method not allowed", headers)
            return
        if params:
            scope = {**scope, "path_params": params}
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await handler(scope, receive, tracked_send, svc)
        except DatabaseError as exc:  # an outage, not a bug: one line, and 503
            svc.outages.failed(f"{method} {path} failed", exc)
            if not started:
                await _error(
                    send, path, 503, "unavailable", "The database is unavailable, try again"
                )
        except Exception:
            log.exception("error in %s %s", method, path)
            if not started:  # a JSON 500, never a traceback, to the client
                await http.error_response(send, 500, "Internal server error")

    @property
    def service(self) -> Service | None:
        """The running service (its hub, store, metrics), or None before start-up."""
        return self._service

    async def _started(self) -> Service | None:
        """The service, started on first use; None once the app was shut down (a request
        or a host's publish that comes late must not start a second service nobody stops)."""
        return None if self._shut else await self.startup()

    async def startup(self) -> Service:
        """Build the service, once, however many requests ask at once (again after a
        ``shutdown()``, when called)."""
        self._shut = False
        if self._service is not None:
            return self._service
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._service is None:
                self._service = await Service.start(
                    self.settings, self.drain, self.clock, self._authenticate, self._hook
                )
                self._loop = asyncio.get_running_loop()
                collector.tune(self.settings.gc, self.owns_process)
        return self._service

    async def publish(self, items: dict[str, Any] | list[dict[str, Any]]) -> int:
        """Publish from the host app's own code: one item or a list of up to 1,000, each
        as ``POST /api/publish`` takes it (``{"type": "group", "group": "girls", "text":
        "hi", "from": "shop"}``), with its limits and pacing, marked ``"via": "app"``.

        Returns:
            How many were published.

        Raises:
            PublishError: ``UnknownGroupError``, ``UnknownUserError``,
            ``MessageTooLargeError``, ``ServiceUnavailableError``, or ``PublishError``
            itself for a malformed item; nothing of a refused list is published.
        """
        svc = self._service or await self._started()
        if svc is None:
            raise ServiceUnavailableError(ErrorCode.UNAVAILABLE.value, "the app was shut down")
        return await svc.publishing.publish_items(items, Source.APP)

    def publish_sync(
        self, items: dict[str, Any] | list[dict[str, Any]], timeout: float = 10.0
    ) -> int:
        """``publish()`` from synchronous code in another thread than the app's event loop
        (a Django view under ASGI runs in one): it runs on the app's loop, and this thread
        waits for it, up to ``timeout`` seconds.

        Raises:
            PublishError: as ``publish()``; ``ServiceUnavailableError`` after ``timeout``
            (the publish is cancelled then: a list may have gone out in part).
            RuntimeError: the app has not started (no loop to run on), or this is the
            app's own loop (await ``publish()`` there).
        """
        loop = self._loop
        if loop is None or loop.is_closed():
            raise RuntimeError(
                "publish_sync() needs the running app: it starts with the server "
                "(lifespan or its first request), or with `await app.startup()`"
            )
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            raise RuntimeError(
                "publish_sync() was called on the app's own event loop, where waiting would "
                "block it: `await app.publish(...)` instead"
            )
        future = asyncio.run_coroutine_threadsafe(self.publish(items), loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise ServiceUnavailableError(
                ErrorCode.UNAVAILABLE.value, f"not published within {timeout:g} s"
            ) from None

    async def online(self, usernames: list[str]) -> dict[str, int]:
        """Which of these users (up to 1,000) are connected anywhere: ``{username:
        connections}`` for those who are, keyed as given.

        Raises:
            ValueError: not a list of up to 1,000 strings.
            ServiceUnavailableError: the backplane (Redis) cannot say now.
        """
        users = queries.usernames(usernames)
        svc = self._service or await self._started()
        if svc is None:
            raise ServiceUnavailableError(ErrorCode.UNAVAILABLE.value, "the app was shut down")
        try:
            return await queries.online(svc.hub, users)
        except UnavailableError as exc:
            raise ServiceUnavailableError(ErrorCode.UNAVAILABLE.value, str(exc)) from None

    async def drain(self) -> None:
        """Close every connection with 1001 (the server is stopping); serve nothing new."""
        if self._service is not None:
            await self._service.drain()

    async def shutdown(self) -> None:
        """Drain the connections, then close every part of the service.

        The service stays in place while it closes, so a request meanwhile meets a
        draining hub (503, ``unavailable``) instead of starting a second service.
        """
        self._shut = True
        svc = self._service
        if svc is not None:
            try:
                await svc.close()
            finally:
                self._service = None
                threads, self._threads = self._threads, None
                if threads is not None:  # a host function still blocking keeps its thread
                    threads.shutdown(wait=False, cancel_futures=True)

    def _as_async(self, function: Callable[[T], Any]) -> Callable[[T], Awaitable[Any]]:
        """The host's ``authenticate`` or ``hooks``: an async function as it is; a plain one
        run in a worker thread of the app's own (it may block: a database query), its
        answer awaited if it is awaitable. The app's own pool, of HOST_THREADS, so a host
        function that blocks for long holds up neither logins' password checks nor anything
        else on asyncio's default pool."""
        if inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(
            getattr(function, "__call__", None)  # noqa: B004 - an object with an async __call__
        ):
            return function

        async def in_thread(argument: T) -> Any:
            if self._threads is None:
                self._threads = concurrent.futures.ThreadPoolExecutor(
                    HOST_THREADS, thread_name_prefix="wsfanout-host"
                )
            loop = asyncio.get_running_loop()
            answer = await loop.run_in_executor(self._threads, function, argument)
            return await answer if inspect.isawaitable(answer) else answer

        return in_thread

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except (StoreError, OSError, KeyConfigError, ConfigError) as exc:  # it says it
                    log.error("cannot start: %s", exc)
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                except Exception as exc:
                    log.exception("startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _error(
    send: Send,
    path: str | None,
    status: int,
    code: str,
    detail: str,
    headers: http.Headers | None = None,
) -> None:
    """A routing error: under ``/api/`` with a ``code``, as the API's errors are."""
    if path is not None and path.startswith("/api/"):
        await http.api_error(send, status, code, detail, headers or [])
    else:
        await http.error_response(send, status, detail, headers or [])


def create_app(
    settings: Settings | None = None,
    *,
    authenticate: Callable[[Any], Awaitable[Identity | None] | Identity | None] | None = None,
    hooks: Callable[[dict[str, Any]], Awaitable[None] | None] | None = None,
    clock: Callable[[], float] = time.time,
) -> App:
    """The ASGI app for these settings (default: ``Settings.from_env()``).

    Args:
        authenticate: the host app's ``authenticate(scope)``, tried first at every
            handshake and every request that asks who the user is: an ``Identity`` or
            None (then wsfanout's own cookie or token decides). A plain function runs in a
            worker thread (it may block); an async one on the event loop.
        hooks: called with each lifecycle event (a dict: DESIGN 12), one at a time, off
            the fan-out path; a plain function runs in a worker thread.
        clock: seconds since the epoch; decides when sessions expire (tests pass their own).
    """
    return App(
        settings if settings is not None else Settings.from_env(),
        clock,
        authenticate=authenticate,
        hooks=hooks,
    )
