"""sources/amqp: the RabbitMQ consumer against the real broker on 127.0.0.1:5672.

Skipped with the reason when no broker runs, except under CI=true, where that
fails. Every test uses its own queue, deleted afterwards.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest

from tests import asgi
from tests.conftest import login
from tests.proxy import Proxy, unused_port
from tests.server import (
    Client,
    RedisServer,
    Server,
    delete_redis_keys,
    need_redis,
    queue_messages,
)
from wsfanout import App, Settings, create_app

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


@pytest.fixture(scope="module", autouse=True)
def need_rabbitmq() -> None:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            return
    except OSError:
        if os.environ.get("CI") == "true":
            pytest.fail("RabbitMQ is not running on 127.0.0.1:5672, and CI=true requires it")
        pytest.skip("RabbitMQ is not running on 127.0.0.1:5672 (start rabbitmq-server)")


@pytest.fixture
async def broker() -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    """A channel with publisher confirms, for the test to put messages on the queue."""
    connection = await aio_pika.connect_robust(AMQP_URL)
    channel = await connection.channel(publisher_confirms=True)
    yield channel
    await connection.close()


@pytest.fixture
async def consumer(
    settings: Settings, broker: aio_pika.abc.AbstractChannel
) -> AsyncIterator[tuple[App, str]]:
    queue = f"wsfanout-test-{uuid.uuid4().hex[:10]}"
    app = create_app(
        dataclasses.replace(settings, amqp_url=AMQP_URL, amqp_queue=queue, amqp_prefetch=20)
    )
    await app.startup()
    svc = app.service
    assert svc is not None and svc.amqp is not None
    deadline = time.monotonic() + 15
    while not svc.amqp.consuming:
        assert time.monotonic() < deadline, svc.amqp.reason
        await asyncio.sleep(0.05)
    yield app, queue
    await app.shutdown()
    await broker.queue_delete(queue)


async def put(channel: aio_pika.abc.AbstractChannel, queue: str, body: Any) -> None:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    await channel.default_exchange.publish(aio_pika.Message(body=data), routing_key=queue)


async def texts(ws: asgi.WebSocket, count: int, timeout: float = 30) -> list[str]:
    found: list[str] = []
    deadline = time.monotonic() + timeout
    while len(found) < count:
        event = await ws.receive(timeout=max(0.1, deadline - time.monotonic()))
        if event["type"] == "message":
            found.append(event["text"])
    return found


async def test_a_queued_message_reaches_the_right_sockets(
    consumer: tuple[App, str], broker: aio_pika.abc.AbstractChannel
) -> None:
    """A group message on the queue reaches the group's sockets only; /healthz says ok."""
    app, queue = consumer
    async with (
        asgi.WebSocket(app, headers={"cookie": await login(app, "amanda")}) as amanda,
        asgi.WebSocket(app, headers={"cookie": await login(app, "greg")}) as greg,
    ):
        await amanda.receive(), await greg.receive()
        await put(
            broker, queue, {"type": "group", "group": "girls", "text": "sale", "from": "shop"}
        )
        event = await amanda.receive()
        assert (event["kind"], event["from"], event["text"]) == ("group", "shop", "sale")
        assert await greg.nothing(0.3)
    health = (await asgi.request(app, "GET", "/healthz")).json()
    assert health["checks"]["amqp"] == "ok"


async def test_bad_messages_are_rejected_and_the_next_flows(
    consumer: tuple[App, str],
    broker: aio_pika.abc.AbstractChannel,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Bad JSON and unknown targets are rejected (not requeued, logged); good ones flow."""
    app, queue = consumer
    async with asgi.WebSocket(app, headers={"cookie": await login(app, "greg")}) as ws:
        await ws.receive()
        await put(broker, queue, b"{not json")
        await put(broker, queue, {"type": "group", "group": "chess", "text": "x"})
        await put(broker, queue, [{"type": "broadcast", "text": "ok"}, {"type": "nope"}])
        await put(broker, queue, {"type": "broadcast", "text": "good"})
        assert await texts(ws, 1) == ["good"]
        assert await ws.nothing(0.3)
    svc = app.service
    assert svc is not None and svc.amqp is not None
    assert svc.amqp.stats["rejected"] == 3
    declared = await broker.declare_queue(queue, durable=True)
    assert declared.declaration_result.message_count == 0  # not requeued
    reasons = [r.getMessage() for r in caplog.records if "rejecting" in r.getMessage()]
    assert any("not valid JSON" in r for r in reasons)
    assert any("no group named 'chess'" in r for r in reasons)


async def test_a_text_too_large_on_the_wire_is_rejected(
    consumer: tuple[App, str],
    broker: aio_pika.abc.AbstractChannel,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 24: 65,536 x U+0001 is 64 KiB of UTF-8 but 393,216 bytes once JSON-escaped
    on the wire: rejected as too_large (not requeued), nothing of its batch published;
    the largest text that fits on the wire goes out, and the next message flows."""
    app, queue = consumer
    largest = "\x01" * 10_922 + "a" * 4  # 65,536 bytes on the wire
    async with asgi.WebSocket(app, headers={"cookie": await login(app, "greg")}) as ws:
        await ws.receive()
        too_large = [
            {"type": "broadcast", "text": "first"},
            {"type": "broadcast", "text": "\x01" * 65_536},
        ]
        await put(broker, queue, too_large)
        await put(broker, queue, {"type": "broadcast", "text": largest + "a"})
        await put(broker, queue, {"type": "broadcast", "text": largest})
        await put(broker, queue, {"type": "broadcast", "text": "next"})
        assert await texts(ws, 2) == [largest, "next"]
        assert await ws.nothing(0.3)
    svc = app.service
    assert svc is not None and svc.amqp is not None
    assert svc.amqp.stats["rejected"] == 2
    reasons = [r.getMessage() for r in caplog.records if "rejecting" in r.getMessage()]
    assert len(reasons) == 2 and all("too_large" in r and "65536 bytes" in r for r in reasons)


async def test_a_thousand_messages_exactly_once(
    consumer: tuple[App, str], broker: aio_pika.abc.AbstractChannel
) -> None:
    """1,000 queued broadcasts reach every socket, each exactly once, in order."""
    app, queue = consumer
    names = ("greg", "lisa", "mike")
    cookies = [await login(app, name) for name in names]
    async with (
        asgi.WebSocket(app, headers={"cookie": cookies[0]}) as a,
        asgi.WebSocket(app, headers={"cookie": cookies[1]}) as b,
        asgi.WebSocket(app, headers={"cookie": cookies[2]}) as c,
    ):
        for ws in (a, b, c):
            await ws.receive()
        for n in range(1000):
            await put(broker, queue, {"type": "broadcast", "text": str(n)})
        for ws in (a, b, c):
            assert await texts(ws, 1000) == [str(n) for n in range(1000)]
            assert await ws.nothing(0.3)


def close_consumer_connection(queue: str) -> None:
    """Have the broker close the consumer's connection (named after its queue)."""
    listing = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    pids = [line.split("\t")[0] for line in listing.splitlines() if queue in line]
    assert pids, listing
    for pid in pids:
        subprocess.run(
            ["rabbitmqctl", "-q", "close_connection", pid, "closed by the test"],
            capture_output=True,
            timeout=60,
            check=True,
        )


@pytest.mark.skipif(
    shutil.which("rabbitmqctl") is None and os.environ.get("CI") != "true",
    reason="rabbitmqctl is not installed (it comes with rabbitmq-server)",
)
async def test_connection_cut_mid_stream_loses_nothing(
    consumer: tuple[App, str], broker: aio_pika.abc.AbstractChannel
) -> None:
    """The broker cuts the consumer's connection in the middle of 1,000 messages: after
    reconnecting, every message arrives at least once; duplicates are the unacked window."""
    app, queue = consumer
    svc = app.service
    assert svc is not None and svc.amqp is not None
    async with asgi.WebSocket(app, headers={"cookie": await login(app, "anny")}) as ws:
        await ws.receive()
        for n in range(500):
            await put(broker, queue, {"type": "broadcast", "text": str(n)})
        first = await texts(ws, 100)
        await asyncio.to_thread(close_consumer_connection, queue)
        for n in range(500, 1000):  # these wait in the queue while the consumer reconnects
            await put(broker, queue, {"type": "broadcast", "text": str(n)})
        received = Counter(first)
        deadline = time.monotonic() + 60
        while len(received) < 1000:
            assert time.monotonic() < deadline, f"only {len(received)} of 1000 arrived"
            for text in await texts(ws, 1, timeout=deadline - time.monotonic()):
                received[text] += 1
        assert set(received) == {str(n) for n in range(1000)}
        duplicates = sum(count - 1 for count in received.values())
        # At-least-once: only messages published but not yet acked when the connection
        # dropped come again, so at most the prefetch window (20) are duplicated.
        assert duplicates <= 20, duplicates
        print(f"connection cut: 1000 of 1000 arrived, {duplicates} duplicates")
    assert svc.amqp.stats["acked"] >= 1000 - 20
    deadline = time.monotonic() + 15
    while not svc.amqp.consuming:
        assert time.monotonic() < deadline, svc.amqp.reason
        await asyncio.sleep(0.05)
    assert (await asgi.request(app, "GET", "/healthz")).status == 200
    assert svc.amqp.stats["reconnects"] == 1  # the cut really happened, and healed


async def test_backplane_outage_requeues_until_redis_is_back(
    settings: Settings, broker: aio_pika.abc.AbstractChannel, tmp_path: Path
) -> None:
    """With Redis down the message is nacked and requeued; once Redis is back it arrives."""
    if shutil.which("redis-server") is None and os.environ.get("CI") != "true":
        pytest.skip("redis-server is not installed")
    redis_server = RedisServer(tmp_path)
    redis_server.start()
    queue = f"wsfanout-test-{uuid.uuid4().hex[:10]}"
    app = create_app(
        dataclasses.replace(
            settings,
            amqp_url=AMQP_URL,
            amqp_queue=queue,
            redis_url=redis_server.url,
            redis_prefix=f"{queue}:",
        )
    )
    await app.startup()
    try:
        svc = app.service
        assert svc is not None and svc.amqp is not None and svc.hub.backplane is not None
        deadline = time.monotonic() + 15
        while not (svc.amqp.consuming and svc.hub.backplane.healthy):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        lisa = await login(app, "lisa")
        async with asgi.WebSocket(app, headers={"cookie": lisa}) as ws:
            positions = (await ws.receive())["streams"]
            redis_server.stop()
            while svc.hub.backplane.healthy:  # noqa: ASYNC110 - another part's state
                await asyncio.sleep(0.05)
            await put(broker, queue, {"type": "broadcast", "text": "eventually"})
            while svc.amqp.stats["requeued"] < 1:
                assert time.monotonic() < deadline + 30
                await asyncio.sleep(0.05)
            assert await ws.nothing(0.2)
            redis_server.start()
            # Back on Redis, the node closes its connections (1012) so that they resume.
            got = [e["text"] for e in await ws.until_closed() if e["type"] == "message"]
            assert ws.close_code == 1012
        query = asgi.resume_query(positions)
        while not got:
            async with asgi.WebSocket(app, headers={"cookie": lisa}, query=query) as ws:
                _, resumed = await asgi.until(ws, "resumed")
                # Redis lost its data: new epochs, so nothing can be recovered; the
                # message comes live once RabbitMQ hands it over again.
                assert sorted(resumed["lost"]) == sorted(positions)
                got = await texts(ws, 1, timeout=30)
        assert got == ["eventually"]
    finally:
        await app.shutdown()
        redis_server.stop()
        await broker.queue_delete(queue)


@pytest.mark.parametrize(("history", "recovered"), [(3000, True), (100, False)])
async def test_messages_across_a_node_restart_reach_a_resuming_client_or_it_is_told(
    tmp_path: Path,
    demo_db: Path,
    broker: aio_pika.abc.AbstractChannel,
    history: int,
    recovered: bool,
) -> None:
    """2,000 queued broadcasts while the only node (real hypercorn, Redis on) restarts:
    the ones taken while nobody was connected are kept in Redis's history, and a client
    that resumes on the new node gets every one exactly once, or, when the history is
    shorter than its gap, is told recovered false. Nothing is lost without a word."""
    need_redis()
    queue = f"wsfanout-test-{uuid.uuid4().hex[:10]}"
    env = {
        "WSFANOUT_REDIS_URL": "redis://127.0.0.1:6379/0",
        "WSFANOUT_REDIS_PREFIX": f"{queue}:",
        "WSFANOUT_AMQP_URL": AMQP_URL,
        "WSFANOUT_AMQP_QUEUE": queue,
        "WSFANOUT_HISTORY_SIZE": str(history),
    }
    total = 2000
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    first = Server(tmp_path, env)
    first.start()
    second = Server(tmp_path, env)
    try:
        client = await Client.open(first.ws_url, first.login("greg"))
        positions = (await client.next())["streams"]
        received: list[dict[str, Any]] = []
        for n in range(total):
            await put(broker, queue, {"type": "broadcast", "text": str(n)})
            if n == 500:
                while len(received) < 300:
                    received.append(await client.next_of("message"))
                await asyncio.to_thread(first.stop)  # a deploy: the node goes away mid-stream
        while not client.events.empty():  # what it got before the close
            event = client.events.get_nowait()
            if event["type"] == "message":
                received.append(event)
        await client.close()
        await asyncio.to_thread(second.start)
        deadline = time.monotonic() + 60
        while await queue_messages(AMQP_URL, queue):  # taken while nobody is connected
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        positions["all"]["offset"] = received[-1]["offset"]
        query = "resume=" + urllib.parse.quote(orjson.dumps(positions).decode())
        back = await Client.open(second.ws_url + "?" + query, second.login("greg"))
        assert (await back.next())["type"] == "welcome"
        while (event := await back.next(30))["type"] != "resumed":
            if event["type"] == "message":
                received.append(event)
        received += [e for e in await back.quiet(0.5) if e["type"] == "message"]
        await back.close()
    finally:
        first.stop()
        second.stop()
        delete_redis_keys(f"{queue}:")
        await broker.queue_delete(queue)
    offsets = [event["offset"] for event in received]
    assert len(set(offsets)) == len(offsets)  # the client got no message twice
    # Delivery from RabbitMQ is at least once (sources/amqp.py): a message published by the
    # stopping node whose ack did not reach the broker comes again, from the new node, as a
    # new message. At most a prefetch's worth, each once more, right after the first's.
    texts: list[str] = []
    again: list[str] = []
    for got in received:
        (again if got["text"] in texts else texts).append(got["text"])
    assert len(again) <= 100 and len(set(again)) == len(again)
    missing = total - len(texts)
    print(
        f"figure amqp-restart history={history}: {len(texts)} of {total} received, "
        f"{missing} missing, {len(again)} delivered again by the broker, "
        f"recovered={event['recovered']} {event.get('lost', [])}"
    )
    assert event["recovered"] is recovered
    if recovered:
        assert texts == [str(n) for n in range(total)]
    else:
        assert event["lost"] == ["all"] and missing > 0


LIBRARY_LOGGERS = ("aiormq", "aio_pika")


def amqp_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the log holds about RabbitMQ: wsfanout's lines and any of aiormq's or aio-pika's."""
    return [
        f"{r.name}: {r.getMessage() if r.name.startswith('wsfanout') else r.msg}"
        for r in caplog.records
        if r.name == "wsfanout.sources.amqp" or r.name.startswith(LIBRARY_LOGGERS)
    ]


async def test_a_broker_away_is_one_line_per_change_of_state(
    settings: Settings, broker: aio_pika.abc.AbstractChannel, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker unreachable at start, then one that goes away and comes back: one line when
    it cannot connect, one when consuming, one when the connection is lost, one when
    consuming again; none of aiormq's and aio-pika's records of each attempt (an ERROR
    and an INFO a second)."""
    caplog.set_level(logging.INFO)
    queue = f"wsfanout-test-{uuid.uuid4().hex[:10]}"
    async with Proxy(unused_port()) as proxy:  # nothing listens behind it yet
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        app = create_app(dataclasses.replace(settings, amqp_url=url, amqp_queue=queue))
        await app.startup()
        try:
            svc = app.service
            assert svc is not None and svc.amqp is not None
            await asyncio.sleep(3)  # attempts at 0, 0.5 and 1.5 s (the backoff doubles)
            assert not svc.amqp.consuming
            proxy.point(5672)  # the broker is there
            await until(lambda: svc.amqp is not None and svc.amqp.consuming)
            proxy.point(unused_port())  # and gone: aio-pika tries again every second
            assert proxy.reset() >= 1
            await until(lambda: svc.amqp is not None and not svc.amqp.consuming)
            await asyncio.sleep(3)
            proxy.point(5672)
            await until(lambda: svc.amqp is not None and svc.amqp.consuming)
            assert svc.amqp.stats["reconnects"] == 1
        finally:
            await app.shutdown()
            await broker.queue_delete(queue)
    lines = amqp_lines(caplog)
    assert [line.split(": ")[1] for line in lines] == [
        f"RabbitMQ queue '{queue}'",  # cannot connect
        f"RabbitMQ queue '{queue}'",  # consuming
        f"RabbitMQ queue '{queue}'",  # connection lost
        f"RabbitMQ queue '{queue}'",  # consuming
        f"RabbitMQ queue '{queue}'",  # stopped
    ], "\n".join(lines)
    assert "cannot connect: " in lines[0]
    assert lines[1].endswith("consuming") and lines[3].endswith("consuming")
    assert "connection lost" in lines[2] and lines[2].endswith("reconnecting")


async def test_a_port_nothing_listens_on_is_one_line(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """WSFANOUT_AMQP_URL at a port nothing listens on (connections refused): one line
    saying it cannot connect, none of aiormq's or aio-pika's for each attempt."""
    caplog.set_level(logging.INFO)
    url = f"amqp://guest:guest@127.0.0.1:{unused_port()}/"
    app = create_app(dataclasses.replace(settings, amqp_url=url, amqp_queue="never-declared"))
    await app.startup()
    try:
        await asyncio.sleep(4)  # attempts at 0, 0.5, 1.5 and 3.5 s (the backoff doubles)
    finally:
        await app.shutdown()
    lines = amqp_lines(caplog)
    assert len(lines) == 2, "\n".join(lines)
    assert "cannot connect: AMQPConnectionError: [Errno 111] Connect call failed" in lines[0]
    assert lines[1].endswith("stopped")


async def until(condition: Callable[[], bool], within: float = 30) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
