"""The running service: its parts built and closed in one place, and nothing else.

``Service.start(settings)`` reads (or makes) the secret key, opens the store, finds what
the server can do (``servers/``), builds the hub (with its backplane when Redis is
configured) and the collaborators the handlers work through: ``admission.py`` (who may
connect, with the host app's ``authenticate``), ``publishing.py`` (resolving targets,
validating batches) and ``control.py`` (revocations, membership changes), which share one
``OutageLog``, and ``hooks.py`` (lifecycle events to the host's callable and a webhook);
then it starts the RabbitMQ source. ``close()`` takes them down in the reverse order,
draining every connection with 1001 first; the lifecycle events last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import InitVar, dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Final

from . import protocol
from .admission import Admission, Authenticate
from .backplane import Backplane, LocalBackplane
from .config import ConfigError, Settings, redact
from .control import Control
from .flusher import Flusher
from .history import History
from .hooks import Hook, Hooks
from .hub import Hub
from .idempotency import RecentKeys
from .inbound import SlowLane
from .metrics import Metrics, ServiceStats
from .outage import OutageLog
from .protocol import CloseCode
from .publishing import Publishing
from .servers import PeerLimits, ServerReach, warn_if_workers_are_islands
from .sessions import SessionCodec
from .store import DatabaseError, Store
from .throttle import DatabaseCounts, FailureCounts, LoginThrottle
from .tokens import TokenVerifier
from .webhooks import Webhook

if TYPE_CHECKING:
    from .sources.amqp import AmqpSource

log = logging.getLogger(__name__)

SHUTDOWN_FLUSH: Final = 5.0  # seconds connections get to send what is queued before stopping
CLOSE_BATCH: Final = 1000  # connections closed (1001) at a time on shutdown ...
CLOSE_PAUSE: Final = 0.01  # ... this many seconds apart
REDIS_FIRST_TRY: Final = 3.0  # seconds the ready line waits to know whether Redis answers
CONTENT_TYPES: Final = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
}


@dataclass
class Service:
    """The parts the handlers share: built by ``start()``, taken down by ``close()``."""

    settings: Settings
    store: Store
    hub: Hub
    codec: SessionCodec
    web: dict[str, tuple[bytes, bytes]]
    server: ServerReach
    flusher: Flusher = field(default_factory=Flusher)
    slow_lane: SlowLane = field(default_factory=SlowLane)  # refused and over-rate frames
    amqp: AmqpSource | None = None
    stats: ServiceStats = field(default_factory=ServiceStats)
    tokens: TokenVerifier = field(default_factory=TokenVerifier)
    outages: OutageLog = field(default_factory=OutageLog)
    hooks: Hooks = field(default_factory=lambda: Hooks(""))
    # Where failed logins are counted: given by start() (in Redis with the Redis engine),
    # else in the database.
    failure_counts: InitVar[FailureCounts | None] = None
    authenticate: InitVar[Authenticate | None] = None
    throttle: LoginThrottle = field(init=False)
    admission: Admission = field(init=False)
    publishing: Publishing = field(init=False)
    control: Control = field(init=False)
    metrics: Metrics = field(init=False)

    def __post_init__(
        self, failure_counts: FailureCounts | None, authenticate: Authenticate | None
    ) -> None:
        settings, store, hub, outages = self.settings, self.store, self.hub, self.outages
        self.admission = Admission(
            settings, store, hub, self.codec, self.tokens, outages, authenticate
        )
        outside = self.tokens.enabled or authenticate is not None
        self.publishing = Publishing(settings, store, hub, outages, outside=outside)
        self.control = Control(store, hub, outages)
        self.throttle = LoginThrottle(
            failure_counts if failure_counts is not None else DatabaseCounts(store),
            self.settings.login_max_failures,
            self.settings.login_failure_window,
        )
        self.metrics = Metrics(self.hub, self.flusher.stats, self.stats)
        self.metrics.hooks = self.hooks.stats

    @classmethod
    async def start(
        cls,
        settings: Settings,
        on_stopping: Callable[[], Awaitable[None]],
        clock: Callable[[], float] = time.time,
        authenticate: Authenticate | None = None,
        hook: Hook | None = None,
    ) -> Service:
        """Build every part; ``on_stopping`` is awaited when the server starts stopping.

        ``clock`` tells session ages (tests pass their own instead of waiting);
        ``authenticate`` and ``hook`` are the host app's (DESIGN 12), made async.
        """
        keys = await asyncio.to_thread(secret_keys, settings.secret_keys, settings.data_dir)
        if settings.database_url and not settings.secret_keys:
            log.warning(
                "WSFANOUT_DATABASE_URL is set but WSFANOUT_SECRET_KEY is not: this node signs "
                "cookies with its own key (in %s), which other nodes refuse",
                settings.data_dir,
            )
        web = await asyncio.to_thread(load_web_files)
        async with contextlib.AsyncExitStack() as opened:  # closes what opened if a step fails
            store = await Store.open(
                settings.database_target,
                pool_size=settings.database_pool_size,
                keep_trying=True,
            )
            opened.push_async_callback(store.close)
            server = ServerReach(
                compression=settings.compression,
                on_stopping=on_stopping,
                frame_limit=settings.max_frame_bytes,
                too_large=protocol.too_large(settings.max_frame_bytes),
                peers=PeerLimits(
                    head_timeout=settings.head_timeout,
                    waiting=settings.max_waiting_per_address,
                    connections=settings.max_connections_per_address,
                ),
            )
            server.start()
            opened.push_async_callback(server.close)
            backplane: Backplane
            redis_link = None  # the Redis engine's, to tell in the ready line how it is
            counts: FailureCounts | None = None  # None: in the database (every node shares it)
            if settings.redis_url:
                # redis-py is imported only when it is used (as aio-pika is).
                from .backplane.redis import RedisBackplane
                from .backplane.redis.failures import RedisCounts

                backplane = RedisBackplane(
                    settings.redis_url,
                    settings.redis_prefix,
                    history_size=settings.history_size if settings.history_on else 0,
                    history_ttl=settings.history_ttl,
                    idempotency_ttl=settings.idempotency_ttl,
                )
                opened.push_async_callback(backplane.close)
                redis_link = backplane.link
                counts = RedisCounts(redis_link)  # every node sees them at once
            else:
                warn_if_workers_are_islands()
                history = None
                if settings.history_on and settings.history_bytes > 0:  # in memory
                    history = History(
                        settings.history_size,
                        settings.history_ttl,
                        max_bytes=settings.history_bytes,
                    )
                backplane = LocalBackplane(history, RecentKeys(settings.idempotency_ttl))
            tokens = TokenVerifier(settings.jwt_secret, settings.jwt_public_key, clock=clock)
            hub = Hub(backplane, settings.pace_timeout)
            webhook = None
            if settings.webhook_url:
                try:
                    webhook = Webhook(
                        settings.webhook_url,
                        settings.webhook_secret,
                        queue_max=settings.webhook_queue,
                    )
                except ValueError as exc:
                    raise ConfigError(
                        "WSFANOUT_WEBHOOK_URL",
                        redact(settings.webhook_url),
                        f"a URL the webhooks can be posted to ({exc})",
                    ) from None
            hooks = Hooks(backplane.node, hook, webhook)
            svc = cls(
                settings=settings,
                store=store,
                hub=hub,
                codec=SessionCodec(keys, settings.session_max_age, clock),
                web=web,
                server=server,
                tokens=tokens,
                hooks=hooks,
                failure_counts=counts,
                authenticate=authenticate,
            )
            if hook is not None:
                svc.metrics.hooks = hooks.stats
            svc.metrics.webhook = webhook
            hooks.start()
            opened.push_async_callback(hooks.close)
            hub.start(svc.control.apply, svc.control.missed, hooks.emit)
            with contextlib.suppress(DatabaseError):  # not reached yet: it says so itself
                pruned = await store.prune(settings.session_max_age, settings.login_failure_window)
                if pruned:
                    log.info("dropped %d expired sessions", pruned)
                # Nobody could log in; with tokens or the host's authenticate, users may
                # come from elsewhere, and an empty store is no mistake.
                if authenticate is None and not tokens.enabled and not await store.has_users():
                    log.warning("no users yet: run `wsfanout demo` or `wsfanout user add`")
            opened.push_async_callback(svc.flusher.close)
            if settings.amqp_url:
                from .sources import amqp  # aio-pika is imported only when it is used

                svc.amqp = amqp.start(settings, svc.publishing)
                svc.metrics.amqp = svc.amqp.stats
            opened.pop_all()  # started: close() takes them down from now on
        degraded = ""
        if redis_link is not None:
            # A node starts without Redis (it must outlive Redis restarts), but says so.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REDIS_FIRST_TRY):
                    await redis_link.tried.wait()
            if not redis_link.healthy:
                degraded = (
                    f" (degraded: Redis at {redact(settings.redis_url)} unreachable: "
                    f"{redis_link.reason.rstrip('.')}; logins and publishing answer 503 "
                    "until it is back)"
                )
        log.info(
            "wsfanout ready under %s (%s loop): %s %s%s, %s, permessage-deflate %s%s",
            server.name,
            type(asyncio.get_running_loop()).__module__.split(".")[0],  # asyncio or uvloop
            store.kind,
            store.where,
            "" if store.ready else " (not reached yet: trying again)",
            "Redis backplane" if settings.redis_url else "one node (no backplane)",
            server.deflate,
            degraded,
        )
        return svc

    async def drain(self) -> None:
        """Stop accepting and publishing; close every connection with 1001 (in batches)
        once it has sent what is queued; wait for them up to a deadline. A connection whose
        client does not read what is queued is reset before the server would cancel it."""
        by = self.server.flush_by(SHUTDOWN_FLUSH)
        try:
            async with asyncio.timeout(SHUTDOWN_FLUSH):
                await self.hub.drain(CloseCode.GOING_AWAY, CLOSE_BATCH, CLOSE_PAUSE, by)
                await self.hub.emptied()
        except TimeoutError:
            log.warning(
                "%d connections still open after %g s of draining", len(self.hub), SHUTDOWN_FLUSH
            )

    async def close(self) -> None:
        """Take no more from the queue, drain the connections, then close everything;
        a part that fails to close does not keep the others open."""
        try:
            if self.amqp is not None:
                await self.amqp.close()  # unacked messages go back to the queue
            await self.drain()
        finally:
            try:
                await self.server.close()
                await self.admission.close()
                await self.control.close()
                await self.hub.close()
                await self.flusher.close()
                await self.hub.backplane.close()
                await self.hooks.close()  # after the backplane: its last offline events
            finally:
                await self.store.close()


def load_web_files() -> dict[str, tuple[bytes, bytes]]:
    """Every servable file in the packaged ``web/`` folder: name -> (body, content type)."""
    files: dict[str, tuple[bytes, bytes]] = {}
    for entry in resources.files("wsfanout.web").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in CONTENT_TYPES and not entry.name.startswith("."):
            files[entry.name] = (entry.read_bytes(), CONTENT_TYPES[suffix])
    return files


def secret_keys(configured: tuple[str, ...], data_dir: Path) -> tuple[str, ...]:
    """The configured keys, or one generated once into ``data_dir/secret_key``.

    Several workers may start at once: the file is created exclusively, and a
    worker that loses the race reads the winner's key. Blocking: run it in a thread.
    """
    if configured:
        return configured
    path = data_dir / "secret_key"
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):
            key = path.read_text().strip()
            if key:
                return (key,)
            time.sleep(0.01)  # the winner has created it but not written it yet
        raise RuntimeError(f"{path} is empty: delete it or set WSFANOUT_SECRET_KEY") from None
    key = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    log.warning(
        "WSFANOUT_SECRET_KEY is not set: generated one into %s. Set it explicitly when "
        "several machines serve the same users.",
        path,
    )
    return (key,)
