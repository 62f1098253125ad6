"""backplane: nodes sharing fan-out through the real Redis, workers, and Redis restarts.

These need Redis on 127.0.0.1:6379 (and ``redis-server`` for the restart test);
without it they skip with the reason, except under CI=true, where they fail.
Every test uses its own channel prefix.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis

from tests import asgi
from tests.conftest import login
from tests.server import Client, RedisServer, Server, http, redis_reachable
from wsfanout import App, Settings, create_app

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="module", autouse=True)
def need_redis() -> None:
    if not redis_reachable():
        if os.environ.get("CI") == "true":
            pytest.fail("Redis is not running on 127.0.0.1:6379, and CI=true requires it")
        pytest.skip("Redis is not running on 127.0.0.1:6379 (start redis-server to run these)")


@pytest.fixture
def prefix() -> str:
    return f"wsfanout-test-{uuid.uuid4().hex[:10]}:"


@pytest.fixture
async def nodes(settings: Settings, prefix: str) -> AsyncIterator[tuple[App, App]]:
    """Two app instances (two nodes) sharing one database and one Redis prefix."""
    shared = dataclasses.replace(settings, redis_url=REDIS_URL, redis_prefix=prefix)
    a, b = create_app(shared), create_app(shared)
    await a.startup()
    await b.startup()
    await wait_healthy(a)
    await wait_healthy(b)
    yield a, b
    await a.shutdown()
    await b.shutdown()


async def wait_healthy(app: App, want: int = 200, timeout: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        response = await asgi.request(app, "GET", "/healthz")
        if response.status == want or time.monotonic() > deadline:
            assert response.status == want, response.json()
            body: dict[str, Any] = response.json()
            return body
        await asyncio.sleep(0.05)


async def numsub(prefix: str, *channels: str) -> dict[str, int]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        pairs = await client.pubsub_numsub(*(prefix + c for c in channels))
    finally:
        await client.aclose()
    found = {}
    for name, count in pairs:
        text = name.decode() if isinstance(name, bytes) else name
        found[text[len(prefix) :]] = int(count)
    return found


async def messages(ws: asgi.WebSocket, count: int) -> list[dict[str, Any]]:
    """Exactly ``count`` message events (acks, which may come before or after, aside)."""
    found: list[dict[str, Any]] = []
    while len(found) < count:
        event = await ws.receive()
        if event["type"] == "message":
            found.append(event)
    while not await ws.nothing(0.2):
        event = await ws.receive()
        assert event["type"] == "ack", f"more than expected arrived: {event}"
    return found


async def test_two_nodes_share_fan_out_exactly_once(nodes: tuple[App, App], prefix: str) -> None:
    """Broadcast, Group and Direct cross between two nodes, each exactly once; a node
    subscribes to a group or user channel only while it holds a connection for it."""
    a, b = nodes
    cookies = {name: await login(a, name) for name in ("greg", "chuck", "amanda", "mike")}
    async with (
        asgi.WebSocket(a, headers={"cookie": cookies["greg"]}) as greg_a,
        asgi.WebSocket(a, headers={"cookie": cookies["chuck"]}) as chuck_a,
        asgi.WebSocket(b, headers={"cookie": cookies["amanda"]}) as amanda_b,
        asgi.WebSocket(b, headers={"cookie": cookies["mike"]}) as mike_b,
        asgi.WebSocket(b, headers={"cookie": cookies["greg"]}) as greg_b,
    ):
        everyone = [greg_a, chuck_a, amanda_b, mike_b, greg_b]
        for ws in everyone:
            assert (await ws.receive())["type"] == "welcome"

        assert await numsub(prefix, "all", "g:boys", "g:girls", "u:amanda", "u:greg") == {
            "all": 2,
            "g:boys": 2,
            "g:girls": 1,  # only node b has a girl
            "u:amanda": 1,
            "u:greg": 2,
        }

        await chuck_a.send_json({"type": "broadcast", "text": "to all", "id": "b"})
        for ws in everyone:
            (event,) = await messages(ws, 1)
            assert (event["kind"], event["from"], event["text"]) == ("broadcast", "chuck", "to all")

        await greg_a.send_json({"type": "group", "group": "girls", "text": "nails"})
        (event,) = await messages(amanda_b, 1)
        assert (event["group"], event["from"]) == ("girls", "greg")
        for ws in (greg_a, chuck_a, mike_b, greg_b):
            assert await ws.nothing(0.2)

        await amanda_b.send_json({"type": "direct", "user_name": "Greg", "text": "both tabs"})
        for ws in (greg_a, greg_b):
            (event,) = await messages(ws, 1)
            assert (event["to"], event["text"]) == ("greg", "both tabs")
        for ws in (chuck_a, amanda_b, mike_b):
            assert await ws.nothing(0.2)

    deadline = time.monotonic() + 5
    while (await numsub(prefix, "g:girls"))["g:girls"] and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    assert await numsub(prefix, "g:girls", "u:amanda", "all") == {
        "g:girls": 0,
        "u:amanda": 0,
        "all": 2,
    }


async def test_unknown_targets_are_errors_on_every_node(nodes: tuple[App, App]) -> None:
    """Unknown groups and users get the same error frames as on one node."""
    a, _ = nodes
    async with asgi.WebSocket(a, headers={"cookie": await login(a, "greg")}) as ws:
        await ws.receive()
        await ws.send_json({"type": "group", "group": "chess", "text": "x"})
        assert (await ws.receive())["code"] == "unknown_group"
        await ws.send_json({"type": "direct", "user_name": "nobody", "text": "x"})
        assert (await ws.receive())["code"] == "unknown_user"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is not installed, and CI=true requires it")
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


async def test_node_survives_a_redis_restart(
    settings: Settings, redis_server: RedisServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis stopped: senders get unavailable, sockets stay open, /healthz says why;
    Redis back: the node resubscribes by itself and messages flow again. Each
    transition is logged once, not once per message or per retry."""
    caplog.set_level(logging.INFO, logger="wsfanout.backplane")
    app = create_app(dataclasses.replace(settings, redis_url=redis_server.url, redis_prefix=prefix))
    await app.startup()
    try:
        await wait_healthy(app)
        greg, amanda = await login(app, "greg"), await login(app, "amanda")
        async with (
            asgi.WebSocket(app, headers={"cookie": greg}) as g,
            asgi.WebSocket(app, headers={"cookie": amanda}) as a,
        ):
            await g.receive(), await a.receive()
            await g.send_json({"type": "group", "group": "girls", "text": "before"})
            assert (await messages(a, 1))[0]["text"] == "before"

            redis_server.stop()
            body = await wait_healthy(app, want=503)
            assert body["checks"]["redis"].startswith("failing")
            for n in range(5):
                await g.send_json({"type": "broadcast", "text": "lost", "id": f"x{n}"})
                error = await g.receive()
                assert (error["type"], error["code"], error["id"]) == (
                    "error",
                    "unavailable",
                    f"x{n}",
                )
            assert await a.nothing(0.2)
            await asyncio.sleep(1.5)  # several reconnect attempts fail meanwhile

            redis_server.start()
            await wait_healthy(app, want=200, timeout=20)
            # Subscribed again to exactly what its connections need, as Redis sees it.
            client = redis.Redis.from_url(redis_server.url)
            try:
                raw = await client.pubsub_channels(prefix + "*")
                channels = {c.decode() if isinstance(c, bytes) else c for c in raw}
            finally:
                await client.aclose()
            assert channels == {
                prefix + name for name in ("all", "g:boys", "g:girls", "u:greg", "u:amanda")
            }
            await g.send_json({"type": "group", "group": "girls", "text": "after"})
            assert (await messages(a, 1))[0]["text"] == "after"
            await g.send_json({"type": "broadcast", "text": "everyone again"})
            assert (await messages(a, 1))[0]["text"] == "everyone again"
    finally:
        await app.shutdown()
    lines = [r.getMessage() for r in caplog.records if r.name == "wsfanout.backplane"]
    assert sum("unavailable" in line for line in lines) == 1, lines
    assert sum("connected" in line for line in lines) == 2, lines  # at start, after recovery


async def test_each_senders_order_is_kept_across_nodes(nodes: tuple[App, App]) -> None:
    """100 messages from one sender on node a reach a recipient on node b in order."""
    a, b = nodes
    async with (
        asgi.WebSocket(a, headers={"cookie": await login(a, "greg")}) as sender,
        asgi.WebSocket(b, headers={"cookie": await login(b, "mike")}) as receiver,
    ):
        await sender.receive(), await receiver.receive()
        for n in range(100):
            kind = ["broadcast", "group", "direct"][n % 3]
            frame = {"type": kind, "text": str(n), "group": "boys", "user_name": "mike"}
            await sender.send_json(frame)
        received = [event["text"] for event in await messages(receiver, 100)]
        assert received == [str(n) for n in range(100)]


async def test_two_hypercorn_workers_act_as_one(tmp_path: Path, demo_db: Path, prefix: str) -> None:
    """`hypercorn --workers 2` with Redis: 50 clients each get every broadcast exactly once."""
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    env = {
        "WSFANOUT_REDIS_URL": REDIS_URL,
        "WSFANOUT_REDIS_PREFIX": prefix,
        "WSFANOUT_RATE_LIMIT": "0",
    }
    with Server(tmp_path, env=env, workers=2).running() as server:
        names = ["greg", "chuck", "mike", "amanda", "lisa", "anny"]
        cookies = {name: server.login(name) for name in names}
        clients = [await Client.open(server.ws_url, cookies[names[i % 6]]) for i in range(50)]
        for client in clients:
            assert (await client.next())["type"] == "welcome"
        deadline = time.monotonic() + 10
        while (await numsub(prefix, "all"))["all"] < 2:
            assert time.monotonic() < deadline, "both workers should subscribe"
            await asyncio.sleep(0.05)
        for n in range(20):
            await clients[n % 50].send({"type": "broadcast", "text": f"m{n}"})
        for client in clients:
            texts = sorted([(await client.next_of("message"))["text"] for _ in range(20)])
            assert texts == sorted(f"m{n}" for n in range(20))
        for client in clients[:10]:
            assert await client.quiet(0.1) == []
        for client in clients:
            await client.close()
    log = server.log_path.read_text()
    assert "Traceback" not in log


def test_workers_without_redis_are_warned_about(tmp_path: Path, demo_db: Path) -> None:
    """Several workers and no Redis: the log says they do not share fan-out."""
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    with Server(tmp_path, workers=2).running() as server:
        status, _ = http("GET", server.http_url + "/healthz")
        assert status == 200
        deadline = time.monotonic() + 10
        while "do not see each other" not in server.log_path.read_text():
            assert time.monotonic() < deadline, server.log_path.read_text()
            time.sleep(0.05)
