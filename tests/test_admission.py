"""admission: seats, deadlines, who a request is (cookie or token) and the handshake's checks."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest

from tests import asgi
from tests.conftest import login
from wsfanout import App, Settings, create_app
from wsfanout.admission import Admission, Deadlines, Login, Refusal, Seats, resume
from wsfanout.protocol import Position
from wsfanout.sessions import Session
from wsfanout.tokens import Claims, TokenError

SECRET = "a-jwt-secret-of-at-least-thirty-two-bytes"


def token(sub: str = "zed", **claims: Any) -> str:
    payload = {"sub": sub, "exp": time.time() + 600, "groups": ["chess"], **claims}
    return jwt.encode(payload, SECRET, algorithm="HS256")


def scope(cookie: str | None = None, query: str = "", **headers: str) -> dict[str, Any]:
    """A websocket handshake's scope, as the server hands it over."""
    sent = {"host": "testserver", **headers}
    if cookie is not None:
        sent["cookie"] = cookie
    return {
        "type": "websocket",
        "path": "/",
        "query_string": query.encode(),
        "headers": [(k.encode(), v.encode()) for k, v in sent.items()],
    }


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[App]:
    """The demo users, with connection tokens on and room for two connections per user."""
    application = create_app(
        dataclasses.replace(settings, jwt_secret=SECRET, max_connections_per_user=2)
    )
    await application.startup()
    yield application
    await application.shutdown()


def admission(app: App) -> Admission:
    assert app.service is not None
    return app.service.admission


# Seats


def test_seats_hold_the_total_and_each_users_limit() -> None:
    """Seats are counted per user case-insensitively; a full limit says which it is."""
    seats = Seats(total=3, per_user=2)
    assert seats.take("greg") is None
    assert seats.take("GREG") is None
    assert seats.take("Greg") == "user"
    assert seats.take("amanda") is None
    assert seats.take("lisa") == "total"
    assert seats.taken == 3
    seats.give_back("greg")
    assert seats.take("lisa") is None
    assert seats.take("greg") == "total"


def test_a_seat_not_taken_cannot_be_given_back() -> None:
    """Giving back more than was taken is a bug, and says whose."""
    seats = Seats(total=3, per_user=2)
    seats.take("greg")
    seats.give_back("Greg")
    with pytest.raises(RuntimeError, match="'greg'"):
        seats.give_back("greg")
    assert seats.taken == 0


# Deadlines


class Expiring:
    def __init__(self) -> None:
        self.expired = 0

    def expire(self) -> None:
        self.expired += 1


async def test_deadlines_expire_what_is_due_once_and_not_what_was_discarded() -> None:
    """Due items expire once, within about a second; discarded and later ones do not."""
    now = 1000.0
    deadlines = Deadlines(lambda: now)
    due, discarded, later = Expiring(), Expiring(), Expiring()
    deadlines.add(999.5, due)
    deadlines.add(999.5, discarded)
    deadlines.discard(999.5, discarded)
    deadlines.add(1060.0, later)
    try:
        started = time.monotonic()
        while not due.expired:
            assert time.monotonic() - started < 3.0
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.2)  # another pass of the checker
        assert (due.expired, discarded.expired, later.expired) == (1, 0, 0)
    finally:
        await deadlines.close()


# Who a request is


async def test_credentials_a_cookie_a_token_or_nothing(app: App) -> None:
    """A cookie gives its session; a token (query or bearer header) its claims; neither, None."""
    cookie = await login(app, "greg")
    found = admission(app).credentials(scope(cookie))
    assert isinstance(found, Session) and found.username == "greg"
    claims = admission(app).credentials(scope(query=f"token={token()}"))
    assert isinstance(claims, Claims) and (claims.username, claims.groups) == ("zed", ("chess",))
    bearer = admission(app).credentials(scope(authorization=f"Bearer {token('yan')}"))
    assert isinstance(bearer, Claims) and bearer.username == "yan"
    assert admission(app).credentials(scope()) is None
    assert admission(app).credentials(scope("wsfanout_session=forged")) is None


async def test_a_bad_token_is_refused_unless_a_good_cookie_came_with_a_header(app: App) -> None:
    """A bad token in the query is refused, cookie or not; one in a header (perhaps a proxy's)
    gives way to a good cookie."""
    cookie = await login(app, "greg")
    forged = token() + "x"
    with pytest.raises(TokenError):
        admission(app).credentials(scope(cookie, query=f"token={forged}"))
    with pytest.raises(TokenError):
        admission(app).credentials(scope(authorization=f"Bearer {forged}"))
    found = admission(app).credentials(scope(cookie, authorization=f"Bearer {forged}"))
    assert isinstance(found, Session) and found.username == "greg"


async def test_confirm_and_login(app: App) -> None:
    """A live session is its user with their groups; a revoked one, None; a token needs no row."""
    cookie = await login(app, "amanda")
    found = admission(app).credentials(scope(cookie))
    assert isinstance(found, Session)
    live = await admission(app).confirm(found)
    assert live is not None
    assert (live.username, live.first_name, live.groups) == ("amanda", "Amanda", ("girls",))
    assert live.session_id == found.session_id
    assert await admission(app).login(scope(cookie)) == live
    claims = admission(app).credentials(scope(query=f"token={token(name='Zed')}"))
    assert isinstance(claims, Claims)
    assert await admission(app).confirm(claims) == Login(
        "zed", "Zed", ("chess",), claims.expires_at, None
    )
    assert app.service is not None
    await app.service.store.revoke_session(found.session_id)
    assert await admission(app).confirm(found) is None
    assert await admission(app).login(scope(cookie)) is None
    assert await admission(app).login(scope(query="token=bad")) is None  # anonymous, not a 500


# The handshake


async def test_admit_takes_a_seat_and_says_what_to_resume(app: App) -> None:
    """An admitted handshake holds a seat of its user's; its resume positions come with it."""
    cookie = await login(app, "greg")
    query = asgi.resume_query({"all": {"epoch": "e1", "offset": 3}})
    before = time.monotonic()
    who, seen, announce, since = await admission(app).admit(scope(cookie, query))
    assert who.username == "greg" and who.groups == ("boys",)
    assert seen == {"all": Position("e1", 3)}
    assert announce == ()  # presence events are off in these settings
    assert since >= before
    seats = admission(app).seats
    assert seats.taken == 1
    seats.give_back("greg")


@pytest.mark.parametrize(
    ("given", "status", "label"),
    [
        ({"origin": "https://elsewhere.example"}, 403, "origin"),
        ({}, 403, "no_session"),
        ({"query": "token=bad"}, 403, "bad_token"),
        ({"query": "resume=%7B"}, 400, "bad_resume"),
        ({"query": "resume=1&resume=2"}, 400, "bad_resume"),
    ],
)
async def test_admit_refuses_before_taking_a_seat(
    app: App, given: dict[str, str], status: int, label: str
) -> None:
    """Each refusal has its status and its label; none holds a seat afterwards."""
    query = given.pop("query", "")
    cookie = None if label in ("no_session", "bad_token") else await login(app, "greg")
    with pytest.raises(Refusal) as refused:
        await admission(app).admit(scope(cookie, query, **given))
    assert (refused.value.status, refused.value.label) == (status, label)
    assert admission(app).seats.taken == 0


async def test_admit_refuses_past_the_limits_and_revoked_sessions(app: App) -> None:
    """A user's third connection is 429; a revoked session is 403 and gives its seat back."""
    cookie = await login(app, "greg")
    for _ in range(2):
        await admission(app).admit(scope(cookie))
    with pytest.raises(Refusal) as refused:
        await admission(app).admit(scope(cookie))
    assert (refused.value.status, refused.value.label) == (429, "user_full")
    seats = admission(app).seats
    for _ in range(2):
        seats.give_back("greg")
    found = admission(app).credentials(scope(cookie))
    assert isinstance(found, Session) and app.service is not None
    await app.service.store.revoke_session(found.session_id)
    with pytest.raises(Refusal) as refused:
        await admission(app).admit(scope(cookie))
    assert (refused.value.status, refused.value.label) == (403, "revoked")
    assert seats.taken == 0


async def test_admit_refuses_when_full_or_shutting_down(settings: Settings) -> None:
    """No seat left in all is 503 ``full``; a draining service is 503 ``shutting_down``."""
    application = create_app(dataclasses.replace(settings, max_connections=0))
    await application.startup()
    try:
        cookie = await login(application, "greg")
        with pytest.raises(Refusal) as refused:
            await admission(application).admit(scope(cookie))
        assert (refused.value.status, refused.value.label) == (503, "full")
        await application.drain()
        with pytest.raises(Refusal) as refused:
            await admission(application).admit(scope(cookie))
        assert (refused.value.status, refused.value.label) == (503, "shutting_down")
    finally:
        await application.shutdown()


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", None),
        ("token=x", None),
        (asgi.resume_query({}), {}),
        (asgi.resume_query({"user:greg": {"epoch": "z", "offset": 0}}), {"user:greg": ("z", 0)}),
    ],
)
def test_resume_reads_the_query(query: str, expected: dict[str, tuple[str, int]] | None) -> None:
    """The positions a handshake asks to resume from; other parameters are not its business."""
    found = resume(scope(query=query))
    if expected is None:
        assert found is None
    else:
        assert found == {stream: Position(*where) for stream, where in expected.items()}
