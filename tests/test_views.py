"""views: pages, login, logout, directory, health and static files, in-process."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

import pytest

from tests import asgi
from tests.conftest import login, started
from wsfanout import App, Settings, passwords
from wsfanout.sessions import COOKIE_NAME
from wsfanout.store import DatabaseError

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def settings(settings_on_each_backend: Settings) -> Settings:
    """Every test here runs on SQLite and on PostgreSQL."""
    return settings_on_each_backend


async def test_anonymous_index_redirects_to_login(app: App) -> None:
    """GET / without a session is a redirect to the relative login page."""
    response = await asgi.request(app, "GET", "/")
    assert response.status == 303 and response.header("location") == "login"


async def test_pages_are_served(app: App) -> None:
    """The login page is public; the message page needs a session; both carry a CSP."""
    page = await asgi.request(app, "GET", "/login")
    assert page.status == 200 and b"<form" in page.body
    assert "frame-ancestors 'none'" in (page.header("content-security-policy") or "")
    cookie = await login(app, "greg")
    index = await asgi.request(app, "GET", "/", headers={"cookie": cookie})
    assert index.status == 200 and b"app.js" in index.body


async def test_login_success_shape_and_cookie(app: App) -> None:
    """A good login answers the seed's shape and sets a scoped HttpOnly cookie."""
    response = await asgi.request(
        app, "POST", "/login", json={"username": "Greg", "password": "Greg-demo"}
    )
    assert response.status == 200
    assert response.json() == {"success": "Welcome back, greg"}
    cookie = response.header("set-cookie") or ""
    assert cookie.startswith(COOKIE_NAME + "=")
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/;" in cookie


@pytest.mark.parametrize(
    ("username", "password"), [("greg", "greg"), ("greg", "Mike"), ("nobody", "Greg")]
)
async def test_login_failure(app: App, username: str, password: str) -> None:
    """A wrong password or an unknown user answer the same 401 and set no cookie."""
    response = await asgi.request(
        app, "POST", "/login", json={"username": username, "password": password}
    )
    assert response.status == 401
    assert response.json() == {"error": "User or password wrong"}
    assert response.cookie is None


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"[]",
        b'"x"',
        b'{"username": "greg"}',
        b'{"username": 1, "password": "x"}',
        b'{"username": "", "password": "x"}',
        b"\xff\xfe",
    ],
)
async def test_malformed_login_is_400(app: App, body: bytes) -> None:
    """Malformed bodies get a 400 JSON error, never a 500."""
    response = await asgi.request(
        app, "POST", "/login", body=body, headers={"content-type": "application/json"}
    )
    assert response.status == 400
    assert "error" in response.json()


async def test_login_body_limit(app: App) -> None:
    """A huge body is refused with 413 while streaming it."""
    response = await asgi.request(app, "POST", "/login", body=b"x" * 100_000, chunks=20)
    assert response.status == 413


async def test_form_login_redirects_with_cookie(app: App) -> None:
    """A plain form post (no JavaScript) logs in and redirects to the page."""
    response = await asgi.request(
        app,
        "POST",
        "/login",
        body=b"username=amanda&password=Amanda-demo",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert response.status == 303 and response.header("location") == "./"
    assert response.cookie is not None


async def test_login_switches_user(app: App) -> None:
    """Logging in while holding another user's cookie replaces it."""
    greg = await login(app, "greg")
    response = await asgi.request(
        app,
        "POST",
        "/login",
        json={"username": "lisa", "password": "Lisa-demo"},
        headers={"cookie": greg},
    )
    assert response.json() == {"success": "Welcome back, lisa"}
    assert response.cookie is not None and response.cookie != greg
    svc = app.service
    assert svc is not None
    session = svc.codec.verify(response.cookie.split("=", 1)[1])
    assert session is not None and session.username == "lisa"


async def test_login_from_foreign_origin_is_refused(app: App) -> None:
    """A cross-site login post is refused with 403."""
    response = await asgi.request(
        app,
        "POST",
        "/login",
        json={"username": "greg", "password": "Greg-demo"},
        headers={"origin": "http://evil.example"},
    )
    assert response.status == 403


async def attempt(app: App, username: str, password: str, address: str) -> asgi.Response:
    return await asgi.request(
        app,
        "POST",
        "/login",
        json={"username": username, "password": password},
        client=(address, 1),
    )


async def test_five_failures_lock_that_name_from_that_address_only(app: App) -> None:
    """5 failures for mike from one address: that address gets 429 + Retry-After for mike,
    even with the right password; mike from elsewhere and others from there get in."""
    for _ in range(5):
        assert (await attempt(app, "mike", "bad", "10.0.0.1")).status == 401
    response = await attempt(app, "MIKE", "Mike-demo", "10.0.0.1")
    assert response.status == 429
    assert 0 < int(response.header("retry-after") or 0) <= 900
    assert (await attempt(app, "mike", "Mike-demo", "10.0.0.2")).status == 200
    assert (await attempt(app, "greg", "Greg-demo", "10.0.0.1")).status == 200


async def test_failures_outlive_a_restart(settings: Settings) -> None:
    """The counts are in the database: a restarted node (or another worker on the same
    file) still refuses a name that failed 5 times; the right password from elsewhere works."""
    async with started(settings) as first:
        for _ in range(5):
            assert (await attempt(first, "mike", "x", "10.5.5.5")).status == 401
    async with started(settings) as second:
        assert (await attempt(second, "mike", "Mike-demo", "10.5.5.5")).status == 429
        assert (await attempt(second, "mike", "Mike-demo", "10.5.5.6")).status == 200


async def test_logins_answer_503_when_the_counts_cannot_be_reached(settings: Settings) -> None:
    """Redis (holding the counts) away: a login is refused with 503 and a JSON reason,
    never let through uncounted."""
    async with started(settings, redis_url="redis://127.0.0.1:9/0") as app:
        response = await attempt(app, "mike", "Mike-demo", "10.6.6.6")
    assert response.status == 503
    assert response.json()["error"] == "The service cannot check logins now, try again"


async def test_an_address_spraying_names_is_stopped(app: App) -> None:
    """20 failures from one address across usernames: that address gets 429, others don't."""
    for n in range(20):
        assert (await attempt(app, f"a{n}", "x", "10.1.1.1")).status == 401
    assert (await attempt(app, "greg", "Greg-demo", "10.1.1.1")).status == 429
    assert (await attempt(app, "greg", "Greg-demo", "10.1.1.2")).status == 200


async def test_parallel_guesses_get_no_more_than_the_limit(app: App) -> None:
    """30 wrong passwords for lisa at once from one address: 5 are checked, 25 get 429."""
    responses = await asyncio.gather(
        *(attempt(app, "lisa", f"guess{n}", "10.2.2.2") for n in range(30))
    )
    statuses = sorted(r.status for r in responses)
    assert statuses == [401] * 5 + [429] * 25


async def test_logout_clears_cookie(app: App) -> None:
    """POST /logout expires the cookie at the app's root path."""
    response = await asgi.request(app, "POST", "/logout")
    assert response.status == 200
    cookie = response.header("set-cookie") or ""
    assert cookie.startswith(COOKIE_NAME + "=;") and "Max-Age=0" in cookie


async def test_an_outage_locks_nobody_out(app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    """Logins that fail with 503 (the user could not be looked up) are not counted as
    failures: once the database is back, the right password gets in at once."""
    assert app.service is not None
    store = app.service.store
    looked_up = store.user_by_name

    async def failing(name: str) -> None:
        raise DatabaseError("PostgreSQL postgresql://h/db: the database system is starting up")

    monkeypatch.setattr(store, "user_by_name", failing)
    for _ in range(6):
        assert (await attempt(app, "mike", "Mike-demo", "10.7.7.7")).status == 503
    monkeypatch.setattr(store, "user_by_name", looked_up)
    assert (await attempt(app, "mike", "Mike-demo", "10.7.7.7")).status == 200


async def test_a_database_outage_is_a_503_not_a_traceback(
    app: App, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A route whose store call fails answers 503 with a JSON reason, logged in one line
    (no traceback): an outage is expected, not a bug."""
    cookie = await login(app, "greg")
    assert app.service is not None

    async def failing(*args: object) -> None:
        raise DatabaseError("PostgreSQL postgresql://h/db: connection refused")

    monkeypatch.setattr(app.service.store, "directory", failing)
    response = await asgi.request(app, "GET", "/api/directory", headers={"cookie": cookie})
    assert response.status == 503
    assert response.json() == {
        "error": "The database is unavailable, try again",
        "code": "unavailable",
    }
    assert not any(record.exc_info for record in caplog.records)
    assert any("connection refused" in record.getMessage() for record in caplog.records)


async def test_directory(app: App) -> None:
    """The directory needs a session and filters by prefix."""
    assert (await asgi.request(app, "GET", "/api/directory")).status == 401
    cookie = await login(app, "greg")
    everything = await asgi.request(app, "GET", "/api/directory", headers={"cookie": cookie})
    assert everything.json()["groups"] == ["boys", "girls"]
    assert len(everything.json()["users"]) == 6
    some = await asgi.request(app, "GET", "/api/directory?q=an", headers={"cookie": cookie})
    assert [u["username"] for u in some.json()["users"]] == ["anny"]


async def test_healthz(app: App) -> None:
    """/healthz answers 200 with the database check while the database answers."""
    response = await asgi.request(app, "GET", "/healthz")
    assert response.status == 200 and response.json()["checks"] == {"database": "ok"}


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/static/app.js", 200),
        ("GET", "/static/style.css", 200),
        ("GET", "/static/index.html", 404),
        ("GET", "/static/../setup.cfg", 404),
        ("GET", "/static/%2e%2e/setup.cfg", 404),
        ("GET", "/static/__init__.py", 404),
        ("GET", "/static/", 404),
        ("GET", "/nope", 404),
        ("GET", "/login/", 404),
        ("DELETE", "/login", 405),
        ("GET", "/logout", 405),
        ("POST", "/static/app.js", 405),
        ("HEAD", "/healthz", 200),
    ],
)
async def test_routing(app: App, method: str, path: str, status: int) -> None:
    """Unknown paths are 404, wrong methods 405 with JSON bodies; nothing escapes web/."""
    response = await asgi.request(app, method, path)
    assert response.status == status
    if status >= 400:
        assert "error" in response.json()
        if status == 405:
            assert response.header("allow")


async def test_form_login_failure_shows_the_page_with_the_reason(app: App) -> None:
    """A failed form login answers 401 with the login page and the reason in it."""
    response = await asgi.request(
        app,
        "POST",
        "/login",
        body=b"username=amanda&password=nope",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert response.status == 401
    assert response.header("content-type") == "text/html; charset=utf-8"
    assert b'class="bad">User or password wrong</p>' in response.body
    assert response.cookie is None


async def test_password_work_never_runs_on_the_event_loop(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checking a password, an unknown user's dummy hash included, happens off the loop."""
    threads: list[bool] = []
    real_verify = passwords.verify_password

    def verify(password: str, stored: str) -> bool:
        threads.append(threading.current_thread() is threading.main_thread())
        return real_verify(password, stored)

    passwords.dummy_hash.cache_clear()  # the first unknown user makes it
    monkeypatch.setattr(
        passwords, "hash_password", _on_loop_check(passwords.hash_password, threads)
    )
    monkeypatch.setattr(passwords, "verify_password", verify)
    for username in ("nobody-at-all", "greg"):
        response = await asgi.request(
            app, "POST", "/login", json={"username": username, "password": "wrong"}
        )
        assert response.status == 401
    assert threads and not any(threads), threads


def _on_loop_check(function: Any, threads: list[bool]) -> Any:
    def wrapped(*args: Any) -> Any:
        threads.append(threading.current_thread() is threading.main_thread())
        return function(*args)

    return wrapped


async def test_an_outage_is_a_few_log_lines(
    app: App, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Fifty requests failing at once on a database outage write one line, not fifty; the
    next line says how many were kept quiet."""
    cookie = await login(app, "greg")
    assert app.service is not None

    async def failing(*args: object) -> None:
        raise DatabaseError("PostgreSQL postgresql://h/db: connection refused")

    monkeypatch.setattr(app.service.store, "directory", failing)
    for _ in range(50):
        response = await asgi.request(app, "GET", "/api/directory", headers={"cookie": cookie})
        assert response.status == 503
    lines = [r.getMessage() for r in caplog.records if "connection refused" in r.getMessage()]
    assert lines == ["GET /api/directory failed: PostgreSQL postgresql://h/db: connection refused"]
    monkeypatch.setattr(app.service.outages, "every", 0.0)
    await asgi.request(app, "GET", "/api/directory", headers={"cookie": cookie})
    assert caplog.records[-1].getMessage().endswith("(49 more failed since the last such line)")


async def test_healthz_answers_while_the_database_hangs(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database that neither answers nor lets go of a cancelled ping (a frozen server)
    does not hold /healthz: it answers 503 after its timeout."""
    assert app.service is not None
    release = asyncio.Event()

    async def frozen() -> None:
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await release.wait()

    monkeypatch.setattr(app.service.store, "ping", frozen)
    monkeypatch.setattr("wsfanout.views.HEALTH_TIMEOUT", 0.1)
    try:
        response = await asyncio.wait_for(asgi.request(app, "GET", "/healthz"), 10)
    finally:
        release.set()
    assert response.status == 503
    assert response.json()["checks"]["database"] == "failing: no answer within 0.1 s"
