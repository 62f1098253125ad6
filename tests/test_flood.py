"""A frame flood against real hypercorn and uvicorn: one user's sockets that never read send
one-byte frames as fast as the kernel takes them. The flooding sockets are cut off within
seconds, the server's memory and CPU come back, and another user's round trips go on.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import select
import shutil
import statistics
import time
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

import pytest

from tests.server import Client, RawClient, Server

MIB = 1 << 20
FLOODERS = 100  # sockets of one user: the per-user cap
FLOOD_SECONDS = 2.0
SLOW_RTT = 0.15  # seconds: a round trip held this long by the flood, counted in the figure
# A masked one-byte text frame holding "{" (bad JSON), as a client must send it.
FRAME = bytes([0x81, 0x81, 1, 2, 3, 4, ord("{") ^ 1])


@pytest.fixture
def data_dir(tmp_path: Path, demo_db: Path) -> Path:
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    return tmp_path


def flood(sockets: list[int], stop: EventType) -> None:
    """Send frames on every socket until told to stop (in a process of its own, as an
    attacker would: the test's own loop must not compete with it for one interpreter)."""
    import socket

    chunk = FRAME * 9000
    alive = {socket.socket(fileno=fd) for fd in sockets}
    for sock in alive:
        sock.setblocking(False)
    while alive and not stop.is_set():
        _, ready, _ = select.select([], list(alive), [], 0.1)
        for sock in ready:
            try:
                sock.send(chunk)
            except BlockingIOError:
                pass
            except OSError:  # reset by the server
                alive.discard(sock)


def cpu_seconds(server: Server) -> float:
    """The CPU time the server's processes have used so far."""
    ticks = 0
    for pid in server.pids():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


@pytest.mark.slow(10)
@pytest.mark.parametrize(
    ("server_kind", "serve"),
    [("hypercorn", False), ("uvicorn", False), ("uvicorn", True)],
    ids=["hypercorn", "uvicorn", "uvicorn-serve"],
)
async def test_a_tiny_frame_flood_is_cut_off(data_dir: Path, server_kind: str, serve: bool) -> None:
    """100 never-reading sockets of one user flood one-byte frames for 2 s: all are closed
    (1008, then reset) within seconds of the flood's start, counted in /metrics; the
    server's CPU is back to idle, its memory grew by at most 64 MiB, no traceback is
    logged, and another user's direct messages kept going round."""
    env = {"WSFANOUT_CLOSE_TIMEOUT": "1"}
    with Server(data_dir, env, server=server_kind, serve=serve).running() as server:
        greg = await Client.open(server.ws_url, server.login("greg"))
        mike = await Client.open(server.ws_url, server.login("mike"))
        assert (await greg.next())["type"] == (await mike.next())["type"] == "welcome"
        cookie = server.login("anny")
        flooders = [RawClient(server.port, cookie, rcvbuf=4096) for _ in range(FLOODERS)]
        try:
            start_rss = server.rss()
            stop = multiprocessing.get_context("fork").Event()
            attacker = multiprocessing.get_context("fork").Process(
                target=flood, args=([raw.sock.fileno() for raw in flooders], stop), daemon=True
            )
            attacker.start()
            started = time.monotonic()
            peak, rtts, closed_at, n = start_rss, [], None, 0
            try:
                while time.monotonic() - started < FLOOD_SECONDS:
                    n += 1
                    sent = time.monotonic()
                    await greg.send({"type": "direct", "user_name": "mike", "text": f"rtt {n}"})
                    while (await mike.next_of("message", timeout=30))["text"] != f"rtt {n}":
                        pass
                    rtts.append(time.monotonic() - sent)
                    peak = max(peak, server.rss())
                    if closed_at is None and server.established() <= 2:
                        closed_at = time.monotonic() - started
                    await asyncio.sleep(0.02)
            finally:
                stop.set()
                attacker.join(10)
            # The target is 5 s; the bound leaves room for a shared, loaded machine (before,
            # hypercorn held every flooding socket for over a minute, uvicorn for 40 s).
            while closed_at is None and time.monotonic() - started < 10:
                peak = max(peak, server.rss())
                if server.established() <= 2:
                    closed_at = time.monotonic() - started
                await asyncio.sleep(0.05)
            assert closed_at is not None, f"{server.established() - 2} flooding sockets still open"
            assert server.metric("wsfanout_flood_disconnects_total") == FLOODERS
            # Idle again: 2 s after the last flooding socket closed, a second costs little CPU.
            await asyncio.sleep(2)
            before = cpu_seconds(server)
            await asyncio.sleep(1)
            busy = cpu_seconds(server) - before
            assert busy < 0.3, f"the server used {busy:.2f} s of CPU in 1 s after the flood"
            assert peak - start_rss <= 64 * MIB, f"+{(peak - start_rss) / MIB:.0f} MiB"
            # Generous for a shared machine: before, under uvicorn, one round trip took 13 s.
            assert max(rtts) < 3.0, [round(rtt, 3) for rtt in rtts]
            # No bound on the slow ones: with floods at once on two shared cores (-n 3 or more),
            # two round trips of 0.2-0.4 s happen after the fix too (before: 0.3-1 s). The
            # slow lane's bound is test_ws.py's (frames per turn, counted in-process).
            print(
                f"figure flood {server_kind}: {FLOODERS} sockets closed {closed_at:.2f} s after "
                f"the flood began; peak +{(peak - start_rss) / MIB:.1f} MiB; round trips "
                f"{len(rtts)}, median {statistics.median(rtts) * 1000:.1f} ms, "
                f"p99 {sorted(rtts)[int(0.99 * len(rtts))] * 1000:.1f} ms, "
                f"max {max(rtts) * 1000:.1f} ms, over {SLOW_RTT * 1000:.0f} ms "
                f"{sum(rtt > SLOW_RTT for rtt in rtts)}"
            )
        finally:  # also when an assertion failed: 100 sockets left to the garbage collector
            # would fail whichever test of this worker comes next (ResourceWarning)
            for raw in flooders:
                raw.close()
            await greg.close()
            await mike.close()
    log = server.log_path.read_text()
    assert "Traceback" not in log, log
    assert log.count("closing anny's connection: ") == FLOODERS
