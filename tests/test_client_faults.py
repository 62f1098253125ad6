"""client: what the Python client makes of failures, against real hypercorn and uvicorn, one
node and two through Redis. A client cut off while messages are published (the network
reset, its node restarted or killed, Redis restarted) gets every acknowledged message
exactly once and in order, or a ``resumed`` with ``recovered: false`` naming the stream;
clients that lose their server together come back spread out; an auth refusal stops it
unless a new credential can be had.

The network between client and node is ``tests/proxy.py``: it resets every connection at
once, and is pointed at the other node when one dies, as a load balancer would be.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.listener import (
    SERVER_ENV,
    Listener,
    Publisher,
    exactly_once,
    token,
)
from tests.proxy import Proxy
from tests.server import RedisServer, Server, http
from wsfanout.client import Client

# History long enough for any gap these tests make: a stream is lost only when a test means it.
ENV = {**SERVER_ENV, "WSFANOUT_HISTORY_SIZE": "5000"}


def quick(url: str, **options: Any) -> Client:
    """A client that comes back quickly (these tests are not of the backoff)."""
    return Client(url, min_delay=0.05, max_delay=0.5, **options)


def redis_env(prefix: str, url: str = "redis://127.0.0.1:6379/0") -> dict[str, str]:
    return {**ENV, "WSFANOUT_REDIS_URL": url, "WSFANOUT_REDIS_PREFIX": prefix}


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, to stop and start."""
    if shutil.which("redis-server") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is not installed, and CI=true requires it")
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def folder(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


async def cut_off(
    url: str,
    publish_to: Callable[[], Server],
    cut: Callable[[], Awaitable[None]],
    *,
    lost: bool = False,
) -> tuple[Listener, Publisher]:
    """A client listens while messages are published; ``cut`` cuts it off once it has
    some; then it must come back and get the rest: every acknowledged message once, in
    order, unless (``lost``) a resumed said the stream was lost. The listener and the
    publisher, for more checks."""
    chat = quick(url, token=token("rita"))
    await chat.connect()
    listener, publisher = Listener(chat), Publisher()
    stop = asyncio.Event()
    publishing = asyncio.create_task(publisher.run(publish_to, stop))
    try:
        await listener.until(lambda: len(listener.texts()) >= 20)
        await cut()
        await listener.until(lambda: len(listener.of("resumed")) == 1)
        after = len(publisher.acked)
        await listener.until(
            lambda: len(listener.texts()) >= 20 and len(publisher.acked) > after + 20
        )
    finally:
        stop.set()
        await publishing
    assert await publisher.publish(publish_to(), "end")
    await listener.got("end")
    await listener.stop()
    resumed = listener.of("resumed")[0]
    missing = exactly_once(listener.texts(), publisher.acked, lost=not resumed["recovered"])
    print(
        f"published {len(publisher.acked)} (refused {publisher.refused}), got "
        f"{len(listener.texts())}, missing {len(missing)}, resumed {resumed}"
    )
    assert not resumed["recovered"] if lost else resumed["recovered"], resumed
    return listener, publisher


async def test_a_network_reset_loses_nothing(tmp_path: Path, server_kind: str) -> None:
    """The connection reset mid-stream (one node, history in memory): the client resumes
    and gets every message once, in order."""
    with Server(tmp_path, ENV, server=server_kind).running() as node:
        async with Proxy(node.port) as proxy:

            async def reset() -> None:
                assert proxy.reset() == 1

            await cut_off(proxy.ws_url, lambda: node, reset)


async def test_a_restarted_node_loses_nothing(
    tmp_path: Path, server_kind: str, redis_prefix: str
) -> None:
    """The client's node restarts (same data directory) while the other node publishes;
    history is in Redis: the client comes back to it and misses nothing."""
    env = redis_env(redis_prefix)
    with (
        Server(folder(tmp_path, "a"), env, server=server_kind).running() as a,
        Server(folder(tmp_path, "b"), env, server=server_kind).running() as b,
    ):

        async def restart() -> None:
            await asyncio.to_thread(a.stop)
            await asyncio.to_thread(a.start)

        await cut_off(a.ws_url, lambda: b, restart)


async def test_a_killed_node_loses_nothing(
    tmp_path: Path, server_kind: str, redis_prefix: str
) -> None:
    """The client's node is killed (SIGKILL) and the network sends it to the other node:
    it resumes there from Redis and misses nothing."""
    env = redis_env(redis_prefix)
    with (
        Server(folder(tmp_path, "a"), env, server=server_kind).running() as a,
        Server(folder(tmp_path, "b"), env, server=server_kind).running() as b,
    ):
        async with Proxy(a.port) as proxy:

            async def kill() -> None:
                proxy.point(b.port)
                await asyncio.to_thread(a.kill)

            await cut_off(proxy.ws_url, lambda: b, kill)


async def test_a_restarted_redis_is_a_lost_stream_and_nothing_else(
    tmp_path: Path, server_kind: str, redis_server: RedisServer
) -> None:
    """Redis restarts empty while messages are published: the node reconnects its clients
    (1012), history is gone, so the client is told the stream was lost; what it did get
    came once and in order, and what it missed is one run, between Redis going and the
    client's return."""
    env = redis_env("wsfanout-client-faults:", redis_server.url)
    with Server(tmp_path, env, server=server_kind).running() as node:

        async def restart_redis() -> None:
            await asyncio.to_thread(redis_server.stop)
            await asyncio.to_thread(redis_server.start)

        listener, publisher = await cut_off(node.ws_url, lambda: node, restart_redis, lost=True)
    resumed = listener.of("resumed")[0]
    assert sorted(resumed["lost"]) == ["all", "user:rita"]
    assert resumed["restarted"] == ["user:rita"]  # nothing was sent to rita since
    got = set(listener.texts())
    missed = [n for n, text in enumerate(publisher.acked) if text not in got]
    assert missed, "all was lost, yet nothing is missing: the test cut nothing"
    assert missed == list(range(missed[0], missed[-1] + 1))  # one run


async def test_an_expired_token_stops_the_client_without_a_new_one(
    tmp_path: Path, server_kind: str
) -> None:
    """A token that expires while connected: the server closes 1008; with the same token
    the client does not retry (closed, unauthorized, one attempt); with get_token it asks
    for a new one once and carries on."""
    with Server(tmp_path, ENV, server=server_kind).running() as node:
        fixed_states: list[tuple[str, str]] = []
        fixed = Client(
            node.ws_url, token=token("tim", lifetime=2), on_state=lambda *s: fixed_states.append(s)
        )
        asked: list[float] = []

        def get_token() -> str:
            asked.append(time.monotonic())
            return token("tom", lifetime=2 if len(asked) == 1 else 300)

        renewed = quick(node.ws_url, get_token=get_token)
        await fixed.connect()
        await renewed.connect()
        fixed_listener, renewed_listener = Listener(fixed), Listener(renewed)
        await asyncio.wait_for(fixed_listener.task, 15)  # the iteration ends with the client
        assert (fixed.state, fixed.reason) == ("closed", "unauthorized")
        assert fixed_states == [
            ("connecting", ""),
            ("connected", "welcome"),
            ("closed", "unauthorized"),
        ]
        assert fixed_listener.events[-1]["code"] == "forbidden"  # the server said why
        await renewed_listener.until(lambda: len(renewed_listener.of("welcome")) == 2)
        assert len(asked) == 2 and renewed.state == "connected"
        await renewed_listener.stop()


async def test_revoked_sessions_log_in_again_and_a_changed_password_stops(
    tmp_path: Path, server_kind: str, demo_db: Path
) -> None:
    """Logged in with a password: the operator ends the user's sessions (admin API), the
    server closes 1008, and the client logs in again once and carries on; the password
    changed, that login is refused and the client stops (closed, unauthorized)."""
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    with Server(tmp_path, ENV, server=server_kind).running() as node:
        admin = {"authorization": f"Bearer {SERVER_ENV['WSFANOUT_API_KEYS']}"}
        chat = quick(node.ws_url, username="lisa", password="Lisa")
        await chat.connect()
        listener = Listener(chat)
        status, _ = await asyncio.to_thread(
            http, "POST", node.http_url + "/api/users/lisa/disconnect", {}, admin
        )
        assert status in (200, 204)
        await listener.until(lambda: len(listener.of("welcome")) == 2)
        assert chat.state == "connected"
        status, _ = await asyncio.to_thread(
            http, "PUT", node.http_url + "/api/users/lisa/password", {"password": "new!"}, admin
        )
        assert status in (200, 204)
        await asyncio.wait_for(listener.task, 15)
        assert (chat.state, chat.reason) == ("closed", "unauthorized")
        assert len(listener.of("welcome")) == 2
