"""The HTTP handlers: pages, login, logout, directory, health, static files."""

from __future__ import annotations

import asyncio
import hmac
import html
import logging
import math
import sqlite3
import time
from collections import deque
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs

import orjson

from . import http, passwords, protocol
from .backplane import BackplaneUnavailableError
from .config import Settings
from .hub import Hub, HubClosedError
from .metrics import Metrics, ServiceStats
from .outbox import Flusher
from .protocol import ErrorCode, Kind, ProtocolError, Publish
from .servers import ServerReach
from .sessions import COOKIE_NAME, Session, SessionCodec
from .store import Store, UnknownUserError
from .types import Receive, Scope, Send

if TYPE_CHECKING:
    from .sources.amqp import AmqpSource

log = logging.getLogger(__name__)

LOGIN_BODY_LIMIT: Final = 16 * 1024
MAX_CREDENTIAL_CHARS: Final = 1024
DIRECTORY_LIMIT: Final = 200
CONTENT_TYPES: Final = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
}


MAX_BATCH: Final = 1000
API_BODY_LIMIT: Final = 4 * 1024 * 1024


class BatchError(Exception):
    """One item of a backend's batch is bad; ``index`` says which."""

    def __init__(self, index: int, code: ErrorCode, detail: str) -> None:
        super().__init__(f"item {index}: {code}: {detail}")
        self.index = index
        self.code = code
        self.detail = detail


class LoginThrottle:
    """Failed logins per key (a username, a client address) in a sliding window.

    In memory and per process: each worker counts on its own. The table is bounded:
    past ``max_keys`` the stale keys go first, then the oldest.
    """

    def __init__(self, max_failures: int, window: float, max_keys: int = 100_000) -> None:
        self.max_failures = max_failures
        self.window = window
        self.max_keys = max_keys
        self._failures: dict[str, deque[float]] = {}

    def retry_after(self, keys: tuple[str, ...], now: float) -> int | None:
        """Seconds until these keys may try again, or None if they may now."""
        waits = []
        for key in keys:
            stamps = self._recent(key, now)
            if stamps is not None and len(stamps) >= self.max_failures:
                waits.append(stamps[0] + self.window - now)
        return max(1, math.ceil(max(waits))) if waits else None

    def failed(self, keys: tuple[str, ...], now: float) -> None:
        for key in keys:
            stamps = self._recent(key, now)
            if stamps is None:
                if len(self._failures) >= self.max_keys:
                    self._shrink(now)
                stamps = self._failures[key] = deque(maxlen=self.max_failures)
            stamps.append(now)

    def succeeded(self, key: str) -> None:
        self._failures.pop(key, None)

    def _recent(self, key: str, now: float) -> deque[float] | None:
        stamps = self._failures.get(key)
        if stamps is None:
            return None
        while stamps and stamps[0] <= now - self.window:
            stamps.popleft()
        if not stamps:
            del self._failures[key]
            return None
        return stamps

    def _shrink(self, now: float) -> None:
        stale = [k for k, v in self._failures.items() if not v or v[-1] <= now - self.window]
        for key in stale:
            del self._failures[key]
        if len(self._failures) >= self.max_keys:
            for key in list(self._failures)[: self.max_keys // 2]:
                del self._failures[key]


def load_web_files() -> dict[str, tuple[bytes, bytes]]:
    """Every servable file in the packaged ``web/`` folder: name -> (body, content type)."""
    files: dict[str, tuple[bytes, bytes]] = {}
    for entry in resources.files("wsfanout.web").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in CONTENT_TYPES and not entry.name.startswith("."):
            files[entry.name] = (entry.read_bytes(), CONTENT_TYPES[suffix])
    return files


@dataclass
class Service:
    """What the handlers share: built at start-up, closed at shutdown."""

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
    metrics: Metrics = field(init=False)

    def __post_init__(self) -> None:
        self.throttle = LoginThrottle(
            self.settings.login_max_failures, self.settings.login_failure_window
        )
        self.metrics = Metrics(self.hub, self.flusher.stats, self.stats)

    def session(self, scope: Scope) -> Session | None:
        return self.codec.verify(http.cookies(scope).get(COOKIE_NAME))

    async def resolve_target(self, publish: Publish) -> str:
        """The group name or exact username a publish goes to ("" for a broadcast).

        Raises:
            ProtocolError: unknown group or user, or the database failing.
        """
        store, hub = self.store, self.hub
        target = publish.target
        try:
            # Who is connected here answers most lookups without the database.
            if (
                publish.kind is Kind.GROUP
                and not hub.has_group(target)
                and not await store.group_exists(target)
            ):
                raise ProtocolError(
                    ErrorCode.UNKNOWN_GROUP, f"no group named {target!r}", publish.frame_id
                )
            if publish.kind is Kind.DIRECT:
                target = hub.local_username(target) or await store.resolve_user(target)
        except UnknownUserError as exc:
            raise ProtocolError(ErrorCode.UNKNOWN_USER, str(exc), publish.frame_id) from None
        except sqlite3.Error as exc:
            log.error("database error while publishing: %s", exc)
            raise ProtocolError(
                ErrorCode.UNAVAILABLE, "the database is unavailable, try again", publish.frame_id
            ) from None
        return target

    async def validate_batch(self, data: Any) -> list[tuple[Publish, str, str]]:
        """A backend's publish body (one object or an array): (publish, target, sender) each.

        Raises:
            BatchError: the first bad item, with its index; nothing is published then.
        """
        items = data if isinstance(data, list) else [data]
        if not 1 <= len(items) <= MAX_BATCH:
            raise BatchError(
                0,
                ErrorCode.TOO_LARGE,
                f"send 1 to {MAX_BATCH} messages at a time, not {len(items)}",
            )
        checked = []
        limit = self.settings.max_frame_bytes
        for index, raw in enumerate(items):
            try:
                publish = protocol.parse_object(raw)
                sender = raw.get("from", "system")
                if not isinstance(sender, str) or not sender.strip() or len(sender) > 64:
                    raise ProtocolError(
                        ErrorCode.BAD_MESSAGE, "'from' must be a name of 1 to 64 characters"
                    )
                if len(publish.text.encode()) > limit:
                    raise ProtocolError(ErrorCode.TOO_LARGE, f"'text' is limited to {limit} bytes")
                checked.append((publish, await self.resolve_target(publish), sender.strip()))
            except ProtocolError as exc:
                raise BatchError(index, exc.code, exc.detail) from None
        return checked

    async def publish_batch(self, batch: list[tuple[Publish, str, str]], source: str) -> None:
        """Publish validated messages in order; wait until the backplane (if any) has them.

        Raises:
            HubClosedError, BackplaneUnavailableError: some were not published.
        """
        pending = []
        for publish, target, sender in batch:
            done = self.hub.send(publish.kind, sender, publish.text, target=target, source=source)
            if done is not None:
                pending.append(done)
        if pending:
            results = await asyncio.gather(*pending, return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result


async def page(scope: Scope, receive: Receive, send: Send, svc: Service, name: str) -> None:
    body, content_type = svc.web[name]
    headers = [(b"content-security-policy", http.page_csp(scope)), (b"cache-control", b"no-cache")]
    await http.respond(send, 200, body, content_type, headers)


async def index(scope: Scope, receive: Receive, send: Send, svc: Service) -> None:
    """The message page; anonymous users go to the login page."""
    if svc.session(scope) is None:
        await http.redirect(send, "login")
        return
    await page(scope, receive, send, svc, "index.html")


async def login_page(scope: Scope, receive: Receive, send: Send, svc: Service) -> None:
    await page(scope, receive, send, svc, "login.html")


RESULT_MARKER: Final = b'<p id="result" role="status" aria-live="polite"></p>'


async def login(scope: Scope, receive: Receive, send: Send, svc: Service) -> None:
    """Check credentials; on success set the session cookie (replacing any other user's).

    JSON in, JSON out. A plain form post (a browser without JavaScript) is redirected
    to the page on success, and shown the login page with the reason otherwise.
    """
    is_form = (http.header(scope, b"content-type") or "").startswith(
        "application/x-www-form-urlencoded"
    )

    async def refuse(status: int, message: str, headers: http.Headers | None = None) -> None:
        if is_form:
            body, content_type = svc.web["login.html"]
            shown = RESULT_MARKER.replace(
                b"></p>", b' class="bad">' + html.escape(message).encode() + b"</p>"
            )
            body = body.replace(RESULT_MARKER, shown)
            csp = (b"content-security-policy", http.page_csp(scope))
            await http.respond(send, status, body, content_type, [csp, *(headers or [])])
        else:
            await http.error_response(send, status, message, headers or [])

    if not http.origin_allowed(scope, svc.settings.allowed_origins):
        await refuse(403, "Origin not allowed")
        return
    try:
        body = await http.read_body(receive, LOGIN_BODY_LIMIT)
    except http.BodyTooLargeError as exc:
        await refuse(413, str(exc))
        return
    except http.BodyTimeoutError as exc:
        await refuse(408, str(exc))
        return
    except http.ClientGoneError:
        return
    credentials = _credentials(body, is_form)
    if credentials is None:
        await refuse(400, 'Expected JSON {"username": "...", "password": "..."} or a form')
        return
    username, password = credentials
    client = (scope.get("client") or ("unknown", 0))[0]
    keys = ("user:" + username.lower(), "addr:" + str(client))
    wait = svc.throttle.retry_after(keys, time.monotonic())
    if wait is not None:
        svc.stats.login_failed("throttled")
        log.warning("login throttled for %r from %s", username, client)
        message = f"Too many failed logins, try again in {wait} s"
        await refuse(429, message, [(b"retry-after", str(wait).encode())])
        return
    user = await svc.store.user_by_name(username)
    stored = user.password_hash if user is not None else passwords.dummy_hash()
    ok = await asyncio.to_thread(passwords.verify_password, password, stored)
    if user is None or not ok:
        svc.throttle.failed(keys, time.monotonic())
        svc.stats.login_failed("password")
        log.info("failed login for %r from %s", username, client)
        await refuse(401, "User or password wrong")
        return
    svc.throttle.succeeded(keys[0])
    token = svc.codec.issue(user.id, user.username)
    cookie = http.session_cookie(
        COOKIE_NAME,
        token,
        path=http.app_root(scope),
        max_age=int(svc.settings.session_max_age),
        secure=svc.settings.cookie_secure,
    )
    if is_form:
        await http.redirect(send, "./", [cookie])
        return
    await http.json_response(send, 200, {"success": f"Welcome back, {user.username}"}, [cookie])


def _credentials(body: bytes, is_form: bool) -> tuple[str, str] | None:
    data: Any
    if is_form:
        try:
            form = parse_qs(body.decode(), max_num_fields=10, strict_parsing=False)
        except (UnicodeDecodeError, ValueError):
            return None
        data = {key: values[0] for key, values in form.items()}
    else:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
    if not isinstance(data, dict):
        return None
    username, password = data.get("username"), data.get("password")
    if not isinstance(username, str) or not isinstance(password, str):
        return None
    username = username.strip()
    if not username or not password or max(len(username), len(password)) > MAX_CREDENTIAL_CHARS:
        return None
    return username, password


async def logout(scope: Scope, receive: Receive, send: Send, svc: Service) -> None:
    """Clear the cookie. A form post goes back to the login page."""
    if not http.origin_allowed(scope, svc.settings.allowed_origins):
        await http.error_response(send, 403, "Origin not allowed")
        return
    cookie = http.session_cookie(
        COOKIE_NAME, "", path=http.app_root(scope), max_age=0, secure=svc.settings.cookie_secure
    )
    if (http.header(scope, b"content-type") or "").startswith("application/x-www-form-urlencoded"):
        await http.redirect(send, "login", [cookie])
        return
    await http.json_response(send, 200, {"success": "Logged out"}, [cookie])


async def directory(scope: Scope, receive: Receive, send: Send, svc: Service) -> None:
    """Group names and users for the page's pickers, filtered by a ``q`` prefix."""
    if svc.session(scope) is None:
        await http.error_response(send, 401, "Log in first")
        return
    query = parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1"))
    prefix = (query.get("q") or [""])[0].strip()[:64]
    groups, users = await svc.store.directory(prefix, DIRECTORY_LIMIT + 1)
    await http.json_response(
        send,
        200,
        {
            "groups": groups[:DIRECTORY_LIMIT],
            "users": [{"username": u, "first_name": f} for u, f in users[:DIRECTORY_LIMIT]],
            "truncated": len(groups) > DIRECTORY_LIMIT or len(users) > DIRECTORY_LIMIT,
        },
    )


async def healthz(scope: Scope, receive: Receive, send: Send, svc: Service) -> None:
    """200 when the database (and Redis, when configured) answer; 503 with the reason otherwise."""
    checks = {"database": "ok"}
    try:
        await asyncio.wait_for(svc.store.ping(), 5)
    except (sqlite3.Error, TimeoutError, ValueError) as exc:
        checks["database"] = f"failing: {exc or type(exc).__name__}"
    backplane = svc.hub.backplane
    if backplane is not None:
        try:
            await backplane.check()
            checks["redis"] = "ok"
        except BackplaneUnavailableError as exc:
            checks["redis"] = f"failing: {exc.reason}"
    if svc.amqp is not None:
        checks["amqp"] = "ok" if svc.amqp.consuming else f"failing: {svc.amqp.state}"
    ok = all(value == "ok" for value in checks.values())
    await http.json_response(
        send,
        200 if ok else 503,
        {"status": "ok" if ok else "degraded", "checks": checks, "connections": len(svc.hub)},
    )


async def publish_api(scope: Scope, receive: Receive, send: Send, svc: Service) -> None:
    """POST /api/publish: backends publish with a bearer key; a batch is all or nothing."""
    keys = svc.settings.api_keys
    if not keys:
        await http.error_response(send, 404, "Not found")
        return
    if not _key_ok(http.header(scope, b"authorization"), keys):
        await http.error_response(
            send,
            401,
            "A valid 'Authorization: Bearer <key>' is needed",
            [(b"www-authenticate", b'Bearer realm="wsfanout"')],
        )
        return
    try:
        body = await http.read_body(receive, API_BODY_LIMIT)
    except http.BodyTooLargeError as exc:
        await http.error_response(send, 413, str(exc))
        return
    except http.BodyTimeoutError as exc:
        await http.error_response(send, 408, str(exc))
        return
    except http.ClientGoneError:
        return
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        await _api_error(send, 400, ErrorCode.BAD_JSON, "the body is not valid JSON")
        return
    try:
        batch = await svc.validate_batch(data)
    except BatchError as exc:
        status = 503 if exc.code is ErrorCode.UNAVAILABLE else 400
        await _api_error(send, status, exc.code, exc.detail, exc.index)
        return
    try:
        await svc.publish_batch(batch, "api")
    except (HubClosedError, BackplaneUnavailableError) as exc:
        await _api_error(send, 503, ErrorCode.UNAVAILABLE, str(exc))
        return
    await http.json_response(send, 202, {"accepted": len(batch)})


def _key_ok(authorization: str | None, keys: tuple[str, ...]) -> bool:
    scheme, _, given = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return False
    presented = given.strip().encode()
    # Compare against every key, whatever matches, so timing says nothing.
    matches = [hmac.compare_digest(presented, key.encode()) for key in keys]
    return any(matches)


async def _api_error(
    send: Send, status: int, code: ErrorCode, detail: str, index: int | None = None
) -> None:
    body: dict[str, Any] = {"error": detail, "code": code.value}
    if index is not None:
        body["index"] = index
    await http.json_response(send, status, body)


async def metrics(scope: Scope, receive: Receive, send: Send, svc: Service) -> None:
    """Prometheus text format."""
    await http.respond(send, 200, svc.metrics.render(), b"text/plain; version=0.0.4; charset=utf-8")


async def static(scope: Scope, receive: Receive, send: Send, svc: Service, name: str) -> None:
    """A file from ``web/``: only names the package holds, so no path escapes it."""
    found = svc.web.get(name)
    if found is None or name.endswith(".html"):
        await http.error_response(send, 404, "Not found")
        return
    body, content_type = found
    await http.respond(send, 200, body, content_type, [(b"cache-control", b"no-cache")])
