"""Control (DESIGN 5.3, 6): revocation, live membership and connection tokens, on real
hypercorn, across two nodes through real Redis; and control.py's own doors on one node,
in process."""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import redis.asyncio
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests import asgi
from tests.conftest import login
from tests.outboxes import eventually
from tests.server import Client, Server, delete_redis_keys, http, need_redis
from wsfanout import App
from wsfanout.cli import demo_password
from wsfanout.control import REVOKED

KEY = "control-test-key"
SECRET = "a-jwt-secret-of-at-least-thirty-two-bytes"
AUTH = {"authorization": f"Bearer {KEY}"}
REDIS_URL = "redis://127.0.0.1:6379/0"
CLOSED_WITHIN = 1.0  # seconds: DESIGN 5.3


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory, demo_db: Path) -> Iterator[list[Server]]:
    """Two hypercorn nodes sharing one database, one secret and one Redis prefix."""
    need_redis()
    shared = tmp_path_factory.mktemp("control")
    shutil.copy(demo_db, shared / "wsfanout.sqlite3")
    prefix = f"wsfanout-test-{uuid.uuid4().hex[:10]}:"
    env = {
        "WSFANOUT_DATABASE": str(shared / "wsfanout.sqlite3"),
        "WSFANOUT_SECRET_KEY": "control-secret",
        "WSFANOUT_API_KEYS": KEY,
        "WSFANOUT_REDIS_URL": REDIS_URL,
        "WSFANOUT_REDIS_PREFIX": prefix,
        "WSFANOUT_JWT_SECRET": SECRET,
        "WSFANOUT_RATE_LIMIT": "0",
    }
    servers = [Server(tmp_path_factory.mktemp(f"node{n}"), env) for n in range(2)]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()
        delete_redis_keys(prefix)
    for server in servers:
        log = server.log_path.read_text()
        assert "Traceback" not in log, log


def api(node: Server, method: str, path: str, body: Any = None) -> tuple[int, str]:
    status, headers = http(method, node.http_url + path, body, AUTH)
    return status, headers["_body"]


def add_user(node: Server, name: str, groups: list[str] | None = None) -> str:
    """A new user (password: demo_password), logged in on ``node``; the cookie."""
    body = {"username": name, "password": demo_password(name), "groups": groups or []}
    assert api(node, "POST", "/api/users", body)[0] == 201
    return node.login(name)


async def closed(client: Client, within: float = CLOSED_WITHIN) -> tuple[int | None, list[Any]]:
    """Wait for the server to close the socket; its close code and the events before."""
    await asyncio.wait_for(client.reader, within)
    events = []
    while not client.events.empty():
        events.append(client.events.get_nowait())
    return client.conn.close_code, events


async def refused(url: str, **headers: str) -> int:
    """The HTTP status of a handshake the server refuses."""
    with pytest.raises(InvalidStatus) as caught:
        async with connect(url, additional_headers=headers):
            pass
    return caught.value.response.status_code


def logout(node: Server, cookie: str) -> None:
    status, _ = http("POST", node.http_url + "/logout", {}, {"cookie": cookie})
    assert status == 200


# Each revokes the session(s) of user ``name`` through ``node``; (status, expected status).
REVOCATIONS: dict[str, Callable[[Server, str, str], tuple[int, int]]] = {
    "logout": lambda node, name, cookie: (
        http("POST", node.http_url + "/logout", {}, {"cookie": cookie})[0],
        200,
    ),
    "password": lambda node, name, cookie: (
        api(node, "PUT", f"/api/users/{name}/password", {"password": "new-password"})[0],
        204,
    ),
    "delete": lambda node, name, cookie: (api(node, "DELETE", f"/api/users/{name}")[0], 204),
    "disconnect": lambda node, name, cookie: (
        api(node, "POST", f"/api/users/{name}/disconnect")[0],
        204,
    ),
}


@pytest.mark.parametrize("how", sorted(REVOCATIONS))
async def test_a_revoked_session_is_closed_on_every_node_and_refused(
    nodes: list[Server], how: str
) -> None:
    """Logout, a password change, deleting the user and an operator's disconnect close the
    user's sockets on both nodes with 1008 within a second (after a `forbidden` frame);
    the cookie is then refused at the handshake (403) and on the HTTP routes."""
    here, there = nodes
    name = f"rev{how}"
    cookie = add_user(here, name)
    others = await Client.open(there.ws_url, there.login("greg"))
    sockets = [await Client.open(node.ws_url, cookie) for node in (here, there, there)]
    for client in (*sockets, others):
        assert (await client.next())["type"] == "welcome"
    started = time.monotonic()
    status, expected = REVOCATIONS[how](here, name, cookie)
    assert status == expected
    for client in sockets:
        code, events = await closed(client)
        assert code == 1008
        assert [(e["type"], e.get("code")) for e in events] == [("error", "forbidden")]
    print(f"{how}: all closed {time.monotonic() - started:.3f} s after the request")
    for node in nodes:
        assert await refused(node.ws_url, cookie=cookie) == 403
        status, headers = http("GET", node.http_url + "/api/directory", None, {"cookie": cookie})
        assert status == 401
        status, headers = http("GET", node.http_url + "/", None, {"cookie": cookie})
        assert "static/login.js" in headers["_body"]  # redirected to the login page
    assert await others.quiet() == []  # nobody else was touched
    await others.close()


async def test_logout_revokes_only_that_session(nodes: list[Server]) -> None:
    """Two logins of one user: logging one out leaves the other's sockets and cookie alone."""
    here, there = nodes
    add_user(here, "twice")
    first, second = here.login("twice"), there.login("twice")
    a, b = await Client.open(there.ws_url, first), await Client.open(there.ws_url, second)
    assert (await a.next())["type"] == (await b.next())["type"] == "welcome"
    logout(here, first)
    assert (await closed(a))[0] == 1008
    await b.send({"type": "direct", "user_name": "twice", "text": "still here", "id": "d"})
    assert (await b.next_of("message"))["text"] == "still here"
    assert await refused(here.ws_url, cookie=first) == 403
    c = await Client.open(here.ws_url, second)
    assert (await c.next())["type"] == "welcome"
    for client in (b, c):
        await client.close()


async def test_membership_is_live_on_every_node(nodes: list[Server]) -> None:
    """Added to a group: sockets on both nodes get `joined`, then the group's messages (and
    a presence answer for it); removed: `left`, and nothing more from the group."""
    here, there = nodes
    cookie = add_user(here, "joiner")
    sockets = [await Client.open(node.ws_url, cookie) for node in (here, there)]
    for client in sockets:
        welcome = await client.next()
        assert welcome["groups"] == []
    assert api(here, "PUT", "/api/users/joiner/groups/boys")[0] == 204
    for client in sockets:
        assert await client.next(CLOSED_WITHIN) == {"type": "joined", "group": "boys"}
    await _until_subscribed(here, "g:boys", 2)  # both nodes hear the group's channel
    body = {"type": "group", "group": "boys", "text": "to boys", "from": "ops"}
    assert api(here, "POST", "/api/publish", body)[0] == 202
    for client in sockets:
        assert (await client.next_of("message"))["text"] == "to boys"
    await sockets[1].send({"type": "presence", "group": "boys", "id": "p"})
    assert (await sockets[1].next_of("presence"))["group"] == "boys"
    # Idempotent: a second PUT tells nobody anything.
    assert api(here, "PUT", "/api/users/joiner/groups/boys")[0] == 204
    assert api(there, "DELETE", "/api/users/joiner/groups/boys")[0] == 204
    for client in sockets:
        assert await client.next(CLOSED_WITHIN) == {"type": "left", "group": "boys"}
    assert api(here, "POST", "/api/publish", body)[0] == 202
    marker = {"type": "direct", "user_name": "joiner", "text": "marker", "from": "ops"}
    assert api(here, "POST", "/api/publish", marker)[0] == 202
    for client in sockets:
        assert [e.get("text") for e in [await client.next_of("message")]] == ["marker"]
        await client.send({"type": "presence", "group": "boys", "id": "p2"})
        answer = await client.next_of("error")
        assert (answer["code"], answer["id"]) == ("forbidden", "p2")
    # A later welcome carries the group's stream only while a member.
    assert api(here, "PUT", "/api/users/joiner/groups/girls")[0] == 204
    fresh = await Client.open(there.ws_url, cookie)
    welcome = await fresh.next()
    assert welcome["groups"] == ["girls"]
    assert "group:girls" in welcome["streams"]
    for client in (*sockets, fresh):
        await client.close()


async def test_deleting_a_group_tells_its_members(nodes: list[Server]) -> None:
    """A deleted group's members, connected on either node, get `left`."""
    here, there = nodes
    assert api(here, "POST", "/api/groups", {"name": "doomed"})[0] == 201
    cookie = add_user(here, "member", ["doomed"])
    client = await Client.open(there.ws_url, cookie)
    assert (await client.next())["groups"] == ["doomed"]
    assert api(here, "DELETE", "/api/groups/doomed")[0] == 204
    assert await client.next(CLOSED_WITHIN) == {"type": "left", "group": "doomed"}
    status, body = api(here, "GET", "/api/users/member")
    assert status == 200 and '"groups":[]' in body
    await client.close()


def token(sub: str, groups: list[str], lifetime: float = 300, **extra: Any) -> str:
    claims = {"sub": sub, "groups": groups, "exp": int(time.time() + lifetime), **extra}
    return jwt.encode(claims, SECRET, algorithm="HS256")


async def test_token_users_need_no_row(nodes: list[Server]) -> None:
    """Users from the operator's backend connect with a token (query or header) on either
    node: they get their groups' messages and Direct by `sub`, and presence sees them."""
    here, there = nodes
    alice = await Client.open(
        here.ws_url + "?token=" + token("alice", ["backend"], name="Alice"), cookie=""
    )
    bob = await Client.open(
        there.ws_url, cookie="", authorization="Bearer " + token("bob", ["backend"])
    )
    welcome = await alice.next()
    assert (welcome["user"], welcome["first_name"], welcome["groups"]) == (
        "alice",
        "Alice",
        ["backend"],
    )
    assert (await bob.next())["user"] == "bob"
    await _until_subscribed(here, "g:backend", 2)  # both nodes hear the group's channel
    await bob.send({"type": "group", "group": "backend", "text": "hi team", "id": "g"})
    assert (await alice.next_of("message"))["text"] == "hi team"
    assert (await bob.next_of("message"))["text"] == "hi team"
    await alice.send({"type": "direct", "user_name": "bob", "text": "hi bob", "id": "d"})
    got = await bob.next_of("message")
    assert (got["text"], got["from"], got["stream"]) == ("hi bob", "alice", "user:bob")
    await alice.send({"type": "presence", "group": "backend", "id": "p"})
    answer = await alice.next_of("presence")
    assert (answer["online"], answer["count"]) == (["alice", "bob"], 2)
    # An operator's disconnect reaches token users too (they have no row).
    assert api(here, "POST", "/api/users/bob/disconnect")[0] == 204
    assert (await closed(bob))[0] == 1008
    await alice.close()


def _unsigned(sub: str) -> str:
    import base64
    import json

    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return part({"alg": "none", "typ": "JWT"}) + "." + part({"sub": sub, "exp": 2**40}) + "."


BAD_TOKENS: dict[str, Callable[[], str]] = {
    "expired": lambda: token("eve", [], lifetime=-10),
    "alg none": lambda: _unsigned("eve"),
    "other algorithm": lambda: jwt.encode(
        {"sub": "eve", "exp": int(time.time() + 60)}, SECRET * 2, algorithm="HS512"
    ),
    "wrong secret": lambda: jwt.encode(
        {"sub": "eve", "exp": int(time.time() + 60)}, "x" * 40, algorithm="HS256"
    ),
    "no exp": lambda: jwt.encode({"sub": "eve"}, SECRET, algorithm="HS256"),
    "malformed": lambda: "not.a.token",
}


@pytest.mark.parametrize("kind", sorted(BAD_TOKENS))
async def test_bad_tokens_are_refused_and_logged_once(nodes: list[Server], kind: str) -> None:
    """Expired, unsigned, other-algorithm, wrongly signed and malformed tokens: 403, and
    one log line with the reason."""
    here = nodes[0]
    before = here.log_path.read_text().count("token refused")
    assert await refused(here.ws_url + "?token=" + BAD_TOKENS[kind]()) == 403
    # the server's log reaches the file in its own time
    await eventually(lambda: here.log_path.read_text().count("token refused") > before, 10)
    await asyncio.sleep(0.2)  # a second line, if any, would follow the first at once
    assert here.log_path.read_text().count("token refused") == before + 1


async def test_a_token_expiring_while_connected_closes_the_socket(nodes: list[Server]) -> None:
    """A socket opened with a token closes with 1008 at the token's `exp` (after a
    `forbidden` frame that says so)."""
    here = nodes[0]
    exp = int(time.time()) + 2
    claims = {"sub": "brief", "groups": [], "exp": exp}
    client = await Client.open(here.ws_url + "?token=" + jwt.encode(claims, SECRET), cookie="")
    assert (await client.next())["type"] == "welcome"
    code, events = await closed(client, within=exp - time.time() + 2.5)
    assert code == 1008
    assert time.time() >= exp
    assert [e["code"] for e in events if e["type"] == "error"] == ["forbidden"]


async def test_tokens_reach_only_names_someone_holds(nodes: list[Server]) -> None:
    """With tokens on, a group or user the store does not know is accepted only while
    someone is online in it (on any node): made-up names are refused, so nobody can fill
    Redis with streams no one listens to."""
    here, there = nodes
    sender = await Client.open(here.ws_url + "?token=" + token("sender", []), cookie="")
    holder = await Client.open(there.ws_url + "?token=" + token("holder", ["club"]), cookie="")
    try:
        assert (await sender.next())["type"] == (await holder.next())["type"] == "welcome"
        await _until_online(holder, "club", "holder")
        await _names_someone_holds_reach(sender, holder)
    finally:
        for client in (sender, holder):
            await client.close()


async def _until_subscribed(node: Server, channel: str, nodes: int) -> None:
    """Wait until this many nodes are subscribed to one of the backplane's channels in Redis
    (``PUBSUB NUMSUB``), instead of guessing how long a SUBSCRIBE takes."""
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    name = node.env["WSFANOUT_REDIS_PREFIX"] + channel
    deadline = time.monotonic() + 10
    try:
        while (await client.pubsub_numsub(name))[0][1] < nodes:
            assert time.monotonic() < deadline, f"{channel}: not {nodes} subscribers"
            await asyncio.sleep(0.02)
    finally:
        await client.aclose()


async def _until_online(client: Client, group: str, user: str) -> None:
    """Ask for the group's presence (across nodes, from Redis) until it names ``user``."""
    deadline = time.monotonic() + 10
    while True:
        await client.send({"type": "presence", "group": group, "id": "p"})
        if user in (await client.next_of("presence"))["online"]:
            return
        assert time.monotonic() < deadline, f"{user} never showed online in {group}"
        await asyncio.sleep(0.05)


async def _names_someone_holds_reach(sender: Client, holder: Client) -> None:
    frames = [
        {"type": "group", "group": "club", "text": "to club", "id": "ok1"},
        {"type": "direct", "user_name": "HOLDER", "text": "to holder", "id": "ok2"},
        {"type": "group", "group": "nobody-here", "text": "x", "id": "bad1"},
        {"type": "direct", "user_name": "nobody", "text": "x", "id": "bad2"},
    ]
    for frame in frames:
        await sender.send(frame)
    # An ack waits for Redis to take the message, a refusal does not: answers come in
    # any order, and each names its frame.
    answers: dict[str, Any] = {}
    while len(answers) < len(frames):
        event = await sender.next()
        if event["type"] in ("ack", "error"):
            answers[event["id"]] = event
    assert {key: (a["type"], a.get("code")) for key, a in answers.items()} == {
        "ok1": ("ack", None),
        "ok2": ("ack", None),
        "bad1": ("error", "unknown_group"),
        "bad2": ("error", "unknown_user"),
    }
    got = [await holder.next_of("message") for _ in range(2)]
    assert [(m["text"], m["stream"]) for m in got] == [
        ("to club", "group:club"),
        ("to holder", "user:holder"),  # one stream per user, however the name is typed
    ]


async def test_a_good_cookie_wins_over_a_bad_bearer_header(nodes: list[Server]) -> None:
    """A proxy's own `Authorization: Bearer` must not lock cookie users out; a bad token
    in the query is still refused."""
    here = nodes[0]
    cookie = here.login("chuck")
    client = await Client.open(here.ws_url, cookie, authorization="Bearer not-a-jwt")
    assert (await client.next())["user"] == "chuck"
    await client.close()
    assert await refused(here.ws_url + "?token=not-a-jwt", cookie=cookie) == 403


async def test_concurrent_membership_changes_end_as_the_store_says(nodes: list[Server]) -> None:
    """A join on one node and a leave on the other at the same moment, many times: after
    each, every socket on both nodes is in the group exactly when the store says so,
    whatever order each node heard the two changes in."""
    here, there = nodes
    cookie = add_user(here, "flipper")
    sockets = [await Client.open(node.ws_url, cookie) for node in (here, there)]
    for client in sockets:
        assert (await client.next())["type"] == "welcome"
    wrong = 0
    for n in range(25):
        await asyncio.gather(
            asyncio.to_thread(api, here, "PUT", "/api/users/flipper/groups/girls"),
            asyncio.to_thread(api, there, "DELETE", "/api/users/flipper/groups/girls"),
        )
        await asyncio.sleep(0.15)  # the changes and their Redis subscriptions settle
        member = '"girls"' in api(here, "GET", "/api/users/flipper")[1]
        for text, body in (
            ("probe", {"type": "group", "group": "girls"}),
            ("marker", {"type": "direct", "user_name": "flipper"}),
        ):
            assert api(here, "POST", "/api/publish", {**body, "text": f"{text}{n}"})[0] == 202
        for client in sockets:
            texts: list[str] = []
            while f"marker{n}" not in texts:
                texts.append((await client.next_of("message"))["text"])
            wrong += texts != ([f"probe{n}", f"marker{n}"] if member else [f"marker{n}"])
    assert wrong == 0
    for client in sockets:
        await client.close()


# One node, in process: the collaborator through its own doors (control.py)


def session_of(app: App, cookie: str) -> str:
    """The session id a ``Cookie`` header names."""
    assert app.service is not None
    session = app.service.codec.verify(cookie.partition("=")[2])
    assert session is not None
    return session.session_id


async def test_make_revoke_closes_that_session_only(app: App) -> None:
    """Revoking one session closes its sockets (a `forbidden` frame, then 1008); the same
    user's other session keeps its socket."""
    assert app.service is not None
    first, second = await login(app, "greg"), await login(app, "greg")
    async with (
        asgi.WebSocket(app, headers={"cookie": first}) as a,
        asgi.WebSocket(app, headers={"cookie": second}) as b,
    ):
        await a.receive(), await b.receive()
        change = {"op": "revoke", "user": "greg", "session": session_of(app, first)}
        await app.service.control.make(change)
        events = await a.until_closed()
        assert a.close_code == 1008
        assert [(e["type"], e["code"], e["detail"]) for e in events] == [
            ("error", "forbidden", REVOKED)
        ]
        assert await b.nothing()
        await app.service.control.make({"op": "revoke", "user": "GREG", "session": None})
        await b.until_closed()
        assert b.close_code == 1008


async def test_closing_stops_regroup_reads_under_way(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A membership change reads the user's groups in a task of its own; closing the
    collaborator (the service closing) cancels a read still waiting on the store."""
    assert app.service is not None
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def stuck(name: str) -> None:
        started.set()
        try:
            await asyncio.Event().wait()  # a database that never answers
        except asyncio.CancelledError:
            cancelled.set()
            raise

    monkeypatch.setattr(app.service.store, "user_by_name", stuck)
    app.service.control.apply({"op": "member", "user": "mike"})
    await asyncio.wait_for(started.wait(), 10)
    await asyncio.wait_for(app.service.control.close(), 10)
    assert cancelled.is_set()


async def test_membership_changes_reach_open_connections(app: App) -> None:
    """A member change makes the user's sockets take the store's groups (`joined`, `left`);
    a deleted group is left by its members."""
    assert app.service is not None
    svc = app.service
    cookie = await login(app, "greg")
    async with asgi.WebSocket(app, headers={"cookie": cookie}) as greg:
        await greg.receive()
        await svc.store.set_member("greg", "girls", True)
        await svc.control.make({"op": "member", "user": "Greg"})
        assert await greg.receive() == {"type": "joined", "group": "girls"}
        await svc.store.set_member("greg", "girls", False)
        await svc.control.make({"op": "member", "user": "greg"})
        assert await greg.receive() == {"type": "left", "group": "girls"}
        await svc.control.make({"op": "group_deleted", "group": "boys"})
        assert await greg.receive() == {"type": "left", "group": "boys"}
        assert await greg.nothing()


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"op": "revoke", "user": "greg", "session": "another"}, None),
        ({"op": "revoke", "user": "mike", "session": None}, None),
        ({"op": "revoke", "user": "Greg", "session": None}, 1008),
        ({"op": "revoke", "user": "greg", "session": "ours"}, 1008),
        ({"op": "member", "user": "mike"}, None),
        ({"op": "member", "user": "GREG"}, 1012),
        ({"op": "group_deleted", "group": "girls"}, None),
        ({"op": "group_deleted", "group": "boys"}, 1012),
    ],
)
async def test_changed_since_catches_a_handshake_under_way(
    app: App, change: dict[str, Any], code: int | None
) -> None:
    """A change made after a login was checked closes the connection it is becoming: 1008
    for its session (or all of its user's) revoked, 1012 for its user's groups changed;
    a change made before the check, or to someone else, does not."""
    assert app.service is not None
    control = app.service.control
    cookie = await login(app, "greg")
    who = await app.service.admission.login(
        {"type": "http", "headers": [(b"cookie", cookie.encode())]}
    )
    assert who is not None
    if change.get("session") == "ours":
        change = {**change, "session": who.session_id}
    since = time.monotonic()
    assert control.changed_since(who, since) is None
    await control.make(change)
    assert control.changed_since(who, since) == code
    assert control.changed_since(who, time.monotonic()) is None
