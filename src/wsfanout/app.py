"""``create_app()``: the ASGI callable, its route table and its lifespan."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

from . import http, views, ws
from .backplane import Backplane, BackplaneUnavailableError
from .config import Settings
from .hub import Hub, HubClosedError
from .protocol import CloseCode, ErrorCode
from .servers import ServerReach
from .sessions import SessionCodec, secret_keys
from .store import Store
from .types import Message, Receive, Scope, Send
from .views import Service

log = logging.getLogger("wsfanout")

Handler = Callable[[Scope, Receive, Send, Service], Awaitable[None]]

ROUTES: Final[dict[str, dict[str, Handler]]] = {
    "/": {"GET": views.index},
    "/login": {"GET": views.login_page, "POST": views.login},
    "/logout": {"POST": views.logout},
    "/api/directory": {"GET": views.directory},
    "/api/publish": {"POST": views.publish_api},
    "/healthz": {"GET": views.healthz},
    "/metrics": {"GET": views.metrics},
}
WEBSOCKET_PATHS: Final = frozenset({"/"})
SHUTDOWN_FLUSH: Final = 5.0  # seconds connections get to send what is queued before stopping
CLOSE_BATCH: Final = 1000  # connections closed (1001) at a time on shutdown ...
CLOSE_PAUSE: Final = 0.01  # ... this many seconds apart


class App:
    """The wsfanout ASGI application.

    Starts its parts on lifespan startup, or lazily on the first request when the
    server (or an enclosing app) does not forward lifespan events.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._service: Service | None = None
        self._starting: asyncio.Lock | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        svc = self._service or await self.startup()
        path = http.route_path(scope)
        if kind == "websocket":
            if path in WEBSOCKET_PATHS:
                await ws.endpoint(scope, receive, send, svc)
            else:
                await ws.refuse(scope, send, 404, "no websocket endpoint here")
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
        methods = ROUTES.get(path) if path is not None else None
        if methods is None:
            await http.error_response(send, 404, "Not found")
            return
        handler = methods.get(method)
        if handler is None:
            allow = ", ".join(sorted(methods)).encode()
            await http.error_response(send, 405, "Method not allowed", [(b"allow", allow)])
            return
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await handler(scope, receive, tracked_send, svc)
        except Exception:
            log.exception("error in %s %s", method, path)
            if not started:  # a JSON 500, never a traceback, to the client
                await http.error_response(send, 500, "Internal server error")

    async def startup(self) -> Service:
        """Open the store and build the hub, once, however many requests ask at once."""
        if self._service is not None:
            return self._service
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._service is None:
                settings = self.settings
                keys = await asyncio.to_thread(secret_keys, settings.secret_keys, settings.data_dir)
                store = await Store.open(settings.database_path)
                web = await asyncio.to_thread(views.load_web_files)
                server = ServerReach(compression=settings.compression, on_stopping=self.drain)
                server.start()
                hub = Hub()
                if settings.redis_url:
                    backplane = Backplane(settings.redis_url, settings.redis_prefix, hub.deliver)
                    hub.attach(backplane)
                    backplane.start()
                else:
                    _warn_if_workers_are_islands()
                self._service = Service(
                    settings=settings,
                    store=store,
                    hub=hub,
                    codec=SessionCodec(keys, settings.session_max_age),
                    web=web,
                    server=server,
                )
                if settings.amqp_url:
                    self._start_amqp(self._service)
                log.info(
                    "wsfanout ready: database %s, %s, permessage-deflate %s",
                    settings.database_path,
                    "Redis backplane" if settings.redis_url else "one node (no backplane)",
                    "accepted" if settings.compression else "declined",
                )
        return self._service

    async def drain(self) -> None:
        """Stop accepting and publishing; close every connection with 1001 (in batches)
        once it has sent what is queued; wait for them up to a deadline."""
        svc = self._service
        if svc is None:
            return
        try:
            async with asyncio.timeout(SHUTDOWN_FLUSH):
                await svc.hub.drain(CloseCode.GOING_AWAY, CLOSE_BATCH, CLOSE_PAUSE)
                await svc.hub.emptied()
        except TimeoutError:
            log.warning(
                "%d connections still open after %g s of draining", len(svc.hub), SHUTDOWN_FLUSH
            )

    async def shutdown(self) -> None:
        """Drain the connections, then close the store."""
        svc = self._service
        if svc is None:
            return
        if svc.amqp is not None:
            await svc.amqp.close()  # take no more from the queue; unacked ones go back
        await self.drain()
        await svc.server.close()
        await svc.flusher.close()
        if svc.hub.backplane is not None:
            await svc.hub.backplane.close()
        await svc.store.close()
        self._service = None

    def _start_amqp(self, svc: Service) -> None:
        """Consume the RabbitMQ queue into the hub (through the backplane, if any)."""
        from .sources.amqp import AmqpSource, Rejected, Retry

        async def handle(data: object) -> None:
            try:
                batch = await svc.validate_batch(data)
            except views.BatchError as exc:
                if exc.code is ErrorCode.UNAVAILABLE:
                    raise Retry(exc.detail) from None
                raise Rejected(f"item {exc.index}: {exc.code}: {exc.detail}") from None
            try:
                await svc.publish_batch(batch, "amqp")
            except (HubClosedError, BackplaneUnavailableError) as exc:
                raise Retry(str(exc)) from None

        settings = self.settings
        svc.amqp = AmqpSource(
            settings.amqp_url,
            settings.amqp_queue,
            settings.amqp_prefetch,
            handle,
            connection_name=f"wsfanout {settings.amqp_queue} pid {os.getpid()}",
        )
        svc.amqp.start()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    log.exception("startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _warn_if_workers_are_islands() -> None:
    """Without a backplane, several worker processes each fan out to their own sockets only."""
    parent = multiprocessing.parent_process()
    if parent is None or parent.pid is None:
        return
    try:
        siblings = Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split()
    except OSError:
        return
    if len(siblings) > 1:
        log.warning(
            "%d worker processes and no WSFANOUT_REDIS_URL: each worker fans out only to its "
            "own connections, so users on different workers do not see each other's messages. "
            "Set WSFANOUT_REDIS_URL, or run one worker.",
            len(siblings),
        )


def create_app(settings: Settings | None = None) -> App:
    """The ASGI app for these settings (default: ``Settings.from_env()``)."""
    return App(settings if settings is not None else Settings.from_env())
