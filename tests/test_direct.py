"""A frame written without a coroutine (the servers' ``write_now``, outbox.py's
``DirectWriter``): the bytes are the frame a server's own send would write, built once per
message, and under hypercorn a real broadcast goes out that way (in this process, so that
the calls can be counted) and arrives."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import pytest
from wsproto.frame_protocol import FrameProtocol

from tests.conftest import login
from tests.inprocess import hypercorn_serving, uvicorn_serving
from tests.server import Client
from wsfanout import Settings
from wsfanout.servers.frames import frame_of


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70001])
def test_a_frame_is_the_one_wsproto_writes(size: int) -> None:
    """Each length encoding (7 bits, 16, 64), counted in bytes: ASCII and not."""
    for text in ("a" * size, "é" * (size // 2) + "a" * (size % 2)):
        assert len(text.encode()) == size
        wsproto = FrameProtocol(client=False, extensions=[]).send_data(text, fin=True)
        assert frame_of({"type": "websocket.send", "text": text}) == bytes(wsproto)


def test_the_same_message_is_built_once() -> None:
    message = {"type": "websocket.send", "text": "hello"}
    first = frame_of(message)
    assert first is not None and frame_of(message) is first  # the same bytes object
    assert frame_of({"type": "websocket.send", "text": "hello"}) is not first  # built anew
    assert frame_of({"type": "websocket.send", "bytes": b"x"}) is None  # not text: send()


async def test_hypercorn_sends_a_broadcast_without_a_coroutine(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hypercorn.protocol.ws_stream import WSStream

    from wsfanout.servers import hypercorn_direct

    assert hypercorn_direct.check() == ""
    written: list[bool] = []
    original = WSStream.write_now  # type: ignore[attr-defined]

    def counted(stream: Any, message: Any) -> bool:
        done: bool = original(stream, message)
        written.append(done)
        return done

    monkeypatch.setattr(WSStream, "write_now", counted)
    clients: list[Client] = []
    async with hypercorn_serving(settings) as (app, port):
        try:
            cookie = await login(app, "mike")
            url = f"ws://127.0.0.1:{port}/"
            origin = f"http://127.0.0.1:{port}"
            clients = [await Client.open(url, cookie, origin=origin) for _ in range(3)]
            for client in clients:
                assert (await client.next())["type"] == "welcome"
            assert written == [True] * len(clients)  # each welcome, written at once
            await clients[0].send({"type": "broadcast", "text": "hello", "id": "b"})
            for client in clients:
                assert (await client.next_of("message"))["text"] == "hello"
        finally:
            for client in clients:
                with contextlib.suppress(Exception):
                    await client.close()
    assert written.count(True) >= 2 * len(clients), written


async def test_uvicorn_writes_the_welcome_without_a_coroutine(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The welcome goes out as the outbox's frames do (``write_now``), not through
    uvicorn's ``send()`` and a timer."""
    from wsfanout.servers.uvicorn_sansio import ExplainingSansIOProtocol

    written: list[bool] = []
    original = ExplainingSansIOProtocol.write_now

    def counted(protocol: Any, message: Any) -> bool:
        done: bool = original(protocol, message)
        written.append(done)
        return done

    monkeypatch.setattr(ExplainingSansIOProtocol, "write_now", counted)
    async with uvicorn_serving(settings) as (app, port):
        client = await Client.open(f"ws://127.0.0.1:{port}/", await login(app, "mike"))
        try:
            assert (await client.next())["type"] == "welcome"
            assert written == [True]
        finally:
            with contextlib.suppress(Exception):
                await client.close()


@pytest.mark.parametrize("compression", [False, True])
async def test_uvicorn_sends_the_101_and_the_welcome_in_one_write(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, compression: bool
) -> None:
    """One write (one TCP segment) for the handshake's answer and the welcome, on the first
    connection and on those after it; also where the welcome goes through uvicorn's own
    ``send`` (deflate negotiated: the client offers it). A refused handshake is answered as
    before."""
    import asyncio.selector_events

    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    transport_class: Any = getattr(asyncio.selector_events, "_SelectorSocketTransport")  # noqa: B009
    writes: list[bytes] = []
    original = transport_class.write

    def recorded(transport: Any, data: bytes) -> None:
        writes.append(bytes(data))
        original(transport, data)

    monkeypatch.setattr(transport_class, "write", recorded)
    settings = dataclasses.replace(settings, compression=compression)
    async with uvicorn_serving(settings) as (app, port):
        for user in ("mike", "lisa"):
            writes.clear()
            client = await Client.open(f"ws://127.0.0.1:{port}/", await login(app, user))
            try:
                assert (await client.next())["type"] == "welcome"
                response = client.conn.response
                assert response is not None
                deflate = response.headers.get("Sec-WebSocket-Extensions", "")
                assert deflate.startswith("permessage-deflate") == compression
            finally:
                with contextlib.suppress(Exception):
                    await client.close()
            answers = [w for w in writes if w.startswith(b"HTTP/1.1 101")]
            assert len(answers) == 1, writes
            welcome = answers[0].partition(b"\r\n\r\n")[2]
            assert welcome, answers[0]  # the frame is in the same write
            if not compression:
                assert b'"type":"welcome"' in welcome, welcome
        writes.clear()
        with pytest.raises(InvalidStatus) as refused:
            await connect(f"ws://127.0.0.1:{port}/")
        assert refused.value.response.status_code == 403
        assert refused.value.response.body == b'{"error":"log in first"}'
        assert not [w for w in writes if w.startswith(b"HTTP/1.1 101")]
