"""The running service: its parts built and closed in one place, and publishing.

``Service.start(settings)`` opens the store, reads (or makes) the secret key, builds the
hub (with its backplane when Redis is configured), finds what the server can do
(``servers.py``) and starts the RabbitMQ source; ``close()`` takes them down in the
reverse order, draining every connection with 1001 first. ``ws.py`` and ``views.py``
are siblings that both publish through here: ``publish()`` resolves a message's target
(the local index first, then the store) and hands it to the hub's one door;
``validate_batch()`` / ``publish_batch()`` do the same for a backend's batch, all or
nothing.

Who a request is (``credentials()``, then ``confirm()`` against the store: a live cookie
session, or a connection token) is decided here too, for both siblings. So are the
operator's changes (``control()``: revocations, memberships), carried out on this node's
caches and connections (``apply()``) and told to the others through the backplane; the
last minute of them is remembered (``changes``), so that a handshake under way when one
was made does not slip past it (``changed_since()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import logging
import math
import os
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from . import http, protocol
from .backplane import Backplane, BackplaneUnavailableError, LocalBackplane
from .backplane.redis import RedisBackplane
from .config import Settings
from .history import History
from .hub import Hub, UnavailableError
from .metrics import Metrics, ServiceStats
from .outbox import Flusher
from .protocol import CloseCode, ErrorCode, Kind, ProtocolError, Publish, Source
from .servers import ServerReach, warn_if_workers_are_islands
from .sessions import COOKIE_NAME, Session, SessionCodec
from .store import GROUP_RE, USERNAME_RE, DatabaseError, Store, UnknownUserError
from .throttle import LoginThrottle, failure_counts
from .tokens import Claims, TokenError, TokenVerifier
from .types import Scope

if TYPE_CHECKING:
    from .sources.amqp import AmqpSource

log = logging.getLogger(__name__)

MAX_BATCH: Final = 1000  # messages in one backend publish
SHUTDOWN_FLUSH: Final = 5.0  # seconds connections get to send what is queued before stopping
CLOSE_BATCH: Final = 1000  # connections closed (1001) at a time on shutdown ...
CLOSE_PAUSE: Final = 0.01  # ... this many seconds apart
CONTENT_TYPES: Final = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
}


CHANGES_MEMORY: Final = 60.0  # seconds a change is remembered, for handshakes under way
CHANGES_MAX: Final = 10_000  # past this many, forgotten ones are dropped at each change
REVOKED: Final = "the session was revoked: log in again"
OUTAGE_LOG_EVERY: Final = 10.0  # seconds between lines about requests an outage failed
TOKEN_QUERY: Final = b"token="


@dataclass(frozen=True, slots=True)
class Login:
    """Who a request or a connection is: a live cookie session, or a connection token."""

    username: str
    first_name: str
    groups: tuple[str, ...]
    expires_at: float
    session_id: str | None  # None: a token


class BatchError(Exception):
    """One item of a backend's batch is bad; ``index`` says which."""

    def __init__(self, index: int, code: ErrorCode, detail: str) -> None:
        super().__init__(f"item {index}: {code}: {detail}")
        self.index = index
        self.code = code
        self.detail = detail


class Seats:
    """Connections this process holds, in all and per user.

    A seat is taken during the handshake before anything is awaited, and given back only
    once the connection is closed, so the limits hold however many handshakes run at once
    and count the connections still being closed.
    """

    def __init__(self, total: int, per_user: int) -> None:
        self.total = total
        self.per_user = per_user
        self.taken = 0
        self._users: dict[str, int] = {}

    def take(self, user: str) -> str | None:
        """Take a seat for this user; or say which limit is full ("total", "user")."""
        if self.taken >= self.total:
            return "total"
        key = user.lower()
        held = self._users.get(key, 0)
        if held >= self.per_user:
            return "user"
        self.taken += 1
        self._users[key] = held + 1
        return None

    def give_back(self, user: str) -> None:
        key = user.lower()
        held = self._users.get(key, 0)
        if held <= 0:
            raise RuntimeError(f"no seat of {user!r} to give back")
        self.taken -= 1
        if held == 1:
            del self._users[key]
        else:
            self._users[key] = held - 1


class Deadlines:
    """Things to expire at a time, checked once a second by one task.

    Kept in buckets of whole seconds, so tens of thousands of connections cost one task
    and no timer, handle or context each (every object a connection keeps is walked at
    each full garbage collection). An item's ``expire()`` is called at most once, about a
    second late at most.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._buckets: dict[int, set[Any]] = {}
        self._due: list[int] = []  # a heap of the buckets' seconds
        self._task: asyncio.Task[None] | None = None

    def add(self, when: float, item: Any) -> None:
        second = math.ceil(when)
        bucket = self._buckets.get(second)
        if bucket is None:
            bucket = self._buckets[second] = set()
            heapq.heappush(self._due, second)
        bucket.add(item)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="wsfanout-deadlines"
            )

    def discard(self, when: float, item: Any) -> None:
        second = math.ceil(when)
        bucket = self._buckets.get(second)
        if bucket is not None:
            bucket.discard(item)
            if not bucket:
                del self._buckets[second]  # its second stays in the heap until it is due

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = self.clock()
            while self._due and self._due[0] <= now:
                for item in self._buckets.pop(heapq.heappop(self._due), ()):
                    try:
                        item.expire()
                    except Exception:
                        log.exception("expiring %r failed", item)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


@dataclass
class Service:
    """What the handlers share: built by ``start()``, taken down by ``close()``."""

    settings: Settings
    store: Store
    hub: Hub
    codec: SessionCodec
    web: dict[str, tuple[bytes, bytes]]
    server: ServerReach
    flusher: Flusher = field(default_factory=Flusher)
    amqp: AmqpSource | None = None
    stats: ServiceStats = field(default_factory=ServiceStats)
    throttle: LoginThrottle = field(init=False)
    seats: Seats = field(init=False)
    deadlines: Deadlines = field(init=False)
    metrics: Metrics = field(init=False)
    pacing: asyncio.Lock = field(default_factory=asyncio.Lock)  # paced batches, one at a time
    tokens: TokenVerifier = field(default_factory=TokenVerifier)
    # The operator's changes of the last CHANGES_MEMORY seconds, for handshakes under way
    # (``changed_since``): "s:<session>" and "u:<user>" revoked, "m:<user>" regrouped,
    # "g:<group>" deleted -> when (time.monotonic()).
    changes: dict[str, float] = field(default_factory=dict)
    _regrouping: dict[str, bool] = field(default_factory=dict)  # user -> read again
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _outage_logged: float = -math.inf  # when unavailable() last wrote a line ...
    _outage_quiet: int = 0  # ... and how many failures it has kept quiet since

    def __post_init__(self) -> None:
        settings = self.settings
        self.seats = Seats(settings.max_connections, settings.max_connections_per_user)
        self.deadlines = Deadlines(self.codec.clock)
        self.throttle = LoginThrottle(
            failure_counts(self.hub.backplane, self.store),
            self.settings.login_max_failures,
            self.settings.login_failure_window,
        )
        self.metrics = Metrics(self.hub, self.flusher.stats, self.stats)

    @classmethod
    async def start(
        cls,
        settings: Settings,
        on_stopping: Callable[[], Awaitable[None]],
        clock: Callable[[], float] = time.time,
    ) -> Service:
        """Build every part; ``on_stopping`` is awaited when the server starts stopping.

        ``clock`` tells session ages (tests pass their own instead of waiting).
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
            )
            server.start()
            opened.push_async_callback(server.close)
            backplane: Backplane
            if settings.redis_url:
                backplane = RedisBackplane(
                    settings.redis_url,
                    settings.redis_prefix,
                    history_size=settings.history_size if settings.history_on else 0,
                    history_ttl=settings.history_ttl,
                )
                opened.push_async_callback(backplane.close)
            else:
                warn_if_workers_are_islands()
                history = None
                if settings.history_on and settings.history_bytes > 0:  # in memory
                    history = History(
                        settings.history_size,
                        settings.history_ttl,
                        max_bytes=settings.history_bytes,
                    )
                backplane = LocalBackplane(history)
            tokens = TokenVerifier(settings.jwt_secret, settings.jwt_public_key, clock=clock)
            hub = Hub(backplane, settings.pace_timeout)
            svc = cls(
                settings=settings,
                store=store,
                hub=hub,
                codec=SessionCodec(keys, settings.session_max_age, clock),
                web=web,
                server=server,
                tokens=tokens,
            )
            hub.start(svc.apply, svc.missed)
            with contextlib.suppress(DatabaseError):  # not reached yet: it says so itself
                pruned = await store.prune(settings.session_max_age, settings.login_failure_window)
                if pruned:
                    log.info("dropped %d expired sessions", pruned)
            opened.push_async_callback(svc.flusher.close)
            if settings.amqp_url:
                svc._start_amqp()
            opened.pop_all()  # started: close() takes them down from now on
        log.info(
            "wsfanout ready under %s: %s %s%s, %s, permessage-deflate %s",
            server.name,
            store.kind,
            store.where,
            "" if store.ready else " (not reached yet: trying again)",
            "Redis backplane" if settings.redis_url else "one node (no backplane)",
            server.deflate,
        )
        return svc

    async def drain(self) -> None:
        """Stop accepting and publishing; close every connection with 1001 (in batches)
        once it has sent what is queued; wait for them up to a deadline."""
        try:
            async with asyncio.timeout(SHUTDOWN_FLUSH):
                await self.hub.drain(CloseCode.GOING_AWAY, CLOSE_BATCH, CLOSE_PAUSE)
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
                await self.deadlines.close()
                await self.flusher.close()
                await self.hub.backplane.close()
            finally:
                await self.store.close()

    def unavailable(self, what: str, exc: BaseException) -> None:
        """Log that ``what`` failed because the database (or Redis) is away: the first
        failure at once, then one line every OUTAGE_LOG_EVERY seconds at most, counting
        the others; so an outage under load is a few lines, not one per request."""
        now = time.monotonic()
        if now - self._outage_logged < OUTAGE_LOG_EVERY:
            self._outage_quiet += 1
            return
        quiet, self._outage_quiet, self._outage_logged = self._outage_quiet, 0, now
        more = f" ({quiet} more failed since the last such line)" if quiet else ""
        log.error("%s: %s%s", what, exc, more)

    def credentials(self, scope: Scope) -> Session | Claims | None:
        """What the request presents, checked as far as it can be without the store: a
        connection token (``?token=`` or ``Authorization: Bearer``) when tokens are on and
        one is given, else the session cookie; None: neither (or a bad cookie).

        Raises:
            TokenError: a token is given, and it is refused.
        """
        session = self.codec.verify(http.cookies(scope).get(COOKIE_NAME))
        if self.tokens.enabled:
            token, in_query = _token(scope)
            if token is not None:
                try:
                    return self.tokens.verify(token)
                except TokenError:
                    # A header may be a proxy's, not the client's: a good cookie wins.
                    if in_query or session is None:
                        raise
        return session

    async def confirm(self, found: Session | Claims) -> Login | None:
        """The login behind checked credentials; None if its session was revoked (or
        expired and pruned) or its user is gone. A token needs no store.

        Raises:
            DatabaseError: the database failed.
        """
        if isinstance(found, Claims):
            return Login(found.username, found.name, found.groups, found.expires_at, None)
        if await self.store.session_user(found.session_id) != found.user_id:
            return None
        identity = await self.store.identity(found.user_id)
        if identity is None or identity[0].username != found.username:
            return None
        user, groups = identity
        expires_at = found.expires_at(self.settings.session_max_age)
        return Login(user.username, user.first_name, tuple(groups), expires_at, found.session_id)

    async def login(self, scope: Scope) -> Login | None:
        """Who makes this HTTP request; None: anonymous (no, a refused or a revoked login).

        Raises:
            DatabaseError: the database failed.
        """
        try:
            found = self.credentials(scope)
        except TokenError as exc:
            log.info("token refused: %s", exc.reason)
            return None
        return await self.confirm(found) if found is not None else None

    def changed_since(self, login: Login, since: float) -> int | None:
        """How a connection whose login was checked at ``since`` (``time.monotonic()``)
        must close, if the operator changed it meanwhile: 1008 (its session, or all of its
        user's, revoked), 1012 (its user's groups changed: reconnect); None: unchanged."""
        changes = self.changes
        if not changes:
            return None
        user = login.username.lower()
        if any(changes.get(key, since) > since for key in (f"s:{login.session_id}", "u:" + user)):
            return CloseCode.POLICY
        regrouped = ("m:" + user, *("g:" + group for group in login.groups))
        if any(changes.get(key, since) > since for key in regrouped):
            return CloseCode.SERVICE_RESTART
        return None

    def _remember(self, key: str) -> None:
        now = time.monotonic()
        changes = self.changes
        if len(changes) > CHANGES_MAX or next(iter(changes.values()), now) < now - CHANGES_MEMORY:
            for old, when in list(changes.items()):
                if when < now - CHANGES_MEMORY:
                    del changes[old]
        changes.pop(key, None)  # re-added last: the dict stays in time order
        changes[key] = now

    # Control (DESIGN 5.3)

    async def control(self, change: dict[str, Any]) -> None:
        """Carry out an operator's change (``apply``) here, and tell every other node.

        Raises:
            UnavailableError: the other nodes could not be told (Redis is away): it holds
            here, and their caches catch up within a few seconds, but their open
            connections were not changed.
        """
        self.apply(change)
        try:
            await self.hub.backplane.control(change)
        except BackplaneUnavailableError as exc:
            raise UnavailableError(str(exc)) from None

    def _regroup(self, user: str) -> None:
        """Bring this user's connections here to the store's groups for them, in a task;
        a change told meanwhile makes it read again, so the last read is the newest."""
        key = user.lower()
        if key in self._regrouping:
            self._regrouping[key] = True  # read again when the read under way is done
            return
        self._regrouping[key] = False
        task = asyncio.get_running_loop().create_task(self._read_groups(user))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read_groups(self, user: str) -> None:
        key = user.lower()
        try:
            while True:
                self._regrouping[key] = False
                found = await self.store.user_by_name(user)
                groups = await self.store.groups_of(found.id) if found is not None else None
                if not self._regrouping[key]:
                    break
        except DatabaseError as exc:
            self.unavailable(f"could not read the groups of {user}", exc)
            return
        finally:
            self._regrouping.pop(key, None)
        if groups is not None:
            self.hub.set_groups(user, groups)

    def missed(self) -> None:
        """Back on Redis after losing it: changes other nodes made meanwhile never reached
        this one, so nothing cached about users, groups or sessions is trusted (the hub
        closes the connections with 1012, and they come back through the handshake)."""
        self.store.forget()
        self.store.forget_sessions()

    def apply(self, change: dict[str, Any]) -> None:
        """An operator's change, made here or on another node, reaching this node's
        caches and open connections. ``change["op"]`` is one of:

        - ``revoke`` (``user``, ``session`` or None for all of theirs): close them with 1008;
        - ``member`` (``user``): their groups changed: their connections here take the
          groups the store now has for them (not the change itself: two changes made at
          once on two nodes arrive in different orders, but the store has one answer);
        - ``group_deleted`` (``group``): its members here leave it.

        Every change but a logout also drops the cached answers about users and groups.
        """
        op = change.get("op")
        session = change.get("session")
        if op != "revoke" or session is None:  # a logout changes no user or group
            self.store.forget()
        if op == "revoke":
            user = str(change["user"])
            self.store.forget_sessions(session)
            self._remember(f"s:{session}" if session else "u:" + user.lower())
            closed = self.hub.disconnect(user, session, REVOKED)
            if closed:
                log.info("closed %d connections of %s: session revoked", closed, user)
        elif op == "member":
            user = str(change["user"])
            self._remember("m:" + user.lower())
            self._regroup(user)
        elif op == "group_deleted":
            self._remember("g:" + str(change["group"]))
            self.hub.drop_group(str(change["group"]))

    async def resolve(self, publish: Publish) -> Publish:
        """The publish with its target resolved: a group that exists, an exact username.
        With connection tokens on, groups and users need no row in the store: a group or
        a username someone is online in (or as), on any node, is taken as given (before
        first names, as a username always is). Names nobody holds are refused, so that
        no one can fill Redis with the history of streams nobody listens to.

        Raises:
            ProtocolError: unknown group or user, or the database failing.
        """
        store, hub = self.store, self.hub
        target = publish.target
        try:
            # Who is connected here answers most lookups without the database.
            tokens = self.tokens.enabled
            if publish.kind is Kind.GROUP:
                if (
                    not hub.has_group(target)
                    and not await store.group_exists(target)
                    and not (
                        tokens
                        and GROUP_RE.fullmatch(target)
                        and await hub.present(Kind.GROUP, target)
                    )
                ):
                    raise ProtocolError(
                        ErrorCode.UNKNOWN_GROUP, f"no group named {target!r}", publish.frame_id
                    )
                return publish
            if publish.kind is Kind.DIRECT:
                name = hub.local_username(target)
                if (
                    name is None
                    and tokens
                    and USERNAME_RE.fullmatch(target)
                    and await hub.present(Kind.DIRECT, target)
                ):
                    name = target  # a token user, online on another node
                target = name or await store.resolve_user(target)
        except UnknownUserError as exc:
            raise ProtocolError(ErrorCode.UNKNOWN_USER, str(exc), publish.frame_id) from None
        except DatabaseError as exc:
            self.unavailable("a message could not be resolved", exc)
            raise ProtocolError(
                ErrorCode.UNAVAILABLE, "the database is unavailable, try again", publish.frame_id
            ) from None
        return publish if target == publish.target else dataclasses.replace(publish, target=target)

    async def publish(self, publish: Publish) -> asyncio.Future[None] | None:
        """Resolve the target, then hand the message to the hub's door.

        Returns:
            What ``Hub.publish`` returns: None once delivered here, or a future that
            settles when the backplane has it.

        Raises:
            ProtocolError: unknown group or user, or the service cannot take it now.
        """
        resolved = await self.resolve(publish)
        try:
            return self.hub.publish(resolved)
        except UnavailableError as exc:
            raise ProtocolError(ErrorCode.UNAVAILABLE, str(exc), publish.frame_id) from None

    async def validate_batch(self, data: Any, source: Source) -> list[Publish]:
        """A backend's publish body (one object or an array), each item checked and resolved.

        Raises:
            BatchError: the first bad item, with its index; nothing is published then.
        """
        items = data if isinstance(data, list) else [data]
        if not 1 <= len(items) <= MAX_BATCH:
            raise BatchError(
                0,
                ErrorCode.TOO_LARGE if items else ErrorCode.BAD_MESSAGE,
                f"send 1 to {MAX_BATCH} messages at a time, not {len(items)}",
            )
        checked = []
        limit = self.settings.max_frame_bytes
        for index, raw in enumerate(items):
            try:
                publish = protocol.parse_backend_object(raw, source, limit)
                checked.append(await self.resolve(publish))
            except ProtocolError as exc:
                raise BatchError(index, exc.code, exc.detail) from None
        return checked

    async def publish_batch(self, batch: list[Publish]) -> None:
        """Publish validated messages in order, paced (hub.py): return once every one is
        handed over, to the local outboxes or (with a backplane) to Redis.

        When the hub cannot take the whole batch now, none of it is published. Once
        started, a shutdown or a Redis failure can still stop part of it: the caller
        hears UnavailableError and may send it again (at least once, as with RabbitMQ).
        Batches are paced one at a time, so each keeps its order.

        Raises:
            UnavailableError: not all were published.
        """
        hub = self.hub
        hub.make_room(len(batch))
        pending = []
        waited: dict[str, float] = {}  # how long each user has held this batch up
        # With Redis nothing here suspends (every node paces what it receives), so nothing
        # can take the room meanwhile; the local engine waits for room in the outboxes.
        async with self.pacing:
            for publish in batch:
                if (done := await hub.publish_paced(publish, waited)) is not None:
                    pending.append(done)
        if pending:
            results = await asyncio.gather(*pending, return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result

    def _start_amqp(self) -> None:
        """Consume the RabbitMQ queue into the hub (through the backplane, if any)."""
        from .sources.amqp import AmqpSource, Rejected, Retry

        async def handle(data: object) -> None:
            try:
                batch = await self.validate_batch(data, Source.AMQP)
            except BatchError as exc:
                if exc.code is ErrorCode.UNAVAILABLE:
                    raise Retry(exc.detail) from None
                raise Rejected(f"item {exc.index}: {exc.code}: {exc.detail}") from None
            try:
                await self.publish_batch(batch)
            except UnavailableError as exc:
                raise Retry(str(exc)) from None

        settings = self.settings
        self.amqp = AmqpSource(
            settings.amqp_url,
            settings.amqp_queue,
            settings.amqp_prefetch,
            handle,
            connection_name=f"wsfanout {settings.amqp_queue} pid {os.getpid()}",
        )
        self.metrics.amqp = self.amqp.stats
        self.amqp.start()


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


def _token(scope: Scope) -> tuple[str | None, bool]:
    """A connection token from the query (``token=``) or an ``Authorization: Bearer``, and
    whether it came from the query."""
    query: bytes = scope.get("query_string", b"")
    if TOKEN_QUERY in query:
        pairs = urllib.parse.parse_qsl(query.decode("latin-1"))
        for name, value in pairs:
            if name == "token":
                return value, True
    scheme, _, given = (http.header(scope, b"authorization") or "").strip().partition(" ")
    if scheme.lower() == "bearer" and given.strip():
        return given.strip(), False
    return None, False
