"""Embedding (DESIGN 12): the host app's ``authenticate``, ``publish`` and ``online`` from its
own code, its lifecycle hooks, and ``WSFANOUT_PAGES=off``; in-process, through the driver."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import inspect
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import websockets
from itsdangerous import TimestampSigner

from tests import asgi, docs
from tests.conftest import login
from tests.listener import SERVER_ENV
from tests.receiver import Receiver, receiving
from tests.server import Server
from wsfanout import (
    App,
    Identity,
    MessageTooLargeError,
    PublishError,
    ServiceUnavailableError,
    Settings,
    UnknownGroupError,
    UnknownUserError,
    create_app,
    verify_webhook,
)
from wsfanout.types import Scope

KEY = "embedding-key"
AUTH = {"authorization": f"Bearer {KEY}"}


def host_user(scope: Scope) -> Identity | None:
    """The host's session, as a header its own middleware would have checked (and
    ``x-host-expires``, when it ends)."""
    headers = dict(scope["headers"])
    user = headers.get(b"x-host-user")
    if user is None:
        return None
    expires = float(headers[b"x-host-expires"]) if b"x-host-expires" in headers else None
    return Identity(user.decode(), groups=("chess",), name="Host " + user.decode(), expires=expires)


@contextlib.asynccontextmanager
async def embedded(settings: Settings, **kwargs: Any) -> AsyncIterator[App]:
    chat = create_app(dataclasses.replace(settings, api_keys=(KEY,)), **kwargs)
    await chat.startup()
    try:
        yield chat
    finally:
        await chat.shutdown()


class Recorder:
    """A hook that keeps every event, and can be made to hang or fail."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.gate: asyncio.Event | None = None  # set: hang on it before recording
        self.fail = False

    async def __call__(self, event: dict[str, Any]) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise RuntimeError("the host's hook failed")
        self.events.append(event)

    async def until(self, count: int) -> list[dict[str, Any]]:
        async with asyncio.timeout(5):
            while len(self.events) < count:  # noqa: ASYNC110 - the hook is the host's
                await asyncio.sleep(0.01)
        return self.events


async def eventually(ask: Callable[[], Any], expected: Any, within: float = 5) -> None:
    """Ask (sync or async) until the answer is ``expected``: what other tasks do takes a
    moment."""
    async with asyncio.timeout(within):
        while True:
            answer = ask()
            if inspect.isawaitable(answer):
                answer = await answer
            if answer == expected:
                return
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("make_async", [False, True], ids=["sync", "async"])
async def test_the_hosts_authenticate_logs_users_in_with_no_wsfanout_cookie(
    settings: Settings, make_async: bool
) -> None:
    """A plain or async ``authenticate`` decides who connects, with the groups it says
    (no row in the store needed); a handshake it does not claim falls through to the
    cookie; with neither, it is refused."""

    async def async_user(scope: Scope) -> Identity | None:
        return host_user(scope)

    async with embedded(settings, authenticate=async_user if make_async else host_user) as chat:
        async with asgi.WebSocket(chat, headers={"x-host-user": "hostie"}) as ws:
            welcome = await ws.receive()
            assert (welcome["user"], welcome["first_name"]) == ("hostie", "Host hostie")
            assert welcome["groups"] == ["chess"]
        cookie = await login(chat, "greg")
        async with asgi.WebSocket(chat, headers={"cookie": cookie}) as ws:
            assert (await ws.receive())["user"] == "greg"
        for headers in ({}, {"x-host-user": "late", "x-host-expires": str(time.time() - 1)}):
            with pytest.raises(asgi.Refused) as refused:
                async with asgi.WebSocket(chat, headers=headers):
                    pass
            assert refused.value.status == 403
        directory = await asgi.request(chat, "GET", "/api/directory", headers={"x-host-user": "h"})
        assert directory.status == 200  # the JS client's probe sees the host's login too
        assert "chess" in directory.json()["groups"]  # the host's group, not in the store


async def test_an_authenticate_that_fails_refuses_that_handshake_only(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception, or an answer that is not an Identity, refuses that handshake with a
    500 (the traceback in the log, not to the client); a connection already open goes on."""

    def fragile(scope: Scope) -> Any:
        headers = dict(scope["headers"])
        if b"x-explode" in headers:
            raise RuntimeError("the host's session store is down")
        if b"x-garbage" in headers:
            return "greg"
        return host_user(scope)

    async with (
        embedded(settings, authenticate=fragile) as chat,
        asgi.WebSocket(chat, headers={"x-host-user": "steady"}) as steady,
    ):
        await steady.receive()
        for header in ("x-explode", "x-garbage"):
            with pytest.raises(asgi.Refused) as refused:
                async with asgi.WebSocket(chat, headers={header: "1"}):
                    pass
            assert refused.value.status == 500
            assert b"session store" not in refused.value.body
        await chat.publish({"type": "direct", "user_name": "steady", "text": "still here"})
        assert (await steady.receive())["text"] == "still here"
    assert "the host's session store is down" in caplog.text


def test_an_identity_refuses_names_wsfanout_cannot_carry() -> None:
    """A bad username, a bad group, or a string given as the groups raise at once, in
    the host's code, not at some later handshake."""
    bad: list[dict[str, Any]] = [
        {"username": "no spaces"},
        {"username": "ok", "groups": ("bad group",)},
        {"username": "ok", "groups": "chess"},
        {"username": "ok", "expires": float("nan")},
    ]
    for fields in bad:
        with pytest.raises(ValueError, match="Identity"):
            Identity(**fields)
    assert Identity("ok", groups=["a", "a", "b"]).groups == ("a", "b")


async def test_publish_from_the_hosts_code_reaches_connections_marked_via_app(
    settings: Settings,
) -> None:
    """``publish()`` takes the API's items, one or a list, and they go out with
    ``"via": "app"``; a refused item raises its own exception, and nothing of its list
    is published. (Without ``authenticate`` or tokens, users and groups are the store's:
    a name it does not know is unknown.)"""
    async with (
        embedded(settings) as chat,
        asgi.WebSocket(chat, headers={"cookie": await login(chat, "greg")}) as ws,
    ):
        await ws.receive()
        assert await chat.publish({"type": "group", "group": "boys", "text": "a"}) == 1
        event = await ws.receive()
        assert (event["text"], event["via"], event["group"]) == ("a", "app", "boys")
        refusals: list[tuple[Any, type[PublishError], str]] = [
            ({"type": "group", "group": "nobody-here", "text": "x"}, UnknownGroupError, ""),
            ({"type": "direct", "user_name": "nobody", "text": "x"}, UnknownUserError, ""),
            ({"type": "broadcast", "text": "x" * 70_000}, MessageTooLargeError, ""),
            ({"type": "shout", "text": "x"}, PublishError, "bad_message"),
        ]
        for item, kind, code in refusals:
            with pytest.raises(kind) as raised:
                await chat.publish([{"type": "broadcast", "text": "never"}, item])
            assert raised.value.index == 1
            assert raised.value.code == (code or raised.value.code)
        assert await ws.nothing()  # not even the good first item went out
        batch = [{"type": "direct", "user_name": "GREG", "text": str(i)} for i in range(3)]
        assert await chat.publish(batch) == 3
        assert [(await ws.receive())["text"] for _ in range(3)] == ["0", "1", "2"]


async def test_publish_sync_runs_on_the_apps_loop_from_another_thread(settings: Settings) -> None:
    """A thread (a Django view) publishes with ``publish_sync``; on the app's own loop it
    refuses at once rather than block it."""
    async with (
        embedded(settings, authenticate=host_user) as chat,
        asgi.WebSocket(chat, headers={"x-host-user": "hostie"}) as ws,
    ):
        await ws.receive()
        answers: list[Any] = []

        def view() -> None:
            answers.append(chat.publish_sync({"type": "broadcast", "text": "from a view"}))
            try:
                chat.publish_sync({"type": "group", "group": "no such", "text": "x"})
            except PublishError as exc:
                answers.append(exc.code)

        thread = threading.Thread(target=view)
        thread.start()
        assert (await ws.receive())["text"] == "from a view"
        await asyncio.to_thread(thread.join, 5)
        assert answers == [1, "unknown_group"]  # no group can have that name
        with pytest.raises(RuntimeError, match="own event loop"):
            chat.publish_sync({"type": "broadcast", "text": "x"})
    with pytest.raises(RuntimeError, match="needs the running app"):
        create_app(settings).publish_sync({"type": "broadcast", "text": "x"})


async def test_the_hosts_code_publishes_to_its_users_and_groups_online_or_not(
    settings: Settings,
) -> None:
    """With ``authenticate``, the host's own code names its users and groups with
    authority: a user between two connections (a reload) gets what was published meanwhile
    on resume; a backend's API publish to a name nobody holds is still refused."""
    async with embedded(settings, authenticate=host_user) as chat:
        frank = {"x-host-user": "frank"}
        async with asgi.WebSocket(chat, headers=frank) as ws:
            positions = (await ws.receive())["streams"]
        assert await chat.publish({"type": "direct", "user_name": "frank", "text": "dm"}) == 1
        assert await chat.publish({"type": "group", "group": "chess", "text": "all"}) == 1
        query = asgi.resume_query(positions)
        async with asgi.WebSocket(chat, headers=frank, query=query) as ws:
            await ws.receive()
            replay = [await ws.receive() for _ in range(3)]
        assert sorted(e.get("text", e["type"]) for e in replay) == ["all", "dm", "resumed"]
        refused = await asgi.request(
            chat,
            "POST",
            "/api/publish",
            json={"type": "group", "group": "chess", "text": "x"},
            headers=AUTH,
        )
        assert (refused.status, refused.json()["code"]) == (400, "unknown_group")


async def test_publish_while_shutting_down_raises_service_unavailable(settings: Settings) -> None:
    """A publish the hub can no longer take raises ServiceUnavailableError."""
    async with embedded(settings) as chat:
        assert chat.service is not None
        await chat.service.drain()
        with pytest.raises(ServiceUnavailableError) as raised:
            await chat.publish({"type": "broadcast", "text": "late"})
        assert raised.value.code == "unavailable"


async def test_online_counts_each_users_connections(settings: Settings) -> None:
    """``online()`` and ``POST /api/online`` answer the connected users among those asked,
    with their connection counts, keyed as asked; bad bodies get a 400."""
    async with (
        embedded(settings, authenticate=host_user) as chat,
        asgi.WebSocket(chat, headers={"x-host-user": "ann"}) as one,
        asgi.WebSocket(chat, headers={"x-host-user": "ann"}) as two,
        asgi.WebSocket(chat, headers={"x-host-user": "bob"}) as three,
    ):
        for ws in (one, two, three):
            await ws.receive()
        assert await chat.online(["ann", "BOB", "carl", "not a name"]) == {"ann": 2, "BOB": 1}
        answer = await asgi.request(
            chat, "POST", "/api/online", json={"users": ["ann", "zed"]}, headers=AUTH
        )
        assert (answer.status, answer.json()) == (200, {"online": {"ann": 2}})
        for body in ({"users": "ann"}, {"users": [1]}, {"users": ["a"] * 1001}, ["ann"], {}):
            bad = await asgi.request(chat, "POST", "/api/online", json=body, headers=AUTH)
            assert (bad.status, bad.json()["code"]) == (400, "bad_message"), body
        keyless = await asgi.request(chat, "POST", "/api/online", json={"users": []})
        assert keyless.status == 401
        with pytest.raises(ValueError, match="at most 1000"):
            await chat.online(["a"] * 1001)


async def test_hooks_hear_connections_presence_and_memberships_in_order(
    settings: Settings,
) -> None:
    """A user's first connection brings ``connected`` then ``online``; their last close
    ``disconnected`` (with the client's code) then ``offline``; a second tab only
    ``connected``/``disconnected``; the admin API's membership changes ``joined``/``left``.
    Every event has its own id."""
    hook = Recorder()
    async with embedded(settings, hooks=hook) as chat:
        cookie = await login(chat, "greg")
        async with asgi.WebSocket(chat, headers={"cookie": cookie}) as first:
            await first.receive()
            async with asgi.WebSocket(chat, headers={"cookie": cookie}) as second:
                await second.receive()
        for method in ("PUT", "DELETE"):
            changed = await asgi.request(chat, method, "/api/users/greg/groups/girls", headers=AUTH)
            assert changed.status == 204
        events = await hook.until(8)
    kinds = [(event["type"], event["user"]) for event in events]
    assert kinds == [
        ("connected", "greg"),
        ("online", "greg"),
        ("connected", "greg"),
        ("disconnected", "greg"),
        ("disconnected", "greg"),
        ("offline", "greg"),
        ("joined", "greg"),
        ("left", "greg"),
    ]
    assert events[3]["code"] == 1000 and events[3]["connection"] == events[2]["connection"]
    assert events[6]["group"] == "girls"
    assert len({event["id"] for event in events}) == 8
    assert all(event["node"] == events[0]["node"] for event in events)


async def test_a_hook_that_hangs_or_raises_delays_no_message(settings: Settings) -> None:
    """While the hook hangs, connections open and messages flow; once it fails, each
    failure is counted in /metrics and the next event still reaches it."""
    hook = Recorder()
    hook.gate = asyncio.Event()
    async with embedded(settings, hooks=hook, authenticate=host_user) as chat:
        async with asgi.WebSocket(chat, headers={"x-host-user": "ann"}) as ws:
            await ws.receive()
            await chat.publish({"type": "broadcast", "text": "not held up"})
            assert (await ws.receive())["text"] == "not held up"
        assert hook.events == []  # still hanging on the first of ann's four events
        hook.fail = True
        hook.gate.set()
        assert chat.service is not None
        stats = chat.service.hooks.stats
        async with asyncio.timeout(5):
            while stats["failed"] < 4:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        hook.fail = False
        async with asgi.WebSocket(chat, headers={"x-host-user": "bob"}) as ws:
            await ws.receive()
        assert [event["user"] for event in await hook.until(2)][:2] == ["bob", "bob"]
        metrics = (await asgi.request(chat, "GET", "/metrics")).body.decode()
    assert 'wsfanout_hook_events_total{outcome="failed"} 4.0' in metrics


async def test_pages_off_serves_no_page_and_no_login(settings: Settings) -> None:
    """With ``WSFANOUT_PAGES=off`` the page, ``/login`` and ``/logout`` are 404s; the
    client library, the API and the websocket stay."""
    async with embedded(dataclasses.replace(settings, pages=False), authenticate=host_user) as chat:
        for method, path in (
            ("GET", "/"),
            ("GET", "/login"),
            ("POST", "/login"),
            ("POST", "/logout"),
        ):
            assert (await asgi.request(chat, method, path)).status == 404, path
        assert (await asgi.request(chat, "GET", "/static/wsfanout.js")).status == 200
        async with asgi.WebSocket(chat, headers={"x-host-user": "ann"}) as ws:
            assert (await ws.receive())["type"] == "welcome"


async def test_online_and_offline_once_each_for_three_tabs_on_two_nodes(
    settings: Settings, redis_prefix: str
) -> None:
    """Two nodes on one Redis: a user's three tabs (two here, one there) bring one
    ``online`` and, once all are closed, one ``offline`` over both nodes' hooks, while
    ``online()`` on either node counts all three tabs."""
    hooks = [Recorder(), Recorder()]
    shared = dataclasses.replace(
        settings, redis_url="redis://127.0.0.1:6379", redis_prefix=redis_prefix
    )
    async with (
        embedded(shared, authenticate=host_user, hooks=hooks[0]) as one,
        embedded(shared, authenticate=host_user, hooks=hooks[1]) as two,
    ):
        tabs = [asgi.WebSocket(node, headers={"x-host-user": "ann"}) for node in (one, two, one)]
        async with contextlib.AsyncExitStack() as stack:
            for tab in tabs:
                await stack.enter_async_context(tab)
                await tab.receive()
            await eventually(lambda: two.online(["ann"]), {"ann": 3})
            assert await one.online(["ANN", "bob"]) == {"ANN": 3}
        await eventually(lambda: one.online(["ann"]), {})

        async def presence() -> list[str]:
            told = [e for hook in hooks for e in hook.events if e["type"] in ("online", "offline")]
            return [e["type"] for e in sorted(told, key=lambda e: e["time"])]

        await eventually(presence, ["online", "offline"])
        await asyncio.sleep(0.3)  # nothing more comes
        assert await presence() == ["online", "offline"]
        connected = [e for hook in hooks for e in hook.events if e["type"] == "connected"]
        assert len(connected) == 3


async def test_webhooks_carry_signed_events_through_a_receivers_outage(settings: Settings) -> None:
    """With WSFANOUT_WEBHOOK_URL, the same lifecycle events are posted in signed batches;
    the receiver away for a while loses none of them (each id arrives), and /metrics
    counts what was sent and retried."""
    async with receiving() as receiver:
        configured = dataclasses.replace(
            settings, webhook_url=receiver.url + "/hooks?k=1", webhook_secret="shh"
        )
        async with embedded(configured, authenticate=host_user) as chat:
            async with asgi.WebSocket(chat, headers={"x-host-user": "ann"}) as ws:
                await ws.receive()
            await eventually(
                lambda: _posted(receiver), ["connected", "online", "disconnected", "offline"]
            )
            await receiver.stop()
            for user in ("bob", "cy"):
                async with asgi.WebSocket(chat, headers={"x-host-user": user}) as ws:
                    await ws.receive()
            assert chat.service is not None and chat.service.metrics.webhook is not None
            webhook = chat.service.metrics.webhook
            await eventually(lambda: webhook.stats["retries"] > 0, True)
            await receiver.start()
            await eventually(lambda: len(_posted(receiver)), 12, within=15)
            metrics = (await asgi.request(chat, "GET", "/metrics")).body.decode()
    for request in receiver.received:
        stamp = request.headers["x-wsfanout-timestamp"]
        assert verify_webhook("shh", request.body, stamp, request.headers["x-wsfanout-signature"])
        assert request.target == "/hooks?k=1"
        assert not verify_webhook(
            "other", request.body, stamp, request.headers["x-wsfanout-signature"]
        )
    ids = [
        event["id"]
        for request in receiver.received
        for event in orjson.loads(request.body)["events"]
    ]
    assert len(set(ids)) == 12
    assert 'wsfanout_webhook_events_total{outcome="sent"} 12.0' in metrics
    assert "wsfanout_webhook_queue 0.0" in metrics


def _posted(receiver: Receiver) -> list[str]:
    """The types of the events the receiver has had, in order."""
    return [e["type"] for r in receiver.received for e in orjson.loads(r.body)["events"]]


async def test_an_identity_that_expires_closes_its_connection_then(settings: Settings) -> None:
    """``Identity(expires=…)`` ends the connection at that time with 1008, after a
    ``forbidden`` frame, as a session's max age does."""
    async with embedded(settings, authenticate=host_user) as chat:
        soon = {"x-host-user": "brief", "x-host-expires": str(time.time() + 1.2)}
        async with asgi.WebSocket(chat, headers=soon) as ws:
            await ws.receive()
            events = await ws.until_closed()
        assert ws.close_code == 1008
        assert events[-1]["code"] == "forbidden"


async def test_the_admin_api_disconnects_a_hosts_user(settings: Settings) -> None:
    """A user who is only the host's (no row in the store) can still be disconnected by
    the operator: their connections close with 1008."""
    async with (
        embedded(settings, authenticate=host_user) as chat,
        asgi.WebSocket(chat, headers={"x-host-user": "ann"}) as ws,
    ):
        await ws.receive()
        answer = await asgi.request(chat, "POST", "/api/users/ann/disconnect", headers=AUTH)
        assert answer.status == 204
        await ws.until_closed()
        assert ws.close_code == 1008
        nobody = await asgi.request(chat, "POST", "/api/users/no%20one/disconnect", headers=AUTH)
        assert nobody.status == 404


async def test_a_clients_close_code_reaches_the_webhook_under_both_servers(
    server_kind: str, tmp_path: Path, demo_db: Path
) -> None:
    """Real servers: the code a client closes with is the ``disconnected`` event's (hypercorn
    itself tells the app 1006 for any close the client starts)."""
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    async with receiving() as receiver:
        env = {
            **SERVER_ENV,
            "WSFANOUT_WEBHOOK_URL": receiver.url,
            "WSFANOUT_WEBHOOK_SECRET": "s" * 16,
        }
        with Server(tmp_path, env, app="tests.hosted:app", server=server_kind).running() as server:
            for code in (4001, 1000):
                async with websockets.connect(
                    server.ws_url, additional_headers={"Cookie": "host_user=ann"}
                ) as ws:
                    await ws.recv()
                    await ws.close(code=code)
            await eventually(lambda: _codes(receiver), [4001, 1000], within=10)


def _codes(receiver: Receiver) -> list[int]:
    events = [e for r in receiver.received for e in orjson.loads(r.body)["events"]]
    return [e["code"] for e in events if e["type"] == "disconnected"]


async def test_an_admin_membership_change_leaves_the_hosts_groups_alone(
    settings: Settings,
) -> None:
    """greg is in the store too; connected through the host with the host's groups, an
    operator's change of his store groups does not touch them (the host is their
    authority), while his cookie connection follows the store as before."""
    async with (
        embedded(settings, authenticate=host_user) as chat,
        asgi.WebSocket(chat, headers={"x-host-user": "greg"}) as hosted,
        asgi.WebSocket(chat, headers={"cookie": await login(chat, "greg")}) as stored,
    ):
        assert (await hosted.receive())["groups"] == ["chess"]
        await stored.receive()
        changed = await asgi.request(chat, "PUT", "/api/users/greg/groups/girls", headers=AUTH)
        assert changed.status == 204
        assert await stored.receive() == {"type": "joined", "group": "girls"}
        await chat.publish({"type": "group", "group": "chess", "text": "still chess"})
        assert (await hosted.receive())["text"] == "still chess"  # no joined/left before it


async def test_after_shutdown_nothing_starts_a_second_service(settings: Settings) -> None:
    """Once shut down, a late request is answered 503 and a late publish raises, rather
    than start a new service nobody would stop; ``startup()`` starts it again."""
    chat = create_app(settings)
    await chat.startup()
    await chat.shutdown()
    assert (await asgi.request(chat, "GET", "/healthz")).status == 503
    with pytest.raises(ServiceUnavailableError):
        await chat.publish({"type": "broadcast", "text": "late"})
    assert chat.service is None
    await chat.startup()
    try:
        assert (await asgi.request(chat, "GET", "/healthz")).status == 200
    finally:
        await chat.shutdown()


async def test_the_docs_embedding_example_runs_as_it_stands(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/embedding.md's block, as a module: a user with the host's session (Starlette's signed
    cookie) connects to /chat/ with no wsfanout cookie, and the host's view publishes to
    them and asks who is online."""
    block = docs.block("docs/embedding.md", "test_the_docs_embedding_example_runs_as_it_stands")
    for name, value in (
        ("WSFANOUT_DATA_DIR", str(settings.data_dir)),
        ("WSFANOUT_SECRET_KEY", "k"),
    ):
        monkeypatch.setenv(name, value)
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(block, "embedding.md", "exec"), namespace)  # noqa: S102 - the docs' own code
    host, chat = namespace["app"], namespace["chat"]
    signed = TimestampSigner("change me").sign(base64.b64encode(b'{"user": "greg"}')).decode()
    await chat.startup()
    try:
        cookie = {"cookie": f"session={signed}"}
        async with asgi.WebSocket(host, path="/chat/", headers=cookie) as ws:
            welcome = await ws.receive()
            assert (welcome["user"], welcome["groups"]) == ("greg", ["staff"])
            answer = await asgi.request(host, "POST", "/deployed")
            assert answer.json() == {"sent": 1, "online": {"greg": 1}}
            assert (await ws.receive())["text"] == "deploy done"
        with pytest.raises(asgi.Refused):
            async with asgi.WebSocket(host, path="/chat/"):
                pass
    finally:
        await chat.shutdown()
