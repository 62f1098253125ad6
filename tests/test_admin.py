"""admin: the admin API's routes and errors, in process, on one node (no backplane)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote

import orjson
import pytest

from tests import asgi
from tests.conftest import login, started
from wsfanout.app import App
from wsfanout.config import Settings
from wsfanout.store import sessions as store_sessions

KEY = "admin-key"
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture
def settings(settings_on_each_backend: Settings) -> Settings:
    """Every test here runs on SQLite and on PostgreSQL."""
    return settings_on_each_backend


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[App]:
    async with started(settings, api_keys=(KEY,)) as application:
        yield application


async def call(app: App, method: str, path: str, body: Any = None, **kw: Any) -> asgi.Response:
    headers = {**AUTH, **kw.pop("headers", {})}
    if isinstance(body, bytes):
        return await asgi.request(app, method, path, body=body, headers=headers, **kw)
    return await asgi.request(app, method, path, json=body, headers=headers, **kw)


async def test_users_round_trip(app: App) -> None:
    """Create, read, list, change the password of, and delete a user."""
    body = {"username": "zoe", "password": "zoe-password", "first_name": "Zoe", "groups": ["girls"]}
    created = await call(app, "POST", "/api/users", body)
    assert (created.status, created.json()) == (
        201,
        {"username": "zoe", "first_name": "Zoe", "groups": ["girls"]},
    )
    assert (await call(app, "GET", "/api/users/ZOE")).json()["username"] == "zoe"
    listed = (await call(app, "GET", "/api/users?q=z&limit=1")).json()
    assert listed == {"users": [{"username": "zoe", "first_name": "Zoe"}], "truncated": False}
    assert (
        await call(app, "PUT", "/api/users/zoe/password", {"password": "new-password"})
    ).status == 204
    await login(app, "zoe", "new-password")
    deleted = await call(app, "DELETE", "/api/users/zoe")
    assert (deleted.status, deleted.body, deleted.header("content-type")) == (204, b"", None)
    assert deleted.header("content-length") is None  # a 204 says no length (RFC 9110)
    assert (await call(app, "GET", "/api/users/zoe")).status == 404


async def test_groups_round_trip(app: App) -> None:
    """Create a group, see it with its member count, add and remove a member, delete it."""
    assert (await call(app, "POST", "/api/groups", {"name": "chess"})).json() == {
        "name": "chess",
        "members": 0,
    }
    assert (await call(app, "PUT", "/api/users/greg/groups/chess")).status == 204
    assert (await call(app, "PUT", "/api/users/greg/groups/chess")).status == 204  # idempotent
    groups = (await call(app, "GET", "/api/groups")).json()["groups"]
    assert {"name": "chess", "members": 1} in groups
    assert (await call(app, "GET", "/api/users/greg")).json()["groups"] == ["boys", "chess"]
    assert (await call(app, "DELETE", "/api/users/greg/groups/chess")).status == 204
    assert (await call(app, "DELETE", "/api/users/greg/groups/chess")).status == 204
    assert (await call(app, "DELETE", "/api/groups/chess")).status == 204
    assert (await call(app, "DELETE", "/api/groups/chess")).status == 404


ERRORS = [
    ("POST", "/api/users", b"{", 400, "bad_json"),
    ("POST", "/api/users", [], 400, "bad_request"),
    ("POST", "/api/users", {"username": "x"}, 400, "bad_request"),
    ("POST", "/api/users", {"username": "x", "password": 5}, 400, "bad_request"),
    ("POST", "/api/users", {"username": "x", "password": ""}, 400, "invalid_name"),
    ("POST", "/api/users", {"username": "x", "password": "p" * 1025}, 400, "invalid_name"),
    ("POST", "/api/users", {"username": "bad name", "password": "p" * 8}, 400, "invalid_name"),
    ("POST", "/api/users", {"username": "x", "password": "p"}, 400, "invalid_name"),
    ("POST", "/api/users", {"username": "x", "password": "1234567"}, 400, "invalid_name"),
    ("PUT", "/api/users/greg/password", {"password": "p"}, 400, "invalid_name"),
    (
        "POST",
        "/api/users",
        {"username": "x", "password": "p" * 8, "groups": "boys"},
        400,
        "bad_request",
    ),
    (
        "POST",
        "/api/users",
        {"username": "x", "password": "p" * 8, "groups": [1]},
        400,
        "bad_request",
    ),
    (
        "POST",
        "/api/users",
        {"username": "x", "password": "p" * 8, "groups": ["no"]},
        404,
        "unknown_group",
    ),
    ("POST", "/api/users", {"username": "GREG", "password": "p" * 8}, 409, "conflict"),
    ("POST", "/api/users", b"x" * 70_000, 413, "too_large"),
    ("GET", "/api/users?limit=0", None, 400, "bad_request"),
    ("GET", "/api/users?limit=", None, 400, "bad_request"),
    ("GET", "/api/users?limit=%C2%B2", None, 400, "bad_request"),
    ("GET", "/api/users/nobody", None, 404, "unknown_user"),
    ("DELETE", "/api/users/nobody", None, 404, "unknown_user"),
    ("PUT", "/api/users/nobody/password", {"password": "p" * 8}, 404, "unknown_user"),
    ("PUT", "/api/users/greg/password", {"pass": "p"}, 400, "bad_request"),
    ("PUT", "/api/users/nobody/groups/boys", None, 404, "unknown_user"),
    ("PUT", "/api/users/greg/groups/nope", None, 404, "unknown_group"),
    ("DELETE", "/api/users/greg/groups/nope", None, 404, "unknown_group"),
    ("POST", "/api/users/nobody/disconnect", None, 404, "unknown_user"),
    ("POST", "/api/groups", {"name": "boys"}, 409, "conflict"),
    ("POST", "/api/groups", {"name": "no good"}, 400, "invalid_name"),
    ("POST", "/api/groups", {"title": "x"}, 400, "bad_request"),
    ("DELETE", "/api/groups/nope", None, 404, "unknown_group"),
    ("PATCH", "/api/groups", None, 405, "method_not_allowed"),
    ("GET", "/api/nothing", None, 404, "not_found"),
    ("GET", "/api/users/greg%2Fgroups%2Fboys", None, 404, "not_found"),
    ("PUT", "/api/users//password", {"password": "p" * 8}, 404, "not_found"),
    ("GET", "/api/groups/", None, 404, "not_found"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "code"), ERRORS)
async def test_errors_say_what_and_why(
    app: App, method: str, path: str, body: Any, status: int, code: str
) -> None:
    """Each mistake gets its status and a JSON {error, code}; nothing changes."""
    if "%2F" in path:  # as a server passes it: path decoded, raw_path as sent
        response = await asgi.request(
            app, method, unquote(path), headers=AUTH, raw_path=path.encode()
        )
    else:
        response = await call(app, method, path, body)
    assert response.status == status, response.body
    answer = orjson.loads(response.body)
    assert answer["code"] == code
    assert isinstance(answer["error"], str) and answer["error"]
    assert (await call(app, "GET", "/api/users/greg")).json()["groups"] == ["boys"]


async def test_a_password_has_the_minimum_length_set(settings: Settings) -> None:
    """WSFANOUT_MIN_PASSWORD_LENGTH (default 8) bounds new passwords from below: a shorter
    one is a 400 naming the setting, for a new user and for a changed password."""
    async with started(settings, api_keys=(KEY,), min_password_length=12) as app:
        created = await call(app, "POST", "/api/users", {"username": "x", "password": "p" * 11})
        changed = await call(app, "PUT", "/api/users/greg/password", {"password": "p" * 11})
        for response in (created, changed):
            assert (response.status, response.json()) == (
                400,
                {
                    "error": "a password has at least 12 characters "
                    "(WSFANOUT_MIN_PASSWORD_LENGTH); this one has 11",
                    "code": "invalid_name",
                },
            )
        long_enough = {"username": "x", "password": "p" * 12}
        assert (await call(app, "POST", "/api/users", long_enough)).status == 201


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Basic YTpi", "Bearer "])
async def test_a_missing_or_wrong_key_is_401(app: App, authorization: str | None) -> None:
    """No key, a wrong one, or another scheme: 401 with a code and WWW-Authenticate."""
    headers = {"authorization": authorization} if authorization is not None else {}
    response = await asgi.request(app, "DELETE", "/api/users/greg", headers=headers)
    assert response.status == 401
    assert response.json()["code"] == "unauthorized"
    assert response.header("www-authenticate") == 'Bearer realm="wsfanout"'
    assert (await call(app, "GET", "/api/users/greg")).status == 200


async def test_the_api_is_off_without_keys(settings: Settings) -> None:
    """No WSFANOUT_API_KEYS: every admin route is a 404 with a code saying how to turn it on."""
    async with started(settings) as app:
        response = await asgi.request(app, "GET", "/api/groups", headers=AUTH)
        assert (response.status, response.json()["code"]) == (404, "not_found")
        assert "WSFANOUT_API_KEYS" in response.json()["error"]
        assert (await asgi.request(app, "GET", "/api/openapi.json")).status == 200


async def test_revocation_and_membership_on_one_node(app: App) -> None:
    """Without a backplane: logout closes that session's sockets with 1008; a membership
    change reaches open sockets as joined/left."""
    cookie = await login(app, "lisa")
    async with asgi.WebSocket(app, headers={"cookie": cookie}) as ws:
        assert (await ws.receive())["groups"] == ["girls"]
        assert (await call(app, "PUT", "/api/users/lisa/groups/boys")).status == 204
        assert await ws.receive() == {"type": "joined", "group": "boys"}
        assert (await call(app, "DELETE", "/api/users/lisa/groups/girls")).status == 204
        assert await ws.receive() == {"type": "left", "group": "girls"}
        response = await asgi.request(app, "POST", "/logout", headers={"cookie": cookie})
        assert response.status == 200
        events = await ws.until_closed()
        assert [(e["type"], e["code"]) for e in events] == [("error", "forbidden")]
        assert ws.close_code == 1008
    with pytest.raises(asgi.Refused) as caught:
        async with asgi.WebSocket(app, headers={"cookie": cookie}):
            pass
    assert caught.value.status == 403


async def test_a_revocation_during_the_handshake_still_closes(settings: Settings) -> None:
    """A session revoked after its handshake checked it, before it joined the hub, is
    closed as soon as it joins (it was not there to be found by the revocation)."""
    async with started(settings, api_keys=(KEY,), presence_events_max=100) as app:
        cookie = await login(app, "anny")
        svc = app.service
        assert svc is not None
        real = svc.store.group_sizes

        async def revoke_meanwhile(names: list[str]) -> dict[str, int]:
            # The handshake asks for group sizes after checking the session.
            await call(app, "POST", "/api/users/anny/disconnect")
            return await real(names)

        svc.store.group_sizes = revoke_meanwhile  # type: ignore[method-assign]
        async with asgi.WebSocket(app, headers={"cookie": cookie}) as ws:
            events = await ws.until_closed()
        assert ("error", "forbidden") in [(e["type"], e.get("code")) for e in events]
        assert ws.close_code == 1008


async def test_members_only_groups(settings: Settings) -> None:
    """WSFANOUT_GROUP_WRITE=members: a non-member's group message is forbidden (a member's
    goes out), and the directory lists only the user's groups and who shares them."""
    async with started(settings, group_write="members") as app:
        cookie = await login(app, "greg")
        async with asgi.WebSocket(app, headers={"cookie": cookie}) as ws:
            await ws.receive()
            await ws.send_json({"type": "group", "group": "girls", "text": "x", "id": "1"})
            error = await ws.receive()
            assert (error["type"], error["code"], error["id"]) == ("error", "forbidden", "1")
            await ws.send_json({"type": "group", "group": "boys", "text": "y", "id": "2"})
            assert (await ws.receive())["text"] == "y"
        directory = (
            await asgi.request(app, "GET", "/api/directory", headers={"cookie": cookie})
        ).json()
        assert directory["groups"] == ["boys"]
        assert [u["username"] for u in directory["users"]] == ["chuck", "greg", "mike"]


async def test_disconnect_with_tokens_on_takes_any_username_but_no_other_name(
    settings: Settings,
) -> None:
    """With tokens on, a user with no row (a token's) can be disconnected; a name no
    username could be is still a 404."""
    async with started(settings, api_keys=(KEY,), jwt_secret="s" * 32) as app:
        assert (await call(app, "POST", "/api/users/token-user/disconnect")).status == 204
        bad = await call(app, "POST", "/api/users/a%20b/disconnect")
        assert (bad.status, bad.json()["code"]) == (404, "unknown_user")


async def test_the_oldest_session_past_the_limit_ends_with_its_sockets(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user keeps at most SESSIONS_PER_USER sessions: the login past it ends the oldest,
    whose open socket closes with 1008 and whose cookie is refused from then on."""
    monkeypatch.setattr(store_sessions, "SESSIONS_PER_USER", 2)
    oldest = await login(app, "mike")
    async with asgi.WebSocket(app, headers={"cookie": oldest}) as ws:
        await ws.receive()
        await login(app, "mike")
        await login(app, "mike")  # the third: the oldest goes
        events = await ws.until_closed()
        assert [(e["type"], e["code"]) for e in events] == [("error", "forbidden")]
        assert ws.close_code == 1008
    with pytest.raises(asgi.Refused):
        async with asgi.WebSocket(app, headers={"cookie": oldest}):
            pass
