"""A closed connection is freed as it closes, by reference counting, not left in cycles for
the collector: with tens of thousands held and the collector tuned (collector.py), its next
full pass may be minutes away, and a churning server's memory would grow until then (the
soak, docs/soak.md).

The servers run with the collector off (tests/gcprobe/sitecustomize.py); after connections
have closed, one full collection reports every object it found in a cycle: there must be
none, under hypercorn, plain uvicorn and ``wsfanout serve --server uvicorn``, for clients
that close, clients that reset, and clients the server closes (wsfanout's objects, the
servers' protocols, and asyncio's own: a reset's error and its traceback, a selector
transport's read callback, which servers/hypercorn_tcp.py lets go).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import struct
import time
from pathlib import Path

import pytest

from tests.server import ROOT, Client, Server

PROBE = Path(__file__).parent / "gcprobe"
CONNECTIONS = 6  # two close, two reset, two are closed by the server


def garbage(server: Server) -> dict[str, int]:
    """What one full collection in each of the server's processes finds in cycles."""
    reports = server.data_dir.glob("garbage-*.json")
    for old in reports:
        old.unlink()
    pids = server.pids()
    for pid in pids:
        os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    paths = [server.data_dir / f"garbage-{pid}.json" for pid in pids]
    while not all(path.exists() for path in paths):
        assert time.monotonic() < deadline, "no garbage report from the server"
        time.sleep(0.05)
    found: dict[str, int] = {}
    for path in paths:
        for kind, count in json.loads(path.read_text()).items():
            found[kind] = found.get(kind, 0) + count
    return found


async def connect_and_leave(server: Server, cookie: str) -> None:
    clients = [await Client.open(server.ws_url, cookie) for _ in range(CONNECTIONS)]
    for client in clients:
        assert (await client.next())["type"] == "welcome"
    for client in clients[:2]:
        await client.close()
    for client in clients[2:4]:  # a reset: no close frame
        sock = client.conn.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.conn.transport.abort()
        client.reader.cancel()
    for client in clients[4:]:  # over the frame limit: the server closes it (1009)
        await client.conn.send("x" * 200_000)
        assert (await client.next_of("error"))["code"] == "too_large"
        await asyncio.wait_for(client.reader, 10)
        assert client.conn.close_code == 1009


@pytest.mark.parametrize("mode", ["hypercorn", "uvicorn", "serve-uvicorn"])
def test_a_closed_connection_leaves_no_cycle(tmp_path: Path, demo_db: Path, mode: str) -> None:
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    env = {"PYTHONPATH": os.pathsep.join([str(PROBE), str(ROOT)])}
    server = Server(tmp_path, env, server=mode.rpartition("-")[2], serve=mode.startswith("serve"))
    with server.running():
        cookie = server.login("mike")
        garbage(server)  # start-up's cycles (argparse, logging's configuration), freed
        asyncio.run(connect_and_leave(server, cookie))
        deadline = time.monotonic() + 10
        while server.metric("wsfanout_connections") > 0 or server.established() > 0:
            assert time.monotonic() < deadline, "the connections did not end"
            time.sleep(0.1)
        time.sleep(0.5)  # hypercorn's connection task ends after the app's
        after = garbage(server)
    assert after == {}, after
