"""Stop signals against real servers (issue 24): SIGTERM or SIGINT to the master process, to
the whole process group (what systemd, a container runtime or a terminal's Ctrl-C send), once
or several times in a row, under every way of running wsfanout. Every client gets 1001 and
every process (the master and its workers) exits within a bound."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypercorn import run as hypercorn_master
from hypercorn import utils as hypercorn_utils
from hypercorn.asyncio import run as hypercorn_worker
from uvicorn.config import Config

from tests.server import ROOT, Client, RawClient, Server, http
from wsfanout.servers import ServerReach, hypercorn_signals
from wsfanout.servers.uvicorn import DrainingServer

CLIENTS = 20
EXIT_BOUND = 15.0  # seconds for every process to be gone after the last signal
FLOOD = 0.1  # seconds of signals sent as fast as they go
# hypercorn's master as `wsfanout serve` runs it, serving a bare app (argv: its file, the
# bind), so that a round is short
BARE_MASTER = """\
import sys
from hypercorn.config import Config
from wsfanout.servers.hypercorn_signals import run_master
config = Config()
config.application_path = sys.argv[1] + ":app"
config.bind = [sys.argv[2]]
sys.exit(run_master(config))
"""
BARE_APP = """\
async def app(scope, receive, send):
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
    elif scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
"""


async def _nothing() -> None:
    return None


def one_process(args: dict[str, Any]) -> bool:
    """Whether this form runs one process (uvicorn without workers, hypercorn with none):
    no master apart."""
    workers = args.get("workers", 1)
    return workers == 0 or (args.get("server") == "uvicorn" and workers == 1)


# Each way of running wsfanout: the Server's arguments.
FORMS: dict[str, dict[str, Any]] = {
    "hypercorn": {"server": "hypercorn"},
    "hypercorn-workers-2": {"server": "hypercorn", "workers": 2},
    "hypercorn-workers-0": {"server": "hypercorn", "workers": 0},  # one process, no master
    "serve": {"serve": True},
    "serve-workers-2": {"serve": True, "workers": 2},
    "serve-uvicorn": {"serve": True, "server": "uvicorn"},
    "serve-uvicorn-workers-2": {"serve": True, "server": "uvicorn", "workers": 2},
    "uvicorn": {"server": "uvicorn"},
}
# The signals of each test, to each form: a form that runs one process has no master apart
# (its group is the process). SIGINT takes the path SIGTERM takes, but for uvicorn's "force
# exit" and hypercorn's workers ignoring it: one form of each kind gets a Ctrl-C.
CTRL_C = ("hypercorn", "serve-workers-2", "serve-uvicorn", "serve-uvicorn-workers-2", "uvicorn")
CASES = [
    (form, how)
    for form, args in FORMS.items()
    for how in ("group", "master", "bursts", "ctrl-c")
    if {"master": not one_process(args), "ctrl-c": form in CTRL_C}.get(how, True)
]
# A worker signalled alone: plain hypercorn, hypercorn's master as `wsfanout serve` runs it,
# and uvicorn's supervisor.
REPLACED = ("hypercorn", "serve-workers-2", "serve-uvicorn-workers-2")


@pytest.fixture
def data_dir(tmp_path: Path, demo_db: Path) -> Path:
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    return tmp_path


@contextlib.asynccontextmanager
async def serving(data_dir: Path, form: str) -> AsyncIterator[tuple[Server, list[Client]]]:
    """The server in a process group of its own, with CLIENTS clients connected; the whole
    group killed afterwards, whatever happened."""
    server = Server(data_dir, session=True, **FORMS[form])
    logged = server.log_path.stat().st_size if server.log_path.exists() else 0
    server.start()
    assert server.proc is not None
    group = server.proc.pid
    clients: list[Client] = []
    try:
        await serving_in_every_worker(server, logged)
        cookie = server.login("greg")
        clients = [await Client.open(server.ws_url, cookie) for _ in range(CLIENTS)]
        for client in clients:
            assert (await client.next())["type"] == "welcome"
        yield server, clients
    finally:
        for client in clients:
            client.reader.cancel()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.proc.wait(10)
        server.proc = None


async def serving_in_every_worker(server: Server, logged: int) -> None:
    """Wait until every worker has logged that it serves (the server answered its health
    check from one: another may still be importing, and a signal would kill it there)."""
    line = b"Running on" if server.server == "hypercorn" else b"Application startup complete"
    deadline = time.monotonic() + 30
    while server.log_path.read_bytes()[logged:].count(line) < max(server.workers, 1):
        assert time.monotonic() < deadline, server.log_path.read_text()
        await asyncio.sleep(0.05)


def send(server: Server, how: str) -> None:
    """Signal the server: ``group`` or ``master`` once, ``bursts`` (three to each within
    50 ms), ``ctrl-c`` (SIGINT to the group twice, as a user pressing it again), or
    ``flood`` (to both, as fast as they go, for FLOOD seconds)."""
    assert server.proc is not None
    master = server.proc.pid
    if how == "group":
        os.killpg(master, signal.SIGTERM)
    elif how == "master":
        os.kill(master, signal.SIGTERM)
    elif how == "ctrl-c":
        os.killpg(master, signal.SIGINT)
        time.sleep(0.02)
        os.killpg(master, signal.SIGINT)
    elif how == "bursts":
        for i in range(6):
            (os.kill if i % 2 else os.killpg)(master, signal.SIGTERM)
            time.sleep(0.008)
    else:
        assert how == "flood"
        end = time.monotonic() + FLOOD
        while time.monotonic() < end:
            os.kill(master, signal.SIGTERM)
            os.killpg(master, signal.SIGTERM)


async def stopped(server: Server, clients: list[Client], pids: list[int]) -> int:
    """Every client closed with 1001 and every process gone, within EXIT_BOUND seconds of
    now; the master's exit status."""
    assert server.proc is not None
    deadline = time.monotonic() + EXIT_BOUND
    for client in clients:
        await asyncio.wait_for(asyncio.shield(client.reader), max(deadline - time.monotonic(), 0))
    codes = [client.conn.close_code for client in clients]
    assert codes == [1001] * len(clients)
    status = await asyncio.to_thread(server.proc.wait, max(deadline - time.monotonic(), 0))
    while not all(map(gone, pids)):
        assert time.monotonic() < deadline, [pid for pid in pids if not gone(pid)]
        await asyncio.sleep(0.05)
    return status


def is_worker(pid: int) -> bool:
    """A worker process the master spawned (not its resource tracker)."""
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def gone(pid: int) -> bool:
    """Whether the process has exited (a zombie not yet reaped has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def test_both_signal_reaches_work_with_the_installed_hypercorn() -> None:
    """The workers' and the master's reaches find what they need in this hypercorn."""
    assert hypercorn_signals.check() == {}
    assert hypercorn_signals.check_master() == ""


def test_a_worker_wait_that_is_not_ours_warns_at_start(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """hypercorn's worker waits for its master elsewhere now: one warning says a worker
    sent SIGTERM dies without closing its sockets; the other reaches work."""
    monkeypatch.setattr(hypercorn_worker, "raise_shutdown", hypercorn_utils.raise_shutdown)
    reach = ServerReach(compression=False, on_stopping=_nothing)
    reach.start()
    assert (reach.can_decline, reach.can_watch, reach.can_stop_pings) == (True, True, True)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "dies at once, without closing its sockets" in warning


def test_a_changed_master_runs_as_hypercorn_runs_it_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """hypercorn's master no longer installs its handler as run_master expects: it runs
    untouched, and one warning says a second signal may hang it."""
    ran: list[object] = []

    def run(config: object) -> int:
        ran.append(config)
        return 0

    monkeypatch.setattr(hypercorn_master, "run", run)
    assert "no longer installs" in hypercorn_signals.check_master()
    config = object()
    assert hypercorn_signals.run_master(config) == 0
    assert ran == [config]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "can hang for good on a second signal" in warning


def test_a_repeated_sigint_does_not_skip_the_apps_shutdown_under_wsfanout_serve() -> None:
    """uvicorn takes a second SIGINT as "exit now, skip the app's lifespan shutdown";
    ``wsfanout serve``'s server takes it as the same stop."""
    server = DrainingServer(Config(app=_nothing))
    for _ in range(2):
        server.handle_exit(signal.SIGINT, None)
    assert server.should_exit and not server.force_exit


@pytest.mark.parametrize(("form", "how"), CASES)
async def test_every_client_gets_1001_and_every_process_exits(
    data_dir: Path, form: str, how: str
) -> None:
    """Stop signals, once or in bursts, to the master or its whole process group: 1001 for
    every client, every process gone within the bound, exit status as for one SIGTERM."""
    async with serving(data_dir, form) as (server, clients):
        pids = server.pids()
        send(server, how)
        status = await stopped(server, clients, pids)
        assert status in (server.stopped_by_sigterm if how != "ctrl-c" else (0,))
    log = server.log_path.read_text()
    assert "Traceback" not in log, log


@pytest.mark.parametrize("form", REPLACED)
async def test_a_worker_sent_sigterm_drains_and_is_replaced(data_dir: Path, form: str) -> None:
    """SIGTERM to the workers alone (not their master): each closes its sockets with 1001
    and exits, the master starts new ones, and a SIGTERM to the master then stops it."""
    async with serving(data_dir, form) as (server, clients):
        workers = [pid for pid in server.pids() if is_worker(pid)]
        assert len(workers) == server.workers
        logged = server.log_path.stat().st_size
        for pid in workers:
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + EXIT_BOUND
        for client in clients:
            await asyncio.wait_for(client.reader, max(deadline - time.monotonic(), 0))
        assert [client.conn.close_code for client in clients] == [1001] * len(clients)
        while not all(map(gone, workers)):
            assert time.monotonic() < deadline, [pid for pid in workers if not gone(pid)]
            await asyncio.sleep(0.05)
        await serving_in_every_worker(server, logged)  # the new ones
        cookie = server.login("lisa")  # served by the new workers
        replaced = await Client.open(server.ws_url, cookie)
        assert (await replaced.next())["type"] == "welcome"
        pids = server.pids()
        send(server, "master")
        assert await stopped(server, [replaced], pids) in server.stopped_by_sigterm


@pytest.mark.slow(8)
async def test_signal_floods_never_hang_a_stop(data_dir: Path) -> None:
    """Round after round, SIGTERM floods `wsfanout serve`'s master and its group while it
    handles the first: hypercorn's own master handler, run again inside itself, waited
    forever on the lock its first run held, and every worker with it (issue 24: one round
    in three hung). Every client still gets 1001 and every process exits."""
    for _ in range(3):
        async with serving(data_dir, "serve-workers-2") as (server, clients):
            pids = server.pids()
            send(server, "flood")
            status = await stopped(server, clients, pids)
            assert status in server.stopped_by_sigterm


@pytest.mark.slow(11)
def test_the_master_wsfanout_serve_runs_never_hangs_in_a_flood(tmp_path: Path) -> None:
    """hypercorn's master as ``wsfanout serve`` runs it, flooded with SIGTERM round after
    round: it always stops, with 0. hypercorn's own master hung in two rounds of five."""
    app = tmp_path / "bare.py"
    app.write_text(BARE_APP)
    for _ in range(8):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen(64)
            port = sock.getsockname()[1]
            with (tmp_path / "master.log").open("ab") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-c", BARE_MASTER, str(app), f"fd://{sock.fileno()}"],
                    pass_fds=[sock.fileno()],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=ROOT,
                    start_new_session=True,
                )
        try:
            deadline = time.monotonic() + 30
            while True:
                assert proc.poll() is None and time.monotonic() < deadline
                with contextlib.suppress(OSError):
                    if http("GET", f"http://127.0.0.1:{port}/")[0] == 200:
                        break
                time.sleep(0.05)
            end = time.monotonic() + FLOOD
            while time.monotonic() < end:
                os.kill(proc.pid, signal.SIGTERM)
            assert proc.wait(EXIT_BOUND) == 0
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_clients_that_never_answer_the_close_end_before_the_server_cancels_them(
    data_dir: Path, server_kind: str
) -> None:
    """SIGTERM while 20 websockets never read (nor answer the close): each ends before
    the server would cancel its connection (hypercorn's graceful timeout, 3 s unless told,
    is shorter than WSFANOUT_CLOSE_TIMEOUT's 5 s; under Python 3.11 and 3.12 asyncio logs a
    traceback for each connection hypercorn cancels), and the server exits within the bound."""
    with Server(data_dir, server=server_kind).running() as server:
        cookie = server.login("greg")
        silent = [RawClient(server.port, cookie, rcvbuf=4096) for _ in range(CLIENTS)]
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(EXIT_BOUND) in server.stopped_by_sigterm
        for raw in silent:
            raw.close()
    log = server.log_path.read_text()
    assert "Traceback" not in log, log
