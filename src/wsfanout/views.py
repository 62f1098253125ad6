"""The HTTP handlers only: pages, login, logout, directory, publish, health, metrics, static.

Each is ``async def handler(scope, receive, send, svc)``; what they share is the
service's parts (``service.py``): the store, the hub, the throttle, and the collaborators
for who asks (``admission.py``), publishing (``publishing.py``) and control (``control.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
from typing import Any, Final
from urllib.parse import parse_qs

import orjson

from . import http, passwords, queries
from .admission import Login, Refusal
from .backplane import BackplaneUnavailableError
from .hub import UnavailableError
from .metrics import LoginFailed
from .protocol import ErrorCode, Source
from .publishing import BatchError
from .service import Service
from .sessions import COOKIE_NAME
from .store import DatabaseError, UnknownUserError, User
from .throttle import Attempt
from .types import Receive, Scope, Send

log = logging.getLogger(__name__)

LOGIN_BODY_LIMIT: Final = 16 * 1024
MAX_CREDENTIAL_CHARS: Final = passwords.MAX_LENGTH  # a username or password at login
DIRECTORY_LIMIT: Final = 200
API_BODY_LIMIT: Final = 4 * 1024 * 1024
# A publish the service cannot take now (Redis away or too much waiting for it, a node behind
# Redis, the database away, shutting down) is refused with 503 and this Retry-After, in
# seconds: soon enough for the backplane's first reconnects, late enough not to spin.
PUBLISH_RETRY_AFTER: Final = 1
HEALTH_TIMEOUT: Final = 5.0  # seconds /healthz waits for the database


async def page(scope: Scope, receive: Receive, send: Send, svc: Service, name: str) -> None:
    body, content_type = svc.web[name]
    headers = [(b"content-security-policy", http.page_csp(scope)), (b"cache-control", b"no-cache")]
    await http.respond(send, 200, body, content_type, headers)


async def index(scope: Scope, receive: Receive, send: Send, svc: Service) -> None:
    """The message page; anonymous users go to the login page."""
    ok, login = await _login(scope, send, svc)
    if not ok:
        return
    if login is None:
        await http.redirect(send, "login")
        return
    await page(scope, receive, send, svc, "index.html")


async def _login(scope: Scope, send: Send, svc: Service) -> tuple[bool, Login | None]:
    """Who makes the request (None: anonymous); False when the database failed and the
    request was answered (503)."""
    try:
        return True, await svc.admission.login(scope)
    except DatabaseError as exc:
        svc.outages.failed("a session could not be checked", exc)
        await http.error_response(send, 503, "The database is unavailable, try again")
        return False, None
    except Refusal as refusal:  # the host app's authenticate failed (logged)
        await http.error_response(send, refusal.status, refusal.reason)
        return False, None


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
    # Counted as a failure before the password is checked (taken back if it is right),
    # so parallel guesses get no more tries than the limit.
    attempt: Attempt | int | None = None
    try:
        attempt = await svc.throttle.attempt(username, str(client))
        user = None if isinstance(attempt, int) else await svc.store.user_by_name(username)
    except (DatabaseError, BackplaneUnavailableError) as exc:
        if isinstance(attempt, Attempt):  # no password was checked: not a failure
            await svc.throttle.withdraw(attempt)
        svc.outages.failed(f"a login of {username!r} was refused", exc)
        await refuse(503, "The service cannot check logins now, try again")
        return
    if isinstance(attempt, int):
        wait = attempt
        svc.stats.login_failed(LoginFailed.THROTTLED)
        log.warning("login throttled for %r from %s", username, client)
        message = f"Too many failed logins, try again in {wait} s"
        await refuse(429, message, [(b"retry-after", str(wait).encode())])
        return
    ok = await asyncio.to_thread(_password_ok, password, user)
    if user is None or not ok:
        svc.stats.login_failed(LoginFailed.PASSWORD)
        log.info("failed login for %r from %s", username, client)
        await refuse(401, "User or password wrong")
        return
    try:
        await svc.throttle.succeeded(attempt)
        session_id = await svc.store.create_session(user.id, svc.settings.session_max_age)
        # Past the most sessions a user keeps, the oldest end, sockets and all.
        for dropped in await svc.store.trim_sessions(user.id):
            change = {"op": "revoke", "user": user.username, "session": dropped}
            with contextlib.suppress(UnavailableError):  # ended here and in the store
                await svc.control.make(change)
    except UnknownUserError:  # deleted while its password was checked
        await refuse(401, "User or password wrong")
        return
    except (DatabaseError, BackplaneUnavailableError) as exc:
        await svc.throttle.withdraw(attempt)  # the password was right: no failure
        svc.outages.failed(f"a login of {username!r} failed", exc)
        await refuse(503, "The service cannot check logins now, try again")
        return
    token = svc.codec.issue(user.id, user.username, session_id)
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


def _password_ok(password: str, user: User | None) -> bool:
    """Blocking (run it in a thread): an unknown user costs as long as a wrong password."""
    stored = user.password_hash if user is not None else passwords.dummy_hash()
    return passwords.verify_password(password, stored) and user is not None


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
    """Revoke the session (its sockets on every node close with 1008) and clear the cookie.
    A form post goes back to the login page."""
    if not http.origin_allowed(scope, svc.settings.allowed_origins):
        await http.error_response(send, 403, "Origin not allowed")
        return
    session = svc.codec.verify(http.cookies(scope).get(COOKIE_NAME))
    if session is not None:
        try:
            await svc.store.revoke_session(session.session_id)
        except DatabaseError as exc:
            svc.outages.failed("a logout could not end its session", exc)
            await http.error_response(send, 503, "The database is unavailable, try again")
            return
        change = {"op": "revoke", "user": session.username, "session": session.session_id}
        try:
            await svc.control.make(change)
        except UnavailableError as exc:  # revoked here and in the store all the same
            log.warning("logout of %s not told to other nodes: %s", session.username, exc)
    cookie = http.session_cookie(
        COOKIE_NAME, "", path=http.app_root(scope), max_age=0, secure=svc.settings.cookie_secure
    )
    if (http.header(scope, b"content-type") or "").startswith("application/x-www-form-urlencoded"):
        await http.redirect(send, "login", [cookie])
        return
    await http.json_response(send, 200, {"success": "Logged out"}, [cookie])


async def directory(scope: Scope, receive: Receive, send: Send, svc: Service) -> None:
    """Group names and users for the page's pickers, filtered by a ``q`` prefix. With
    ``WSFANOUT_GROUP_WRITE=members``, only the user's own groups and the users who share
    one with them."""
    ok, login = await _login(scope, send, svc)
    if not ok:
        return
    if login is None:
        await http.error_response(send, 401, "Log in first")
        return
    query = parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1"))
    prefix = (query.get("q") or [""])[0].strip()[:64]
    if svc.settings.group_write == "members":
        groups = [group for group in sorted(login.groups) if group.startswith(prefix)]
        users = await svc.store.users_sharing_groups(
            list(login.groups), prefix, DIRECTORY_LIMIT + 1
        )
    else:
        groups, users = await svc.store.directory(prefix, DIRECTORY_LIMIT + 1)
        # A token's or the host app's groups may have no row in the store: theirs too.
        groups = sorted({*groups, *(g for g in login.groups if g.startswith(prefix))})
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
    # Not wait_for: a ping cancelled on a frozen server waits for the server to hear of it.
    ping = asyncio.ensure_future(svc.store.ping())
    await asyncio.wait({ping}, timeout=HEALTH_TIMEOUT)
    if not ping.done():
        ping.cancel()  # left to end on its own
        ping.add_done_callback(lambda task: task.cancelled() or task.exception())
        checks["database"] = f"failing: no answer within {HEALTH_TIMEOUT:g} s"
    elif (failure := ping.exception()) is not None:
        if not isinstance(failure, DatabaseError):
            raise failure
        checks["database"] = f"failing: {failure}"
    checks.update(await svc.hub.backplane.health())
    if svc.amqp is not None:
        checks["amqp"] = "ok" if svc.amqp.consuming else f"failing: {svc.amqp.reason}"
    ok = all(value == "ok" for value in checks.values())
    await http.json_response(
        send,
        200 if ok else 503,
        {"status": "ok" if ok else "degraded", "checks": checks, "connections": len(svc.hub)},
    )


async def publish_api(scope: Scope, receive: Receive, send: Send, svc: Service) -> None:
    """POST /api/publish: backends publish with a bearer key; a batch is validated all or
    nothing, and queued all or none (see ``Publishing.publish_batch``)."""
    if not await http.api_key_ok(scope, send, svc.settings.api_keys):
        return
    ok, data = await http.read_json(receive, send, API_BODY_LIMIT)
    if not ok:
        return
    retry = [(b"retry-after", str(PUBLISH_RETRY_AFTER).encode())]
    try:
        batch = await svc.publishing.validate_batch(data, Source.API)
    except BatchError as exc:
        if exc.code is ErrorCode.UNAVAILABLE:
            await _api_error(send, 503, exc.code, exc.detail, exc.index, retry)
        else:
            await _api_error(send, 400, exc.code, exc.detail, exc.index)
        return
    try:
        await svc.publishing.publish_batch(batch)
    except UnavailableError as exc:
        await _api_error(send, 503, ErrorCode.UNAVAILABLE, str(exc), headers=retry)
        return
    await http.json_response(send, 202, {"accepted": len(batch)})


async def online_api(scope: Scope, receive: Receive, send: Send, svc: Service) -> None:
    """POST /api/online ``{"users": [...]}``: which of up to 1,000 users are connected
    anywhere, with how many connections (DESIGN 12)."""
    if not await http.api_key_ok(scope, send, svc.settings.api_keys):
        return
    ok, data = await http.read_json(receive, send, API_BODY_LIMIT)
    if not ok:
        return
    try:
        if not isinstance(data, dict) or set(data) != {"users"}:
            raise ValueError('expected {"users": ["greg", ...]}')
        users = queries.usernames(data["users"])
    except ValueError as exc:
        await _api_error(send, 400, ErrorCode.BAD_MESSAGE, str(exc))
        return
    try:
        counts = await queries.online(svc.hub, users)
    except UnavailableError as exc:
        retry = [(b"retry-after", str(PUBLISH_RETRY_AFTER).encode())]
        await _api_error(send, 503, ErrorCode.UNAVAILABLE, str(exc), headers=retry)
        return
    await http.json_response(send, 200, {"online": counts})


async def _api_error(
    send: Send,
    status: int,
    code: ErrorCode,
    detail: str,
    index: int | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body: dict[str, Any] = {"error": detail, "code": code.value}
    if index is not None:
        body["index"] = index
    await http.json_response(send, status, body, headers or ())


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
