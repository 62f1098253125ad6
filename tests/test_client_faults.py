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
import collections
import contextlib
import functools
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
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
from tests.proxy import Proxy, unused_port
from tests.server import RedisServer, Server, http
from wsfanout.client import Client

# History long enough for any gap these tests make: a stream is lost only when a test means it.
ENV = {**SERVER_ENV, "WSFANOUT_HISTORY_SIZE": "5000"}


def quick(url: str, **options: Any) -> Client:
    """A client that comes back quickly (these tests are not of the backoff)."""
    return Client(url, min_delay=0.05, max_delay=0.5, **options)


def redis_env(prefix: str, url: str = "redis://127.0.0.1:6379/0") -> dict[str, str]:
    return {**ENV, "WSFANOUT_REDIS_URL": url, "WSFANOUT_REDIS_PREFIX": prefix}


def folder(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


@contextlib.asynccontextmanager
async def two_nodes(
    tmp_path: Path, server_kind: str, redis_prefix: str
) -> AsyncIterator[tuple[Server, Server, Proxy]]:
    """Two nodes through Redis, and the network to node a (which a test may point at b)."""
    env = redis_env(redis_prefix)
    with (
        Server(folder(tmp_path, "a"), env, server=server_kind).running() as a,
        Server(folder(tmp_path, "b"), env, server=server_kind).running() as b,
    ):
        async with Proxy(a.port) as proxy:
            yield a, b, proxy


async def cut_off(
    url: str,
    publish_to: Callable[[], Server],
    cut: Callable[[], Awaitable[None]],
    *,
    lost: bool = False,
    publisher: Publisher | None = None,
) -> tuple[Listener, Publisher]:
    """A client listens while messages are published (by ``publisher``, which ``cut`` may
    watch); ``cut`` cuts it off once it has some; then it must come back and get the rest:
    every acknowledged message once, in order, unless (``lost``) a resumed said the stream
    was lost. The listener and the publisher, for more checks."""
    chat = quick(url, token=token("rita"))
    await chat.connect()
    listener, publisher = Listener(chat), publisher or Publisher()
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
    history is in Redis: the client comes back to it and misses nothing.

    The network lets the client back only once the node says it is ready (/healthz): a
    node answers handshakes a moment before its Redis link is up, and a resume it answers
    then is lost whatever Redis holds (reported to the lead; not the client's to test)."""
    async with two_nodes(tmp_path, server_kind, redis_prefix) as (a, b, proxy):

        async def restart() -> None:
            proxy.point(unused_port())
            await asyncio.to_thread(a.stop)
            await asyncio.to_thread(a.start)  # returns once /healthz says 200
            proxy.point(a.port)

        await cut_off(proxy.ws_url, lambda: b, restart)


async def test_a_killed_node_loses_nothing(
    tmp_path: Path, server_kind: str, redis_prefix: str
) -> None:
    """The client's node is killed (SIGKILL) and the network sends it to the other node:
    it resumes there from Redis and misses nothing."""
    async with two_nodes(tmp_path, server_kind, redis_prefix) as (a, b, proxy):

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
    client's return.

    The network lets the client back only once a broadcast is in the new Redis: 'all' has
    then been sent to since, and only rita's own stream is one that merely restarted (a
    client back first would rightly count 'all' as restarted too)."""
    env = redis_env("wsfanout-client-faults:", redis_server.url)
    publisher = Publisher()
    with Server(tmp_path, env, server=server_kind).running() as node:
        async with Proxy(node.port) as proxy:

            async def restart_redis() -> None:
                proxy.point(unused_port())
                await asyncio.to_thread(redis_server.stop)
                before = len(publisher.acked)  # any later one is in the new Redis
                await asyncio.to_thread(redis_server.start)
                deadline = time.monotonic() + 30
                while len(publisher.acked) == before:
                    assert time.monotonic() < deadline, "nothing published after the restart"
                    await asyncio.sleep(0.02)
                proxy.point(node.port)

            listener, publisher = await cut_off(
                proxy.ws_url, lambda: node, restart_redis, lost=True, publisher=publisher
            )
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
    the client tries it once more (a host app's session behind it might have been renewed),
    is refused, and stops (closed, unauthorized); with get_token it asks for a new one once
    and carries on."""
    with Server(tmp_path, ENV, server=server_kind).running() as node:
        fixed_states: list[tuple[str, str | None]] = []
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
            ("connecting", None),
            ("connected", None),
            ("disconnected", "unauthorized"),
            ("connecting", "retry"),
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
        chat = quick(node.ws_url, username="lisa", password="Lisa-demo")
        await chat.connect()
        listener = Listener(chat)
        status, _ = await asyncio.to_thread(
            http, "POST", node.http_url + "/api/users/lisa/disconnect", {}, admin
        )
        assert status in (200, 204)
        await listener.until(lambda: len(listener.of("welcome")) == 2)
        assert chat.state == "connected"
        status, _ = await asyncio.to_thread(
            http,
            "PUT",
            node.http_url + "/api/users/lisa/password",
            {"password": "new-password!"},
            admin,
        )
        assert status in (200, 204)
        await asyncio.wait_for(listener.task, 15)
        assert (chat.state, chat.reason) == ("closed", "unauthorized")
        assert len(listener.of("welcome")) == 2


# -- many clients at once ----------------------------------------------------------------------

CLIENTS = 200


def histogram(times: list[float], start: float, bucket: float = 0.1) -> dict[int, int]:
    """How many of ``times`` fall in each ``bucket`` seconds from ``start``; printed."""
    counts = collections.Counter(int((t - start) / bucket) for t in times)
    for n in range(max(counts) + 1):
        print(f"{n * bucket:5.1f} s {counts[n]:4d} {'#' * counts[n]}")
    return counts


@pytest.mark.slow(5)
async def test_two_hundred_clients_come_back_spread_out(tmp_path: Path, server_kind: str) -> None:
    """200 clients lose their server at once (a restart, 1001), which stays away until each
    has been refused twice. Their attempts spread over the backoff window rather than
    arriving together, and no wait exceeds its ceiling.

    Asserted on the times the clients chose (when each became ``disconnected``, plus its
    ``retry_in``); the times they really tried are printed beside. Those carry this test's
    own scheduling: 200 clients share one event loop on a loaded machine, and a stall of a
    few hundred ms releases every timer due in it at once, which separate machines would not.

    The fair share: the first attempt after a 1001 is uniform over 1 s, so each 100 ms
    bucket expects 20 of the 200 (binomial, sd 4.2), and more than 40 (4.7 sd) is not
    chance. Over every attempt (1 + 0.5 + 1 + 2 s windows, then the last one to a server
    back up) a simulation of the same backoff puts at most 61 in a bucket on average and 83
    in the worst of 2,000 runs; 100 leaves room for the server's own spread of the 1001s.
    Without jitter, each round of attempts would put all 200 in one bucket."""
    planned: dict[int, list[float]] = collections.defaultdict(list)
    tried: list[float] = []
    waits: dict[int, list[float]] = collections.defaultdict(list)
    failures = collections.Counter[int]()
    counting = False
    refused_enough, all_back = asyncio.Event(), asyncio.Event()

    def on_state(index: int) -> Callable[[str, str | None], None]:
        def changed(state: str, reason: str | None) -> None:
            if not counting:
                return
            now = time.monotonic()
            if state == "connecting":
                tried.append(now)
            elif state == "disconnected":
                wait = clients[index].retry_in
                assert wait is not None
                planned[index].append(now + wait)
                waits[index].append(wait)
                failures[index] += 1
                if len(failures) == CLIENTS and min(failures.values()) > 2:  # the 1001, 2 refusals
                    refused_enough.set()
            elif state == "connected" and all(chat.state == "connected" for chat in clients):
                all_back.set()

        return changed

    with Server(tmp_path, ENV, server=server_kind).running() as node:
        clients = [
            Client(node.ws_url, token=token(f"u{index}"), on_state=on_state(index))
            for index in range(CLIENTS)
        ]
        try:
            await asyncio.gather(*(chat.connect() for chat in clients))
            counting, start = True, time.monotonic()
            await asyncio.to_thread(node.stop)
            await asyncio.wait_for(refused_enough.wait(), 30)
            await asyncio.to_thread(node.start)
            await asyncio.wait_for(all_back.wait(), 30)
        finally:
            await asyncio.gather(*(chat.close() for chat in clients))
    print(f"\n{server_kind}: first attempts after the 1001, per 100 ms (as chosen)")
    assert max(histogram([planned[index][0] for index in range(CLIENTS)], start).values()) <= 40
    print(f"{server_kind}: every attempt after the 1001, per 100 ms (as chosen)")
    every = [t for index in range(CLIENTS) for t in planned[index]]
    assert max(histogram(every, start).values()) <= 100
    print(f"{server_kind}: every attempt after the 1001, per 100 ms (as made, in this process)")
    histogram(tried, start)
    # The ceilings of the waits: 1 s after the 1001, then 0.5, 1, 2, 4 s (full jitter).
    for step, ceiling in enumerate([1.0, 0.5, 1.0, 2.0, 4.0]):
        taken = [waits[index][step] for index in range(CLIENTS) if len(waits[index]) > step]
        if len(taken) < CLIENTS // 2:
            break
        shown = f"{min(taken):.2f} .. {max(taken):.2f} s"
        print(f"wait {step}: {len(taken)} clients, {shown} (ceiling {ceiling} s)")
        assert max(taken) <= ceiling
        assert max(taken) > 0.6 * ceiling  # the whole window is used, not one delay for all


def resumed_all(listener: Listener) -> bool:
    """Whether the client is connected and its connection has resumed (or needed not to):
    it is live, past any replay."""
    welcomes = len(listener.of("welcome"))
    return listener.chat.state == "connected" and len(listener.of("resumed")) == welcomes - 1


async def each(
    listeners: list[Listener], done: Callable[[Listener], bool], timeout: float = 30
) -> None:
    """Wait until ``done(listener)`` holds for every listener."""
    for listener in listeners:
        await listener.until(functools.partial(done, listener), timeout)


@pytest.mark.slow(17)
async def test_two_thousand_messages_reach_two_hundred_clients_through_three_resets(
    tmp_path: Path, server_kind: str
) -> None:
    """2,000 messages published while the network resets every connection three times reach
    each of 200 clients with no gap, no duplicate, in order; each client resumed three times
    and recovered every time."""
    messages, batch = 2000, 20
    texts = [f"n{n}" for n in range(messages)]
    with Server(tmp_path, ENV, server=server_kind).running() as node:
        async with Proxy(node.port) as proxy:
            clients = [Client(proxy.ws_url, token=token(f"c{index}")) for index in range(CLIENTS)]
            await asyncio.gather(*(chat.connect() for chat in clients))
            listeners = [Listener(chat) for chat in clients]
            publisher = Publisher()
            try:
                for start in range(0, messages, batch):
                    if start and start % 500 == 0:  # at 500, 1000 and 1500: every client cut
                        await each(listeners, resumed_all)
                        assert proxy.reset() == CLIENTS
                    assert await publisher.publish_batch(node, texts[start : start + batch])
                await each(listeners, lambda listener: len(listener.texts()) >= messages, 120)
                await each(listeners, resumed_all)
            finally:
                await asyncio.gather(*(listener.stop() for listener in listeners))
    gaps = duplicates = disorder = 0
    for listener in listeners:
        got = listener.texts()
        gaps += len(set(texts) - set(got))
        duplicates += len(got) - len(set(got))
        disorder += got != sorted(got, key=lambda text: int(text[1:]))
        assert [e["recovered"] for e in listener.of("resumed")] == [True, True, True]
    counts = collections.Counter(len(listener.texts()) for listener in listeners)
    replayed = sum(e["missed"] for listener in listeners for e in listener.of("resumed"))
    print(
        f"\n{server_kind}: {CLIENTS} clients, messages each {dict(counts)}, gaps {gaps}, "
        f"duplicates {duplicates}, out of order {disorder}, resets {proxy.resets}, "
        f"replayed on resume {replayed}"
    )
    assert (gaps, duplicates, disorder) == (0, 0, 0)
    assert publisher.acked == texts


async def slow_consumers(node: Server) -> int:
    """The node's count of connections it closed for not reading (1013)."""
    _, answer = await asyncio.to_thread(http, "GET", node.http_url + "/metrics")
    line = next(x for x in answer["_body"].splitlines() if x.startswith("wsfanout_slow_consumer"))
    return int(float(line.split()[-1]))


async def test_an_application_that_stops_reading_holds_the_reader_back(
    tmp_path: Path, server_kind: str
) -> None:
    """The application stops iterating: the client holds ``max_queue`` events and stops
    reading (its memory stays bounded), so the server closes it as a slow consumer (1013).
    When the application reads again the client comes back and resumes: what it gets is
    once and in order, and what the server could not replay is named lost."""
    env = {**ENV, "WSFANOUT_OUTBOX_BYTES": str(64 * 1024)}
    with Server(tmp_path, env, server=server_kind).running() as node:
        chat = quick(node.ws_url, token=token("sam"), max_queue=10)
        await chat.connect()
        publisher = Publisher()
        sent = 0
        while not await slow_consumers(node):  # past the socket buffers and the outbox
            texts = [f"{n:05d} " + "x" * 1000 for n in range(sent, sent + 200)]
            assert await publisher.publish_batch(node, texts)
            sent += len(texts)
        got: list[str] = []
        resumed: dict[str, Any] = {}
        async for event in chat:
            if event["type"] == "message":
                got.append(event["text"])
                if event["text"] == "end":
                    break
            elif event["type"] == "resumed":
                resumed = event
                assert await publisher.publish(node, "end")
        await chat.close()
    lost = not resumed["recovered"]
    missing = exactly_once(got, publisher.acked, lost=lost)
    assert resumed.get("lost", []) == (["all"] if missing else [])
    print(f"held 10 events; published {len(publisher.acked)}, got {len(got)}, lost {len(missing)}")
