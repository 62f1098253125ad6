"""servers/lean.py: asyncio's queue and event work as before with ``Few`` (a list) in place
of their deques, and a hypercorn connection wsfanout accepts has them in place; a uvicorn
connection lets go of its handshake's headers (uvicorn_sansio.py)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
from typing import Any

import pytest

from tests.conftest import login
from tests.inprocess import hypercorn_serving, uvicorn_serving
from tests.server import Client
from wsfanout import Settings
from wsfanout.servers import lean
from wsfanout.servers.lean import Few
from wsfanout.servers.uvicorn_sansio import ExplainingSansIOProtocol


def lightened_queue(size: int) -> asyncio.Queue[int]:
    queue: asyncio.Queue[int] = asyncio.Queue(size)
    for name in ("_queue", "_getters", "_putters"):
        lean._swap(queue, name)
        assert type(getattr(queue, name)) is Few
    return queue


async def test_a_queue_keeps_its_order_its_waiters_and_its_bound() -> None:
    queue = lightened_queue(2)
    getters = [asyncio.ensure_future(queue.get()) for _ in range(3)]
    await asyncio.sleep(0)
    getters[1].cancel()  # a cancelled getter leaves the line
    await asyncio.sleep(0)
    queue.put_nowait(1)
    queue.put_nowait(2)
    assert [await getters[0], await getters[2]] == [1, 2]
    for n in range(2):
        queue.put_nowait(n + 3)
    putter = asyncio.ensure_future(queue.put(5))  # full: waits
    await asyncio.sleep(0)
    assert not putter.done()
    assert queue.get_nowait() == 3
    await asyncio.wait_for(putter, 1)
    assert [queue.get_nowait(), queue.get_nowait()] == [4, 5]
    assert queue.empty()


async def test_an_event_wakes_its_waiters_and_forgets_cancelled_ones() -> None:
    event = asyncio.Event()
    lean._swap(event, "_waiters")
    waiters = [asyncio.ensure_future(event.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    waiters[0].cancel()
    await asyncio.sleep(0)
    assert len(event._waiters) == 2
    event.set()
    assert await asyncio.wait_for(asyncio.gather(*waiters[1:]), 1) == [True, True]


def test_only_a_deque_is_swapped() -> None:
    class Owner:
        def __init__(self) -> None:
            self.deque: Any = collections.deque([1, 2])
            self.other: Any = [1]

    owner = Owner()
    lean._swap(owner, "deque")
    lean._swap(owner, "other")
    lean._swap(owner, "missing")
    assert type(owner.deque) is Few and owner.deque == [1, 2] and owner.deque.popleft() == 1
    assert type(owner.other) is list


async def test_a_hypercorn_connection_has_light_queues(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every deque lean.py names is a Few once wsfanout has accepted the connection, its
    handshake the shared ACCEPTED, and the connection works (welcome, a broadcast, an ack)."""
    seen: list[tuple[Any, Any]] = []
    original = lean.lighten

    def recorded(stream: Any, connection: Any) -> Any:
        seen.append((stream, connection))
        return original(stream, connection)

    monkeypatch.setattr(lean, "lighten", recorded)
    async with hypercorn_serving(settings) as (app, port):
        client = await Client.open(f"ws://127.0.0.1:{port}/", await login(app, "mike"))
        try:
            assert (await client.next())["type"] == "welcome"
            await client.send({"type": "broadcast", "text": "light", "id": "1"})
            assert (await client.next_of("message"))["text"] == "light"
            assert (await client.next_of("ack"))["id"] == "1"
            [(stream, connection)] = seen
            queue = stream.app_put.__self__
            protocol = stream.send.__self__
            lists = [
                queue._queue,
                queue._getters,
                queue._putters,
                queue._finished._waiters,
                protocol.can_read._event._waiters,
                protocol.send.__self__.writer._protocol._drain_waiters,
                connection._events,
            ]
            assert [type(found) for found in lists] == [Few] * len(lists)
            assert stream.handshake is lean.ACCEPTED  # and the parsed handshake is let go
            server = protocol.send.__self__  # and the request body watcher (HTTP/1.1)
            assert "read" not in vars(server.reader)
        finally:
            with contextlib.suppress(Exception):
                await client.close()


async def test_a_uvicorn_connection_lets_its_handshake_go(settings: Settings) -> None:
    """Once accepted, a uvicorn connection keeps none of its handshake's headers: not as
    uvicorn's request, nor in websockets' parser (which parsed the request itself before
    ``upgrade``, and kept it as a local of its generator); and it works on (a broadcast, an
    ack)."""
    async with uvicorn_serving(settings) as (app, port):
        browser = {"user-agent": "Chrome", "accept-language": "en", "pragma": "no-cache"}
        cookie = await login(app, "mike")
        client = await Client.open(f"ws://127.0.0.1:{port}/", cookie, **browser)
        try:
            assert (await client.next())["type"] == "welcome"
            [protocol] = [o for o in gc.get_objects() if type(o) is ExplainingSansIOProtocol]
            assert protocol.request is None and protocol.response is None
            # Handed over parsed (uvicorn_sansio.py's ``upgrade``): websockets' parser is its
            # frame parser from the start, holding no request (the bytes way's is emptied).
            parser = protocol.conn.parser.gi_frame
            assert parser.f_code.co_name == "parse" and "request" not in parser.f_locals
            await client.send({"type": "broadcast", "text": "light", "id": "1"})
            assert (await client.next_of("message"))["text"] == "light"
            assert (await client.next_of("ack"))["id"] == "1"
        finally:
            with contextlib.suppress(Exception):
                await client.close()
