"""The scale scenario of bench/run.py (``just bench --only scale``): one machine, 1, 2 and 4
workers sharing fan-out through Redis, 19,000 browser-like connections per worker, then one
broadcast to all of them.

Each system is served with ``--workers W`` as bench/run.py's ``server_command`` launches it
(wsfanout under hypercorn and under uvicorn's ``wsfanout serve``; the bare app under both),
with Redis under a key prefix of the run's own, deleted after it, and not pinned to a core:
the workers and the load generators share the machine's cores, as they would in production on
one box. Its connections come from several load generators (bench/loadgen.mjs, each holding
at most ``PER_LOADGEN`` sockets: a process here may hold 20,000 descriptors) started together,
each connecting from every address of ``SOURCES`` in turn, so ephemeral ports never run short.

Then the bench posts one broadcast to ``/api/publish`` (a backend's publish) and each load
generator notes when each of its connections had it, on the clock Python's ``time.monotonic``
and Node's ``process.hrtime`` both read (CLOCK_MONOTONIC, one machine): the latencies of every
connection of every load generator are one distribution, and its maximum is when the last
connection had the broadcast. The bare app has no cross-worker fan-out: its rows show
handshakes and memory only.

A process here may hold 20,000 descriptors, and a worker that had none left for a new
connection would stop accepting (asyncio) or accept and drop it (uvloop). So each worker
holds at most ``SEATS`` websockets (``WSFANOUT_MAX_CONNECTIONS``) and refuses the next with
503 while it still has descriptors to answer with; the load generators try a refused
handshake again (``RETRIES``), and the table counts the refusals. How the connections spread
over the workers (each worker's sockets, from /proc) is in every run's results.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import select
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]
from bench.run import (  # noqa: E402 - the root first
    BASELINE,
    BENCH,
    REDIS_URL,
    WSFANOUT_ENV,
    Server,
    System,
    Users,
    cpu_seconds,
    family,
    fmt,
    forget_redis_keys,
    median,
    rss_kib,
)

PER_WORKER = 19_000  # connections per worker in the full run (76,000 at 4 workers)
BARE_PER_WORKER = 17_000  # the bare app on several workers: see asked()
PER_LOADGEN = 19_000  # sockets per load generator: under its 20,000 descriptors
WORKERS = (1, 2, 4)
REPS = 1  # a full run takes about 15 minutes: one repetition unless --reps says more
QUICK_PER_WORKER = 200
QUICK_WORKERS = (1, 2)
# Websockets a worker holds before it refuses with 503: under its 20,000 descriptors, with
# room for its own (Redis, the database, the listening socket) and for answering refusals.
SEATS = int(os.environ.get("BENCH_SCALE_SEATS", "19500"))
RETRIES = 50  # a refused handshake is tried again, after up to RETRY_MS ms
RETRY_MS = 200
CONCURRENCY = 200  # handshakes in flight per load generator, as the capacity scenario's
SOURCES = [f"127.0.0.{n}" for n in range(1, 9)]  # ~28,000 ephemeral ports each
API_KEY = "bench-scale-key"
BROADCAST_TIMEOUT_S = 60.0
# Until every load generator has connected: 76,000 handshakes at a few thousand a second,
# on a machine the workers and load generators share.
CONNECT_TIMEOUT_S = 1200.0


def systems(workers: tuple[int, ...]) -> tuple[System, ...]:
    """wsfanout (Redis) and the bare app, under hypercorn and uvicorn, at each worker count."""
    found = []
    for w in workers:
        env = {
            **WSFANOUT_ENV,
            "WSFANOUT_REDIS_URL": REDIS_URL,
            "WSFANOUT_API_KEYS": API_KEY,
            "WSFANOUT_MAX_CONNECTIONS": str(SEATS),
        }
        wsfanout = System(f"wsfanout-{w}w", "wsfanout:app", "wsfanout", env, workers=w)
        baseline = replace(BASELINE, name=f"baseline-{w}w", workers=w)
        found += [
            wsfanout,
            replace(wsfanout, name=f"wsfanout-uvicorn-{w}w", server="uvicorn"),
            baseline,
            replace(baseline, name=f"baseline-uvicorn-{w}w", server="uvicorn"),
        ]
    return tuple(found)


def asked(config: dict[str, Any], system: System) -> int:
    """The connections a system is asked to hold: ``connections`` per worker, but at most
    BARE_PER_WORKER per worker for the bare app on several workers. It has no seat limit,
    and the workers share one listening socket, so they do not fill evenly (up to 13 % over
    the mean): at 19,000 each, its busiest worker ran out of descriptors and stopped
    accepting, and the rest of the connections waited in the backlog."""
    per_worker = config["connections"]
    if system.mode == "baseline" and system.workers > 1:
        per_worker = min(per_worker, BARE_PER_WORKER)
    return int(per_worker * system.workers)


def config(quick: bool) -> dict[str, Any]:
    return {
        "scenario": "scale",
        "connections": QUICK_PER_WORKER if quick else PER_WORKER,  # per worker
        "concurrency": CONCURRENCY,
        "sources": SOURCES,
    }


def workers_of(root: int) -> list[int]:
    """The processes that serve: those multiprocessing spawned (hypercorn's workers, uvicorn's
    with --workers), or the server's own process when it serves alone."""
    found = []
    for pid in family(root)[1:]:
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"spawn_main" in cmdline or b"--multiprocessing-fork" in cmdline:
                found.append(pid)
    return found or [root]


def sockets_at(port: int, state: str) -> set[str]:
    """The inodes of this machine's IPv4 sockets at local port ``port`` in ``state`` (of
    /proc/net/tcp: "0A" listening, "01" established)."""
    found = set()
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[3] == state and int(fields[1].rpartition(":")[2], 16) == port:
                found.add(fields[9])
    return found


def fds_of(pid: int, inodes: set[str]) -> list[int]:
    """Which of a process's descriptors are these sockets."""
    try:
        descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
    except FileNotFoundError:  # a worker gone meanwhile holds none
        return []
    found = []
    for fd in descriptors:
        with contextlib.suppress(OSError):
            link = os.readlink(fd)
            if link.startswith("socket:[") and link[8:-1] in inodes:
                found.append(int(fd.name))
    return found


def serving(pid: int, port: int) -> bool:
    """Whether a worker waits for connections: one of its epoll descriptors watches its
    listening socket (/proc/PID/fdinfo lists what an epoll descriptor watches, "tfd: N")."""
    listening = {f"tfd: {fd:8d}" for fd in fds_of(pid, sockets_at(port, "0A"))}
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        with contextlib.suppress(OSError):
            if any(line[:13] in listening for line in info.read_text().splitlines()):
                return True
    return False


def read_line(pipe: IO[str], deadline: float, what: str) -> dict[str, Any]:
    """One JSON line from a load generator, or an error once ``deadline`` has passed."""
    left = deadline - time.monotonic()
    ready, _, _ = select.select([pipe], [], [], max(0.0, left))
    if not ready:
        raise RuntimeError(f"{what}: no answer in time")
    line = pipe.readline()
    answer: dict[str, Any] = json.loads(line or '{"error": "the load generator died"}')
    if "error" in answer:
        raise RuntimeError(f"{what}: {answer['error']}")
    return answer


def publish(port: int) -> float:
    """Post one broadcast as a backend does; when it was sent (ms, the monotonic clock)."""
    body = json.dumps({"type": "broadcast", "text": "scale", "from": "bench"}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/publish",
        data=body,
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    sent = time.monotonic_ns() / 1e6
    with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 - http, ours
        if answer.status != 202:
            raise RuntimeError(f"the broadcast was answered {answer.status}")
    return sent


def quantile(ordered: list[float], q: float) -> float | None:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None


def run_once(
    scenario: Any, system: System, data_dir: Path, users: Users, *_: Any
) -> dict[str, Any]:
    """One system at its worker count: connect, measure, broadcast (wsfanout), stop. A
    system that fails is a result too (``note``: why; how many connections each worker held
    then; which workers were gone), so that one failure does not cost a long run the others'
    results."""
    prefix = f"wsfanout-bench-scale-{secrets.token_hex(4)}:"
    system = replace(system, env={**system.env, "WSFANOUT_REDIS_PREFIX": prefix})
    loadgens: list[subprocess.Popen[str]] = []
    seen: dict[str, Any] = {"members": [], "workers": []}
    started = time.monotonic()
    server = None
    try:
        server = Server(system, data_dir, users.env, pinned=False)
        seen["members"] = family(server.proc.pid)
        return measure(scenario, system, data_dir, users, server, loadgens, seen, prefix)
    except Exception as exc:
        connected = sockets_at(server.port, "01") if server is not None else set()
        return {
            "workers": system.workers,
            "server": system.server,
            "connections": asked(scenario.config, system),
            "per_worker": [len(fds_of(pid, connected)) for pid in seen["workers"]],
            "workers_gone": [pid for pid in seen["workers"] if not Path(f"/proc/{pid}").exists()],
            "seconds": time.monotonic() - started,
            "refused": None,
            "errors": None,
            "redis_prefix": prefix,
            "pids": [*seen["members"], *(loadgen.pid for loadgen in loadgens)],
            "note": f"failed: {type(exc).__name__}: {exc}",
        }
    finally:
        for loadgen in loadgens:
            if loadgen.poll() is None:
                loadgen.kill()
                loadgen.wait()
        if server is not None:
            server.stop()
        for pid in seen["members"]:  # a worker its master left behind
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        forget_redis_keys(prefix)


def measure(
    scenario: Any,
    system: System,
    data_dir: Path,
    users: Users,
    server: Server,
    loadgens: list[subprocess.Popen[str]],
    seen: dict[str, Any],
    prefix: str,
) -> dict[str, Any]:
    """run_once's measurement: ``loadgens`` and ``seen`` (the server's processes, its
    workers) are filled in as they start, for run_once to report on and stop."""
    total = asked(scenario.config, system)
    # healthz answered for one worker: wait for every one (connections would go to the
    # first ones only, and the spread over the workers would show that).
    deadline = time.monotonic() + 30
    while True:
        workers = workers_of(server.proc.pid)
        if len(workers) >= system.workers and all(serving(w, server.port) for w in workers):
            seen["workers"] = workers
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{system.name}: not every worker serves after 30 s")
        time.sleep(0.1)
    members = seen["members"] = family(server.proc.pid)
    rss_before = rss_kib(server.proc.pid)
    cpu_start = cpu_seconds(server.proc.pid)
    count = math.ceil(total / PER_LOADGEN)
    shares = [total // count + (i < total % count) for i in range(count)]
    for i, share in enumerate(shares):
        path = data_dir / f"loadgen-{i}.json"
        path.write_text(
            json.dumps(
                {
                    **scenario.config,
                    "scenario": "broadcast" if system.mode == "wsfanout" else "capacity",
                    "connections": share,
                    "mode": system.mode,
                    "client": system.client,
                    "url": f"ws://127.0.0.1:{server.port}/",
                    "cookies": users.cookies,
                    "retries": RETRIES if system.mode == "wsfanout" else 0,
                    "retryMs": RETRY_MS,
                    "timeoutMs": BROADCAST_TIMEOUT_S * 1000,
                }
            )
        )
        command = ["node", "--experimental-detect-module", str(BENCH / "loadgen.mjs")]
        loadgens.append(
            subprocess.Popen(
                [*command, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
        )
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    ready = []
    for i, loadgen in enumerate(loadgens):
        assert loadgen.stdout is not None
        ready.append(read_line(loadgen.stdout, deadline, f"{system.name} loadgen {i}"))
    wall = (max(r["opened_ms"] for r in ready) - min(r["opening_ms"] for r in ready)) / 1e3
    time.sleep(0.5)  # let the server settle after the handshakes
    rss_after = rss_kib(server.proc.pid)
    handshake_cpu = cpu_seconds(server.proc.pid) - cpu_start
    connected = sockets_at(server.port, "01")
    spread = [len(fds_of(pid, connected)) for pid in workers]
    for loadgen in loadgens:
        assert loadgen.stdin is not None
        loadgen.stdin.write("go\n")
        loadgen.stdin.flush()
    result: dict[str, Any] = {
        "workers": system.workers,
        "server": system.server,
        "connections": total,
        "held": total,  # every load generator connected all of its share
        "loadgens": count,
        "handshake_s": wall,
        "handshakes_per_s": total / wall,
        "server_us_per_handshake": 1e6 * handshake_cpu / total,
        "rss_kib_per_conn": (rss_after - rss_before) / total,
        "rss_mib": rss_after / 1024,
        "per_worker": spread,
        # uvicorn's supervisor kills a worker that does not answer its ping within 5 s
        "workers_gone": [pid for pid in workers if not Path(f"/proc/{pid}").exists()],
        "refused": sum(r["refused"] for r in ready),
        # what the run leaves behind, for tests/test_bench.py to check is gone
        "redis_prefix": prefix,
        "pids": [*members, *(loadgen.pid for loadgen in loadgens)],
        "refusals": {
            why: sum(r["refusals"].get(why, 0) for r in ready)
            for why in sorted({why for r in ready for why in r["refusals"]})
        },
    }
    cpu_before = cpu_seconds(server.proc.pid)
    if system.mode == "wsfanout":
        time.sleep(0.2)  # every load generator has read its "go"
        sent = publish(server.port)
    deadline = time.monotonic() + BROADCAST_TIMEOUT_S + 30
    answers = []
    for i, loadgen in enumerate(loadgens):
        assert loadgen.stdout is not None
        answers.append(read_line(loadgen.stdout, deadline, f"{system.name} loadgen {i}"))
    result["broadcast_server_cpu_s"] = cpu_seconds(server.proc.pid) - cpu_before
    result["errors"] = sum(a["errors"] for a in answers)
    result["loadgen_handshake_cpu_s"] = sum(a["loadgen_handshake_cpu_s"] for a in answers)
    result["client"] = answers[0]["client"]
    result["speaks"] = answers[0]["speaks"]
    result["negotiated"] = answers[0]["negotiated"]
    if system.mode == "wsfanout":
        latencies = sorted(t - sent for a in answers for t in a["arrivals_ms"])
        result["received"] = len(latencies)
        result["complete"] = len(latencies) == total
        result["p50_ms"] = quantile(latencies, 0.5)
        result["p99_ms"] = quantile(latencies, 0.99)
        result["max_ms"] = latencies[-1] if latencies else None
        if not result["complete"]:
            result["note"] = f"broadcast reached {len(latencies)} of {total}"
    for loadgen in loadgens:
        loadgen.wait(30)
    return result


# The table: a row per system, its columns these results (key, heading).
COLUMNS = [
    ("connections", "conns"),
    ("held", "held"),
    ("refused", "refused"),
    ("handshakes_per_s", "handshakes/s"),
    ("rss_kib_per_conn", "RSS KiB/conn"),
    ("server_us_per_handshake", "server µs/hs"),
    ("p50_ms", "bcast p50 ms"),
    ("p99_ms", "bcast p99 ms"),
    ("max_ms", "bcast max ms"),
]
COUNTS = {"connections", "held", "refused"}


def report(
    scenario: Any, by_system: dict[str, list[dict[str, Any]]]
) -> dict[str, dict[str, float | None]]:
    """Print the scenario's table (medians of its repetitions); its medians, by key."""
    print(f"## {scenario.label}")
    width = max(len(name) for name in by_system) + 2
    print(f"{'system':{width}}" + "".join(f"{title:>14}" for _, title in COLUMNS) + "  per worker")
    table: dict[str, dict[str, float | None]] = {key: {} for key, _ in COLUMNS}
    for name, runs in by_system.items():
        cells = ""
        for key, _ in COLUMNS:
            value = table[key][name] = median([r.get(key) for r in runs])
            cells += (
                f"{value:>14,.0f}" if key in COUNTS and value is not None else f"{fmt(value):>14}"
            )
        spread = "/".join(f"{n:,}" for n in runs[-1]["per_worker"])
        print(f"{name:{width}}{cells}  {spread}")
    for name, runs in by_system.items():
        for run in runs:
            if "note" in run:
                print(f"{name}: {run['note']}")
    print(
        "The bare app (baseline-*) has no cross-worker broadcast: handshakes and memory only.\n"
        f"{os.cpu_count()} cores shared by the workers, the load generators and Redis, none "
        "pinned. RSS: every server process, master included. Per worker: its sockets after the "
        "handshakes (last repetition)."
    )
    print()
    return table
