"""Idempotent publishing: ``idempotency.RecentKeys`` on its own, then a publish's
``idempotency_key`` (and RabbitMQ's ``message_id``) against real servers: one node in
memory, two nodes through the real Redis (their own prefix), the real broker (its own
queue). A duplicate is taken (202, acked) and reaches no one twice."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import docs
from tests.server import Client, Server, delete_redis_keys, http, need_redis, queue_messages
from wsfanout.idempotency import RecentKeys

KEY = "idempotency-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}
TTL = 3.0  # seconds a key is kept by the servers here (WSFANOUT_IDEMPOTENCY_TTL)
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


# RecentKeys, with a clock of the test's own


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_key_is_new_once_per_stream() -> None:
    """A stream takes a key once; another stream takes the same key once too."""
    keys = RecentKeys(60, clock=Clock())
    assert keys.add("all", "k") is True
    assert keys.add("all", "k") is False
    assert keys.add("group:boys", "k") is True
    assert keys.add("group:boys", "k") is False
    assert keys.add("all", "other") is True
    assert len(keys) == 3


def test_a_key_is_new_again_after_its_ttl_from_its_first_publish() -> None:
    """A repeat does not extend a key: it is new again ``ttl`` after its first publish."""
    clock = Clock()
    keys = RecentKeys(10, clock=clock)
    assert keys.add("all", "k")
    clock.now += 9
    assert not keys.add("all", "k")
    clock.now += 1
    assert keys.add("all", "k")
    assert len(keys) == 1


def test_past_the_bound_the_oldest_key_goes_first() -> None:
    """At ``max_keys`` the oldest key is dropped for the next: memory stays bounded."""
    keys = RecentKeys(60, max_keys=3, clock=Clock())
    for name in "abcd":
        assert keys.add("all", name)
    assert len(keys) == 3
    assert keys.add("all", "a")  # dropped, so new again (and "b" goes)
    assert not keys.add("all", "d")
    assert len(keys) == 3


def test_a_forgotten_key_is_new_again() -> None:
    """``forget`` undoes an ``add`` whose publish did not go out."""
    keys = RecentKeys(60, clock=Clock())
    keys.add("all", "k")
    keys.forget("all", "k")
    keys.forget("all", "never")
    assert keys.add("all", "k")


# Real servers


def nodes_for(tmp_path: Path, demo_db: Path, count: int, env: dict[str, str]) -> list[Server]:
    servers = []
    for n in range(count):
        (tmp_path / f"node{n}").mkdir()
        shutil.copy(demo_db, tmp_path / f"node{n}" / "wsfanout.sqlite3")
        servers.append(Server(tmp_path / f"node{n}", env))
    return servers


@contextlib.contextmanager
def running(servers: list[Server]) -> Iterator[list[Server]]:
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()
    for server in servers:
        log = server.log_path.read_text()
        assert "Traceback" not in log, log


@pytest.fixture(params=["one node", "two nodes through Redis"])
def nodes(request: pytest.FixtureRequest, tmp_path: Path, demo_db: Path) -> Iterator[list[Server]]:
    """One node (keys in memory), or two sharing the real Redis (history on: the keys set
    by the publish script); the API on, a short key ttl."""
    env = {
        "WSFANOUT_API_KEYS": KEY,
        "WSFANOUT_RATE_LIMIT": "0",
        "WSFANOUT_IDEMPOTENCY_TTL": str(TTL),
    }
    count, prefix = 1, ""
    if request.param != "one node":
        need_redis()
        prefix = f"wsfanout-test-{uuid.uuid4().hex[:10]}:"
        env |= {"WSFANOUT_REDIS_URL": "redis://127.0.0.1:6379/0", "WSFANOUT_REDIS_PREFIX": prefix}
        count = 2
    try:
        with running(nodes_for(tmp_path, demo_db, count, env)) as servers:
            yield servers
    finally:
        if prefix:
            delete_redis_keys(prefix)


def publish(server: Server, body: Any) -> tuple[int, dict[str, Any]]:
    status, answer = http("POST", server.http_url + "/api/publish", body, AUTH)
    return status, json.loads(answer["_body"])


def duplicates(servers: list[Server]) -> float:
    return sum(server.metric("wsfanout_duplicates_dropped_total") for server in servers)


async def clients(servers: list[Server], *names: str) -> list[Client]:
    """A client of each of these users, on node after node in turn, past its welcome."""
    opened = []
    for n, name in enumerate(names):
        server = servers[n % len(servers)]
        client = await Client.open(server.ws_url, server.login(name))
        await client.next_of("welcome")
        opened.append(client)
    return opened


async def texts_until(client: Client, marker: str) -> list[str]:
    """The texts of the messages a client gets before the one that says ``marker``."""
    texts = []
    while (text := (await client.next_of("message", timeout=20))["text"]) != marker:
        texts.append(text)
    return texts


BAD_KEYS = ["", "k" * 65, 5, ["k"], {"k": 1}, True]


async def test_a_key_is_published_once_per_stream_until_its_ttl(nodes: list[Server]) -> None:
    """Over HTTP, on one node or two: the same key twice (on each node, in one batch too)
    is 202 each time and reaches every client once, the duplicates counted in /metrics;
    the same key on other streams reaches each; past the ttl it goes out again; a bad key
    is 400 and nothing of its batch goes out."""
    greg, amanda = await clients(nodes, "greg", "amanda")
    first, last = nodes[0], nodes[-1]
    once = {"type": "broadcast", "text": "once", "idempotency_key": "same-1"}
    assert publish(first, once) == (202, {"accepted": 1})
    assert publish(last, {**once, "text": "again"}) == (202, {"accepted": 1})
    assert publish(first, [once, once]) == (202, {"accepted": 2})
    assert publish(last, {"type": "broadcast", "text": "end 1"})[0] == 202
    for client in (greg, amanda):
        assert await texts_until(client, "end 1") == ["once"]
    assert duplicates(nodes) == 3

    items = [
        {"type": "broadcast", "text": "all", "idempotency_key": "same-1"},
        {"type": "group", "group": "boys", "text": "boys", "idempotency_key": "same-1"},
        {"type": "group", "group": "girls", "text": "girls", "idempotency_key": "same-1"},
        {"type": "direct", "user_name": "greg", "text": "you", "idempotency_key": "same-1"},
    ]
    assert publish(first, items[1:]) == (202, {"accepted": 3})
    assert publish(last, items) == (202, {"accepted": 4})
    assert publish(first, {"type": "broadcast", "text": "end 2"})[0] == 202
    assert await texts_until(greg, "end 2") == ["boys", "you"]
    assert await texts_until(amanda, "end 2") == ["girls"]
    assert duplicates(nodes) == 7

    await asyncio.sleep(TTL + 0.5)  # every key so far is forgotten
    assert publish(last, {**once, "text": "late"})[0] == 202
    assert publish(first, {"type": "broadcast", "text": "end 3"})[0] == 202
    assert await texts_until(greg, "end 3") == ["late"]

    good = {"type": "broadcast", "text": "never", "idempotency_key": "k" * 64}
    for key in BAD_KEYS:
        status, answer = publish(first, [good, {**good, "idempotency_key": key}])
        assert (status, answer["code"], answer["index"]) == (400, "bad_message", 1), key
        assert "'idempotency_key' must be a string of 1 to 64 characters" in answer["error"]
    assert publish(first, {"type": "broadcast", "text": "end 4"})[0] == 202
    assert await texts_until(greg, "end 4") == []
    await greg.close()
    await amanda.close()


async def test_publishing_once_over_http(tmp_path: Path, demo_db: Path) -> None:
    """The publishing page's two ``curl`` commands with the same key: both accepted, as
    their comments say, and a girl gets the message once."""
    with running(nodes_for(tmp_path, demo_db, 1, {"WSFANOUT_API_KEYS": f"key1,{KEY}"})) as servers:
        (amanda,) = await clients(servers, "amanda")
        block = docs.block("docs/publishing.md", "test_publishing_once_over_http")
        block = docs.substituted(block, {"http://127.0.0.1:8000": servers[0].http_url})
        ran = await asyncio.to_thread(docs.run_shell, block, tmp_path)
        assert ran.output == '{"accepted":1}' * 2, ran.output
        assert publish(servers[0], {"type": "group", "group": "girls", "text": "end"})[0] == 202
        assert await texts_until(amanda, "end") == ["order 1234 shipped"]
        await amanda.close()


# RabbitMQ: a redelivery repeats the message's message_id


def need_rabbitmq() -> None:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            return
    except OSError:
        if os.environ.get("CI") == "true":
            pytest.fail("RabbitMQ is not running on 127.0.0.1:5672, and CI=true requires it")
        pytest.skip("RabbitMQ is not running on 127.0.0.1:5672 (start rabbitmq-server)")


@pytest.fixture
async def consumers(tmp_path: Path, demo_db: Path, redis_prefix: str) -> AsyncIterator[Any]:
    """Two nodes through Redis (history off: the keys set by a script of their own)
    consuming one queue of the test's own; a channel to put messages on it."""
    need_rabbitmq()
    import aio_pika

    queue = f"wsfanout-test-{uuid.uuid4().hex[:10]}"
    env = {
        "WSFANOUT_API_KEYS": KEY,
        "WSFANOUT_RATE_LIMIT": "0",
        "WSFANOUT_HISTORY_SIZE": "0",
        "WSFANOUT_REDIS_URL": "redis://127.0.0.1:6379/0",
        "WSFANOUT_REDIS_PREFIX": redis_prefix,
        "WSFANOUT_AMQP_URL": AMQP_URL,
        "WSFANOUT_AMQP_QUEUE": queue,
    }
    connection = await aio_pika.connect_robust(AMQP_URL)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(queue, durable=True)
        with running(nodes_for(tmp_path, demo_db, 2, env)) as servers:
            yield servers, channel, queue
    finally:
        await connection.close()
        with contextlib.suppress(Exception):
            await queue_messages(AMQP_URL, queue, delete=True)


def acked(servers: list[Server]) -> float:
    """RabbitMQ messages acked by these nodes, in all."""
    total = 0.0
    for server in servers:
        _, answer = http("GET", server.http_url + "/metrics")
        found = re.search(
            r'^wsfanout_amqp_messages_total\{outcome="acked"\} (\S+)$', answer["_body"], re.M
        )
        total += float(found.group(1)) if found else 0.0
    return total


async def test_a_redelivered_rabbitmq_message_reaches_clients_once(consumers: Any) -> None:
    """The same body twice with the same message_id (as a redelivery comes), on two nodes
    competing for the queue: both acked, delivered once; an array's items once each; a
    body's own key wins; without a message_id, twice."""
    import aio_pika
    import orjson

    servers, channel, queue = consumers
    receivers = await clients(servers, "greg", "amanda")

    async def put(body: Any, message_id: str | None) -> None:
        message = aio_pika.Message(orjson.dumps(body), message_id=message_id)
        await channel.default_exchange.publish(message, routing_key=queue)

    one = {"type": "broadcast", "text": "one"}
    batch = [{"type": "broadcast", "text": "a"}, {"type": "broadcast", "text": "b"}]
    own = {"type": "broadcast", "text": "own", "idempotency_key": "body-key"}  # it wins
    sent = [
        (one, "id-1"),
        (one, "id-1"),
        (batch, "id-2"),
        (batch, "id-2"),
        (own, "id-3"),
        (own, "id-4"),
        ({"type": "broadcast", "text": "plain"}, None),
        ({"type": "broadcast", "text": "plain"}, None),
    ]
    for body, message_id in sent:
        await put(body, message_id)
    for _ in range(400):  # every one acked: published to Redis, or dropped there
        if acked(servers) == len(sent):
            break
        await asyncio.sleep(0.05)
    assert acked(servers) == len(sent)
    assert publish(servers[0], {"type": "broadcast", "text": "end"})[0] == 202
    for client in receivers:
        assert sorted(await texts_until(client, "end")) == [
            "a",
            "b",
            "one",
            "own",
            "plain",
            "plain",
        ]
        await client.close()
    assert duplicates(servers) == 4
