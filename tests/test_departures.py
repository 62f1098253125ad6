"""Clients that leave while the server does not read them, against real hypercorn and uvicorn:
their connections are let go at once and quietly (no error, no traceback in the log).

A connection stops reading while its outbox is over half full (ws.py); a client that asks for
more than it reads gets there, and its leaving is then known to the server (its transport's
``connection_lost``) but not yet to the app, whose disconnect waits behind what it does not read.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from tests.server import Client, RawClient, Server

LEAVERS = 20  # one user's sockets, and that user's cap: every seat must come back
ASKED = 200  # history requests each sends, and never reads the answers
HISTORY = 8  # messages of 60 KB in 'all': each answer holds 256 KiB (a quarter of an outbox)
SERVERS = [("hypercorn", False), ("hypercorn", True), ("uvicorn", False), ("uvicorn", True)]
IDS = ["hypercorn", "hypercorn-serve", "uvicorn", "uvicorn-serve"]
ASK = '{"type":"history","stream":"all"}'
ENV = {
    "WSFANOUT_RATE_LIMIT": "0",
    "WSFANOUT_MAX_CONNECTIONS_PER_USER": str(LEAVERS),
    "WSFANOUT_SEND_TIMEOUT": "60",  # what held them before: far beyond the waits here
}


@pytest.fixture
def data_dir(tmp_path: Path, demo_db: Path) -> Path:
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    return tmp_path


def masked(text: str) -> bytes:
    """A client's text frame (under 64 KiB), masked as a client must."""
    payload, mask = text.encode(), os.urandom(4)
    size = len(payload)
    head = (
        bytes([0x81, 0x80 | size]) if size < 126 else bytes([0x81, 0xFE]) + struct.pack("!H", size)
    )
    return head + mask + bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))


def stuck_writing(server: Server, least: int = 8192) -> int:
    """Server-side connections on the server's port with at least ``least`` bytes their
    client has not taken (the kernel's send queue: /proc/net/tcp's tx_queue)."""
    port, count = f":{server.port:04X}", 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(port) and int(fields[4].split(":")[0], 16) >= least:
            count += 1
    return count


async def until(done: object, what: str, timeout: float = 10) -> None:
    """Wait (bounded) until ``done()`` is true; fail naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def seats_back(server: Server, cookie: str) -> None:
    """Wait (bounded) until the user's every seat is free again: as many handshakes as its
    cap succeed at once (a seat still held: 429)."""
    deadline = time.monotonic() + 10
    while True:
        opened: list[ClientConnection] = []
        status = 0
        try:
            for _ in range(LEAVERS):
                opened.append(await connect(server.ws_url, additional_headers={"cookie": cookie}))
        except InvalidStatus as refused:
            status = refused.response.status_code
        finally:
            for conn in opened:
                await conn.close()
        if not status:
            return
        assert status == 429, status
        assert time.monotonic() < deadline, "seats of gone clients still held"
        await asyncio.sleep(0.05)


async def fill_history(server: Server) -> Client:
    """Fill 'all' with large messages, as greg (who stays connected and reads); greg."""
    greg = await Client.open(server.ws_url, server.login("greg"))
    assert (await greg.next())["type"] == "welcome"
    for n in range(HISTORY):
        await greg.send({"type": "broadcast", "text": f"{n}" + "h" * 60_000})
    for _ in range(HISTORY):
        await greg.next_of("message", timeout=30)
    return greg


async def let_go(server: Server, cookie: str) -> None:
    """Wait (bounded) until only greg's connection is counted and anny's seats are free."""
    await until(
        lambda: server.metric("wsfanout_connections") == 1,
        "connections of gone clients still counted",
    )
    await seats_back(server, cookie)


@pytest.mark.slow(4)
@pytest.mark.parametrize(("server_kind", "serve"), SERVERS, ids=IDS)
async def test_clients_that_leave_while_not_read_are_let_go_at_once(
    data_dir: Path, server_kind: str, serve: bool
) -> None:
    """20 sockets of one user ask for far more history than they read, until the server stops
    reading them, then leave: their connections are gone from /metrics and their seats
    free within seconds (not after the send timeout), and the log holds no error."""
    with Server(data_dir, ENV, server=server_kind, serve=serve).running() as server:
        greg = await fill_history(server)
        cookie = server.login("anny")
        leavers = [RawClient(server.port, cookie, rcvbuf=4096) for _ in range(LEAVERS)]
        ask = masked(ASK) * ASKED
        for raw in leavers:
            raw.sock.sendall(ask)
        await until(lambda: stuck_writing(server) == LEAVERS, "the server never got stuck")
        for raw in leavers:
            raw.close()
        await let_go(server, cookie)
        await greg.close()
    log = server.log_path.read_text()
    assert "Traceback" not in log, log
    assert "ERROR" not in log, log


@pytest.mark.slow(3)
@pytest.mark.parametrize(("server_kind", "serve"), SERVERS, ids=IDS)
async def test_readers_that_ask_more_than_they_read_leave_quietly(
    data_dir: Path, server_kind: str, serve: bool
) -> None:
    """20 websockets of one user read, but ask for history far faster than they can read it,
    then stop and close: a close the server, no longer reading them, does not see before they
    drop the connection. They are let go within seconds, and neither their leaving nor the
    server's stop (SIGTERM) afterwards logs an error or a traceback."""
    with Server(data_dir, ENV, server=server_kind, serve=serve).running() as server:
        greg = await fill_history(server)
        cookie = server.login("anny")

        async def ask_read_and_leave() -> None:
            conn = await connect(
                server.ws_url,
                additional_headers={"cookie": cookie},
                max_size=None,
                close_timeout=0.5,
            )
            for _ in range(ASKED):
                await conn.send(ASK)
            got = 0
            while got < 1 << 20:
                got += len(await conn.recv())
            await conn.close()  # unanswered: the connection is dropped after close_timeout

        await asyncio.gather(*(ask_read_and_leave() for _ in range(LEAVERS)))
        await let_go(server, cookie)
        await greg.close()
    log = server.log_path.read_text()
    assert "Traceback" not in log, log
    assert "ERROR" not in log, log
