"""backplane: nodes sharing fan-out through the real Redis, workers, and Redis restarts.

These need Redis on 127.0.0.1:6379 (and ``redis-server`` for the restart test);
without it they skip with the reason, except under CI=true, where they fail.
Every test uses its own channel prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as redis

from tests import asgi
from tests.asgi import resume_query, until
from tests.conftest import login
from tests.proxy import Proxy
from tests.receiver import Receiver
from tests.server import Client, RedisServer, Server, delete_redis_keys, http, need_redis
from wsfanout import App, Settings, create_app, protocol
from wsfanout.backplane import BackplaneUnavailableError, Node
from wsfanout.backplane.redis import RedisBackplane
from wsfanout.protocol import Kind, Publish, Source

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="module", autouse=True)
def redis_needed() -> None:
    need_redis()


@pytest.fixture
def prefix() -> Iterator[str]:
    """The test's own key prefix; its keys are deleted afterwards."""
    name = f"wsfanout-test-{uuid.uuid4().hex[:10]}:"
    yield name
    delete_redis_keys(name)


@pytest.fixture
async def nodes(settings: Settings, prefix: str) -> AsyncIterator[tuple[App, App]]:
    """Two app instances (two nodes) sharing one database and one Redis prefix."""
    async with two_nodes(settings, prefix, rate_limit=0) as both:
        yield both


@contextlib.asynccontextmanager
async def two_nodes(
    settings: Settings, prefix: str, **changes: Any
) -> AsyncIterator[tuple[App, App]]:
    """Two app instances (two nodes) sharing one database and one Redis prefix, healthy."""
    shared = dataclasses.replace(settings, redis_url=REDIS_URL, redis_prefix=prefix, **changes)
    a, b = create_app(shared), create_app(shared)
    await a.startup()
    try:
        await b.startup()
        try:
            await wait_healthy(a)
            await wait_healthy(b)
            yield a, b
        finally:
            await b.shutdown()
    finally:
        await a.shutdown()


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
    found = await messages_until(ws, count)
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


@pytest.mark.parametrize("history", [0, 100])
async def test_node_survives_a_redis_restart(
    settings: Settings,
    redis_server: RedisServer,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
    history: int,
) -> None:
    """Redis stopped: senders get unavailable, sockets stay open, /healthz says why;
    Redis back: the node resubscribes by itself and messages flow again. Each
    transition is logged once, not once per message or per retry. The node's connections
    missed what others published (and the operator changed) meanwhile: they are closed
    with 1012 so that they reconnect and, with history, resume it."""
    caplog.set_level(logging.INFO, logger="wsfanout")
    app = create_app(
        dataclasses.replace(
            settings, redis_url=redis_server.url, redis_prefix=prefix, history_size=history
        )
    )
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
            # What others published, and the operator changed, meanwhile never reached
            # this node: its connections reconnect (and, with history, resume).
            for ws in (g, a):
                assert [e["type"] for e in await ws.until_closed()] == []
                assert ws.close_code == 1012
        async with (
            asgi.WebSocket(app, headers={"cookie": greg}) as g,
            asgi.WebSocket(app, headers={"cookie": amanda}) as a,
        ):
            await g.receive(), await a.receive()
            # Subscribed again to exactly what its connections need, as Redis sees it.
            client = redis.Redis.from_url(redis_server.url)
            try:
                raw = await client.pubsub_channels(prefix + "*")
                channels = {c.decode() if isinstance(c, bytes) else c for c in raw}
            finally:
                await client.aclose()
            # (and its own, whose ticks tell how far behind Redis it is)
            node = next(c for c in channels if c.startswith(prefix + "n:"))
            assert channels == {
                prefix + name for name in ("all", "ctl", "g:boys", "g:girls", "u:greg", "u:amanda")
            } | {node}
            await g.send_json({"type": "group", "group": "girls", "text": "after"})
            assert (await messages(a, 1))[0]["text"] == "after"
            await g.send_json({"type": "broadcast", "text": "everyone again"})
            assert (await messages(a, 1))[0]["text"] == "everyone again"
    finally:
        await app.shutdown()
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("wsfanout.backplane")]
    assert sum("unavailable" in line for line in lines) == 1, lines
    assert sum("connected" in line for line in lines) == 2, lines  # at start, after recovery
    resyncs = [r.getMessage() for r in caplog.records if "so that they" in r.getMessage()]
    assert resyncs == [
        "back on Redis: closing 2 connections with 1012 so that they reconnect and resume"
    ]


async def test_a_node_behind_redis_has_backends_batches_refused_everywhere(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A node whose listener cannot keep up with what Redis sends (its CPU starved: here
    each message costs it 2 ms) says so, and every node refuses backends' batches for a
    while (the API answers 503, RabbitMQ requeues) rather than take messages that Redis
    would lose with the subscriber it drops; users' messages are still taken, and batches
    again once the node has caught up."""
    caplog.set_level(logging.WARNING, logger="wsfanout")
    delivered: list[str] = []

    def crawl(kind: Kind, target: str, frame: str) -> None:
        time.sleep(0.002)
        delivered.append(frame)

    engines = [RedisBackplane(REDIS_URL, prefix), RedisBackplane(REDIS_URL, prefix)]
    for engine, deliver in zip(engines, (lambda *_: None, crawl), strict=True):
        engine.bind(
            Node(deliver, lambda *_: None, lambda *_: None, lambda _: (), lambda: None, lambda _: 1)
        )
        engine.start()
    entry = engines[0]
    try:
        async with asyncio.timeout(10):
            while not all(engine.healthy for engine in engines):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        entry.make_room(1000)
        head, tail = protocol.message_parts(
            Publish(Kind.BROADCAST, "x" * 4000, source=Source.API), 0.0
        )
        sent = [entry.publish(Kind.BROADCAST, "", head, tail) for _ in range(1000)]
        await asyncio.gather(*sent)
        refused: BackplaneUnavailableError | None = None
        async with asyncio.timeout(10):
            while refused is None:
                try:
                    entry.make_room(1)
                except BackplaneUnavailableError as exc:
                    refused = exc
                else:
                    await asyncio.sleep(0.01)
        assert "behind Redis" in str(refused)
        assert len(delivered) < 1000  # said while it was behind, not after
        await entry.publish(Kind.BROADCAST, "", head, tail)  # a user's message goes
        async with asyncio.timeout(20):
            while True:
                with contextlib.suppress(BackplaneUnavailableError):
                    entry.make_room(1000)
                    break
                await asyncio.sleep(0.05)
        assert len(delivered) == 1001
    finally:
        for engine in engines:
            await engine.close()
    # Both engines share this test's event loop, so the entry may say so too.
    assert any("s behind Redis" in r.getMessage() for r in caplog.records), caplog.records


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


# Streams, history and resume across nodes (DESIGN 5.1); presence across nodes (5.2)


async def test_offsets_are_handed_out_once_across_nodes(nodes: tuple[App, App]) -> None:
    """Two nodes publishing to one stream at once: a client on either sees every offset
    once, in order (Redis assigns them and publishes in one step)."""
    a, b = nodes
    greg, mike, chuck = [await login(a, name) for name in ("greg", "mike", "chuck")]
    async with (
        asgi.WebSocket(a, headers={"cookie": greg}) as sender_a,
        asgi.WebSocket(b, headers={"cookie": mike}) as sender_b,
        asgi.WebSocket(b, headers={"cookie": chuck}) as watcher,
    ):
        start = (await watcher.receive())["streams"]["all"]["offset"]
        await sender_a.receive(), await sender_b.receive()

        async def send(ws: asgi.WebSocket, tag: str) -> None:
            for n in range(150):
                await ws.send_json({"type": "broadcast", "text": f"{tag}{n}"})

        await asyncio.gather(send(sender_a, "a"), send(sender_b, "b"))
        events = await messages(watcher, 300)
        assert [e["offset"] for e in events] == list(range(start + 1, start + 301))
        for tag in "ab":  # and each sender's order is kept
            mine = [e["text"] for e in events if e["text"].startswith(tag)]
            assert mine == [f"{tag}{n}" for n in range(150)]


async def test_resume_on_the_other_node_while_messages_flow(nodes: tuple[App, App]) -> None:
    """A client leaves node a mid-stream and resumes on node b while a sender keeps
    publishing: over both connections it sees every message once, offsets contiguous."""
    a, b = nodes
    greg, mike = await login(a, "greg"), await login(a, "mike")
    async with asgi.WebSocket(a, headers={"cookie": mike}) as sender:
        await sender.receive()
        total = 400
        sending, left, back = asyncio.Event(), asyncio.Event(), asyncio.Event()

        async def send() -> None:
            # However loaded the machine, some messages come while greg is away (to be
            # replayed) and some after he is back (live): the flow waits for each step. He
            # leaves after 60, and at most 90 more come before he is back: within the
            # history's 100, however slowly his resume is read.
            for n in range(total):
                if n == 100:
                    await left.wait()
                if n == 150:
                    await back.wait()
                await sender.send_json({"type": "broadcast", "text": str(n)})
                if n == 50:
                    sending.set()
                if n % 10 == 0:
                    await asyncio.sleep(0.002)

        async with asgi.WebSocket(a, headers={"cookie": greg}) as first:
            welcome = (await first.receive())["streams"]
            task = asyncio.create_task(send())
            await sending.wait()
            seen = [e for e in await messages_until(first, 60)]
        left.set()
        positions = dict(welcome)
        positions["all"] = {"epoch": welcome["all"]["epoch"], "offset": seen[-1]["offset"]}
        async with asgi.WebSocket(
            b, headers={"cookie": greg}, query=resume_query(positions)
        ) as again:
            before, resumed = await until(again, "resumed")
            back.set()
            assert resumed["recovered"] is True, resumed
            replayed = [e for e in before if e["type"] == "message"]
            assert resumed["missed"] == len(replayed)
            await task
            live: list[dict[str, Any]] = []
            while len(seen) + len(replayed) + len(live) < total:
                event = await again.receive()
                if event["type"] == "message":
                    live.append(event)
            assert await again.nothing(0.3)
        everything = seen + replayed + live
        assert [e["text"] for e in everything] == [str(n) for n in range(total)]
        offsets = [e["offset"] for e in everything]
        assert offsets == list(range(offsets[0], offsets[0] + total))
        assert replayed and live  # the resume really overlapped the flow


async def messages_until(ws: asgi.WebSocket, count: int) -> list[dict[str, Any]]:
    """The next ``count`` message events, whatever else arrives between them."""
    found: list[dict[str, Any]] = []
    while len(found) < count:
        event = await ws.receive()
        if event["type"] == "message":
            found.append(event)
    return found


async def test_a_gap_longer_than_the_history_in_redis_is_lost(
    settings: Settings, prefix: str
) -> None:
    """History in Redis keeps HISTORY_SIZE messages: a longer gap is not recovered, and
    the streams that can be are still replayed."""
    async with two_nodes(settings, prefix, history_size=5) as (a, b):
        greg, mike = await login(a, "greg"), await login(a, "mike")
        async with asgi.WebSocket(a, headers={"cookie": greg}) as g:
            welcome = (await g.receive())["streams"]
        async with asgi.WebSocket(b, headers={"cookie": mike}) as m:
            await m.receive()
            for n in range(10):
                await m.send_json({"type": "broadcast", "text": str(n)})
            await m.send_json({"type": "direct", "user_name": "greg", "text": "to greg"})
            await messages(m, 10)
        async with asgi.WebSocket(b, headers={"cookie": greg}, query=resume_query(welcome)) as g:
            before, resumed = await until(g, "resumed")
            assert [e["text"] for e in before[1:]] == ["to greg"]
            assert resumed == {"type": "resumed", "recovered": False, "missed": 1, "lost": ["all"]}


async def test_no_welcome_without_positions_while_redis_is_away(
    settings: Settings, redis_server: RedisServer, prefix: str
) -> None:
    """With history on, a connection whose positions Redis cannot give is closed with 1013
    before any welcome (and the next one, once Redis is back, is welcomed with them): a
    welcome without positions would leave its client unable to know what it missed before
    the node's subscriptions took hold (the chaos run found such silent losses)."""
    app = create_app(dataclasses.replace(settings, redis_url=redis_server.url, redis_prefix=prefix))
    await app.startup()
    try:
        await wait_healthy(app)
        greg = await login(app, "greg")
        redis_server.stop()
        await wait_healthy(app, want=503)
        async with asgi.WebSocket(app, headers={"cookie": greg}) as g:
            assert await g.until_closed() == []
            assert g.close_code == 1013
        redis_server.start()
        await wait_healthy(app, want=200, timeout=20)
        async with asgi.WebSocket(app, headers={"cookie": greg}) as g:
            assert "all" in (await g.receive())["streams"]
    finally:
        await app.shutdown()


async def test_a_redis_that_lost_its_data_means_a_new_epoch(
    settings: Settings, redis_server: RedisServer, prefix: str
) -> None:
    """Redis restarted without persistence: the streams get new epochs, and a client that
    resumes is told recovered false for each, instead of silently missing messages."""
    app = create_app(dataclasses.replace(settings, redis_url=redis_server.url, redis_prefix=prefix))
    await app.startup()
    try:
        await wait_healthy(app)
        greg = await login(app, "greg")
        async with asgi.WebSocket(app, headers={"cookie": greg}) as g:
            await g.receive()
            await g.send_json({"type": "broadcast", "text": "before"})
            event = (await messages(g, 1))[0]
        positions = {"all": {"epoch": "", "offset": event["offset"]}}
        async with asgi.WebSocket(app, headers={"cookie": greg}) as g:
            positions = (await g.receive())["streams"]
        redis_server.stop()
        await wait_healthy(app, want=503)
        redis_server.start()
        await wait_healthy(app, want=200, timeout=20)
        async with asgi.WebSocket(
            app, headers={"cookie": greg}, query=resume_query(positions)
        ) as g:
            before, resumed = await until(g, "resumed")
            assert resumed["recovered"] is False and sorted(resumed["lost"]) == sorted(positions)
            streams = before[0]["streams"]
            assert all(streams[s]["epoch"] != positions[s]["epoch"] for s in positions)
            await g.send_json({"type": "broadcast", "text": "after"})
            assert (await messages(g, 1))[0]["offset"] == streams["all"]["offset"] + 1
    finally:
        await app.shutdown()


async def test_presence_is_counted_across_nodes(settings: Settings, prefix: str) -> None:
    """Who is online is the same from either node; a user's first connection and last
    disconnection over both nodes reach their group's members on both, once."""
    async with two_nodes(settings, prefix, presence_events_max=100) as (a, b):
        amanda, lisa, greg = [await login(a, name) for name in ("amanda", "lisa", "greg")]
        async with asgi.WebSocket(a, headers={"cookie": amanda}) as on_a:
            await until(on_a, "welcome")
            async with asgi.WebSocket(b, headers={"cookie": lisa}) as lisa_b:
                await until(lisa_b, "welcome")
                _, online = await until(on_a, "online")
                if online["user"] == "amanda":  # her own, if node a heard it in time
                    _, online = await until(on_a, "online")
                assert online == {"type": "online", "user": "lisa", "group": "girls"}
                async with (
                    asgi.WebSocket(a, headers={"cookie": lisa}) as lisa_a,
                    asgi.WebSocket(b, headers={"cookie": greg}) as greg_b,
                ):
                    await until(lisa_a, "welcome"), await until(greg_b, "welcome")
                    for ws in (on_a, lisa_b):
                        await ws.send_json({"type": "presence", "group": "girls", "id": "p"})
                        _, answer = await until(ws, "presence")
                        assert (answer["online"], answer["count"]) == (["amanda", "lisa"], 2)
                    await greg_b.send_json({"type": "presence", "group": "boys"})
                    _, answer = await until(greg_b, "presence")
                    assert (answer["online"], answer["count"]) == (["greg"], 1)
                await asyncio.sleep(0.3)
                assert all(e["type"] != "offline" for e in on_a.events)  # lisa is still on b
                assert await on_a.nothing(0.3)
            _, offline = await until(on_a, "offline")
            assert offline == {"type": "offline", "user": "lisa", "group": "girls"}


@pytest.mark.slow(27)
async def test_a_killed_nodes_users_go_offline_within_30_s(
    tmp_path: Path, demo_db: Path, prefix: str
) -> None:
    """Real hypercorn, two nodes: a node killed with SIGKILL says no goodbye, yet its users
    are offline for the other node's clients within 30 s, and for the lifecycle webhooks
    (told by the live node); a client of the dead node resumes on the live one with what
    it missed."""
    receiver = Receiver()
    await receiver.start()
    env = {
        "WSFANOUT_REDIS_URL": REDIS_URL,
        "WSFANOUT_REDIS_PREFIX": prefix,
        "WSFANOUT_PRESENCE_EVENTS_MAX": "100",
        "WSFANOUT_WEBHOOK_URL": receiver.url,
        "WSFANOUT_WEBHOOK_SECRET": "a-test-secret-of-ours",
    }
    servers = []
    for name in ("alive", "doomed"):
        (tmp_path / name).mkdir()
        shutil.copy(demo_db, tmp_path / name / "wsfanout.sqlite3")
        servers.append(Server(tmp_path / name, env))
    alive, doomed = servers
    for server in servers:
        server.start()
    try:
        amanda = await Client.open(alive.ws_url, alive.login("amanda"))
        await amanda.next_of("welcome")
        lisa = await Client.open(doomed.ws_url, doomed.login("lisa"))
        positions = (await lisa.next_of("welcome"))["streams"]
        while (await amanda.next_of("online"))["user"] != "lisa":
            pass  # amanda's own, if her node heard it in time
        await amanda.send({"type": "group", "group": "girls", "text": "seen"})
        seen = await lisa.next_of("message")
        positions["group:girls"]["offset"] = seen["offset"]
        doomed.kill()
        killed = time.monotonic()
        await amanda.send({"type": "group", "group": "girls", "text": "missed"})
        offline = await amanda.next_of("offline", timeout=40)
        took = time.monotonic() - killed
        assert offline["user"] == "lisa" and took < 30, took
        print(f"figure presence: a killed node's user went offline after {took:.1f} s")
        async with asyncio.timeout(15):
            while not (told := posted(receiver, "offline", "lisa")):  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        assert (
            len(told) == 1 and told[0]["node"] != posted(receiver, "connected", "lisa")[0]["node"]
        )
        await lisa.close()
        await amanda.close()
        back = await Client.open(alive.ws_url + "?" + resume_query(positions), alive.login("lisa"))
        assert (await back.next())["type"] == "welcome"
        replay = await back.next()
        assert (replay["text"], replay["offset"]) == ("missed", seen["offset"] + 1)
        assert await back.next() == {"type": "resumed", "recovered": True, "missed": 1}
        await back.close()
    finally:
        for server in servers:
            server.stop()
        await receiver.stop()


def posted(receiver: Receiver, kind: str, user: str) -> list[dict[str, Any]]:
    """The lifecycle events of this type and user the webhook receiver has had."""
    events = [e for r in receiver.received for e in orjson.loads(r.body)["events"]]
    return [e for e in events if (e["type"], e["user"]) == (kind, user)]


async def test_history_on_request_is_read_from_redis(settings: Settings, prefix: str) -> None:
    """History requests on one node answer what was published on the other (DESIGN 5.4):
    the stream's epoch and offset as every node sees them, the last N messages in order,
    at most WSFANOUT_HISTORY_SIZE; a group nobody published to stands at offset 0."""
    async with two_nodes(settings, prefix, history_size=4) as (a, b):
        greg = await login(a, "greg")
        async with (
            asgi.WebSocket(a, headers={"cookie": greg}) as on_a,
            asgi.WebSocket(b, headers={"cookie": greg}) as on_b,
        ):
            await until(on_a, "welcome")
            _, welcome = await until(on_b, "welcome")
            live = []
            for text in "abcde":
                await on_a.send_json({"type": "broadcast", "text": text})
                live += await messages_until(on_a, 1)
            await messages_until(on_b, 5)  # node b has heard them too
            for limit, texts in ((2, "de"), (100, "bcde")):
                await on_b.send_json({"type": "history", "stream": "all", "limit": limit})
                _, answer = await until(on_b, "history")
                assert [m["text"] for m in answer["messages"]] == list(texts)
                assert answer["messages"] == live[-len(texts) :]
                assert (answer["epoch"], answer["offset"]) == (
                    welcome["streams"]["all"]["epoch"],
                    live[-1]["offset"],
                )
            await on_b.send_json({"type": "history", "stream": "group:boys", "limit": 5})
            _, answer = await until(on_b, "history")
            assert (answer["offset"], answer["messages"]) == (0, [])
            assert answer["epoch"] == welcome["streams"]["group:boys"]["epoch"]


async def test_a_history_answer_from_redis_fits_the_outbox(settings: Settings, prefix: str) -> None:
    """Read from Redis, too, an answer holds only the newest messages that fit a quarter of
    the outbox's bound."""
    async with (
        two_nodes(settings, prefix, outbox_bytes=64 * 1024) as (a, _),
        asgi.WebSocket(a, headers={"cookie": await login(a, "greg")}) as g,
    ):
        await until(g, "welcome")
        for n in range(5):
            await g.send_json({"type": "broadcast", "text": f"{n:02}" + "x" * 4000})
            await messages_until(g, 1)
        await g.send_json({"type": "history", "stream": "all", "limit": 5})
        _, answer = await until(g, "history")
        assert [m["text"][:2] for m in answer["messages"]] == ["02", "03", "04"]


async def test_a_resume_on_a_node_that_has_just_started_recovers(
    settings: Settings, prefix: str
) -> None:
    """A node takes handshakes before its first Redis connection is up: a client resuming
    on it at once still recovers what Redis holds, instead of being told it lost it."""
    async with two_nodes(settings, prefix) as (a, _), Proxy(6379) as slow_link:
        slow_link.hold = 0.3  # the new node's first connections to Redis take this long
        url = f"redis://127.0.0.1:{slow_link.port}/0"
        shared = dataclasses.replace(settings, redis_url=url, redis_prefix=prefix)
        greg = await login(a, "greg")
        async with asgi.WebSocket(a, headers={"cookie": greg}) as first:
            _, welcome = await until(first, "welcome")
            await first.send_json({"type": "broadcast", "text": "while greg moves"})
            await messages_until(first, 1)
        fresh = create_app(shared)
        await fresh.startup()  # and at once, before its link to Redis is up:
        try:
            async with asgi.WebSocket(
                fresh, headers={"cookie": greg}, query=resume_query(welcome["streams"])
            ) as again:
                before, resumed = await until(again, "resumed")
                assert resumed["recovered"] is True, resumed
                assert [e["text"] for e in before if e["type"] == "message"] == ["while greg moves"]
        finally:
            await fresh.shutdown()
