"""The benchmark: wsfanout and a bare ASGI app, under hypercorn and under uvicorn, side by
side in one run.

Each scenario runs against a fresh server of each system in turn (A/B/A/B …),
repeated, and the table shows medians and the ratio wsfanout / baseline (both under
hypercorn); lines under it give more ratios, e.g. wsfanout-uvicorn / baseline. The
server is pinned to core 0 and the load generator (Node ``ws``, bench/loadgen.mjs)
to core 1. Server CPU comes from /proc (the scheduler's count of the time every thread of
the server process and its descendants spent on a CPU, in ns, over the measured phase only,
connection set-up excluded).

The systems, each launched on a socket the bench binds (127.0.0.1, a free port):

- ``wsfanout`` (and its variants ``-nohistory``, ``-compress``, ``-batch1``, ``-pg``,
  ``-redis-2w``): ``python -m hypercorn --workers W --bind fd://N wsfanout:app``
  (W 0: hypercorn serves in its own process);
- ``baseline``, the bare app (bench/baseline.py): ``python -m hypercorn … bench.baseline:app``;
- ``wsfanout-uvicorn`` (and ``-pg``, ``-redis-2w``): as users run it,
  ``python -m wsfanout.cli serve --server uvicorn --bind fd://N --ping-interval 0 --workers W``:
  uvicorn's websockets-sansio protocol, uvloop and h11, permessage-deflate as
  WSFANOUT_COMPRESSION says (off), the frame limit as ws_max_size, no proxy headers;
- ``baseline-uvicorn``: ``python -m bench.uvicorn_fd --fd N --ws websockets-sansio
  --ws-per-message-deflate false --no-proxy-headers --http h11 --lifespan on --no-access-log
  --log-level warning --backlog 4096 bench.baseline:app``.

wsfanout's clients speak as browsers do, whichever server: the handshake Chrome sends,
permessage-deflate offered as Chrome offers it (``--plain`` drops the offer). The baselines get
plain clients: they are the floor. In the capacity runs, where the handshake is what is
measured, the bare app under uvicorn is also run with Chrome's handshake
(``baseline-uvicorn-browser``: the same headers and deflate offer, declined; no cookie), and
the lines under the table give wsfanout-uvicorn's ratio to both. (Under hypercorn the bare
app cannot decline deflate: hypercorn accepts every offer.) Each table shows which client a
column used and what the server negotiated. wsfanout's clients speak through its JavaScript
client (web/wsfanout.js), which costs the load generator more CPU per delivery than reading
frames by hand: a run whose load generator was busier than the server, at nearly a full
core, is noted "loadgen-bound", and
``--raw-clients`` has wsfanout's clients speak the protocol by hand (bench/loadgen.mjs).

The ``logins`` scenario has HTTP clients of its own (bench/logins.mjs) log in for a while.
The store runs on SQLite (a file in the server's data directory) and, for ``capacity-pg`` and
``logins``, on PostgreSQL too (``wsfanout-pg``, ``wsfanout-uvicorn-pg``): a database of the run's
own on the machine's server (127.0.0.1:5432), created with the same users and dropped at the
end, also on failure. Without PostgreSQL those columns are skipped, with a line saying so.

``--against OTHER_TREE`` adds that checkout's wsfanout as ``wsfanout-before`` (hypercorn) and,
when its ``wsfanout serve`` knows ``--server``, as ``wsfanout-uvicorn-before`` (uvicorn).

    python bench/run.py                  # the full run (several minutes): bench/results.json
    python bench/run.py --quick          # a small smoke run: bench/results-quick.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
SECRET = "bench-secret-key"  # noqa: S105 - a throwaway key for a throwaway database
PASSWORD = "bench"  # noqa: S105 - every bench user's
TICKS = os.sysconf("SC_CLK_TCK")
# The machine's PostgreSQL: the run creates a database of its own there, and drops it.
POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


@dataclass(frozen=True)
class System:
    name: str
    app: str
    mode: str  # loadgen protocol
    env: dict[str, str] = field(default_factory=dict)
    workers: int = 0  # 0: hypercorn serves in its own process
    client: str = "browser"  # the loadgen's client: "browser" (offers deflate) or "plain"
    tree: Path | None = None  # another checkout's wsfanout (--against); None: this tree
    store: str = "sqlite"  # "sqlite" (the data directory's file) or "postgresql"
    # What serves it: "hypercorn" or "uvicorn" (wsfanout through `wsfanout serve --server
    # uvicorn`, the baseline through uvicorn's own command line; see Server).
    server: str = "hypercorn"


WSFANOUT_ENV = {"WSFANOUT_RATE_LIMIT": "0", "WSFANOUT_LOG_LEVEL": "warning"}
WSFANOUT = System("wsfanout", "wsfanout:app", "wsfanout", WSFANOUT_ENV)
COMPRESS = System(
    "wsfanout-compress",
    "wsfanout:app",
    "wsfanout",
    {**WSFANOUT_ENV, "WSFANOUT_COMPRESSION": "on"},
)
NO_BATCH = System(
    "wsfanout-batch1", "wsfanout:app", "wsfanout", {**WSFANOUT_ENV, "WSFANOUT_BATCH_MAX": "1"}
)
WSFANOUT_PG = dataclasses.replace(WSFANOUT, name="wsfanout-pg", store="postgresql")
BASELINE = System("baseline", "bench.baseline:app", "baseline", client="plain")
# The same under uvicorn (websockets-sansio, uvloop, h11), with the same clients.
WSFANOUT_UVICORN = dataclasses.replace(WSFANOUT, name="wsfanout-uvicorn", server="uvicorn")
WSFANOUT_UVICORN_PG = dataclasses.replace(WSFANOUT_PG, name="wsfanout-uvicorn-pg", server="uvicorn")
BASELINE_UVICORN = dataclasses.replace(BASELINE, name="baseline-uvicorn", server="uvicorn")
# The bare app under uvicorn with wsfanout's handshake, as Chrome sends it (a dozen headers,
# the deflate offer, declined as wsfanout declines it; no cookie: it has no login), speaking
# by hand. With plain clients (five headers) its server parses less per handshake: the floor.
# (Under hypercorn the bare app cannot decline deflate: hypercorn accepts every offer.)
BASELINE_UVICORN_BROWSER = dataclasses.replace(
    BASELINE_UVICORN, name="baseline-uvicorn-browser", client="browser"
)
# Seconds a server is left to settle after its handshakes, before anything is measured; --quick
# (a smoke test of thirty runs, its figures not kept) leaves it less.
SETTLE_S = 0.5
QUICK_SETTLE_S = 0.05
CAPACITY = 19_000  # idle connections: a process here may hold 20,000 file descriptors
# Handshakes in flight at once in the capacity runs. The browser-like client with the client
# library costs the load generator (one core) about 1.5x the bare app's plain client per
# handshake (twice, before it had one socket class for all); at 200 in flight the two took
# turns and wsfanout's server sat idle about a sixth of its handshake phase (issue 29). The
# bare app's rate is the same at 200 and 600.
CAPACITY_IN_FLIGHT = 600
# The scenarios whose connections are users of their own (capacity ones cycle them).
FAN_OUT = ("burst", "paced", "groups")
# A fan-out run whose load generator was this busy (CPU / wall), and busier than the server,
# measured the load generator; judged on runs long enough to tell (LOADGEN_BOUND_WALL).
LOADGEN_BOUND = 0.9
LOADGEN_BOUND_WALL = 0.2  # seconds
# Local addresses the capacity run connects from, in turn, so ephemeral ports never run short.
SOURCES = [f"127.0.0.{n}" for n in range(1, 5)]
REDIS_URL = "redis://127.0.0.1:6379/0"
# A login is a scrypt hash (tens of ms of one core) and a few small writes: a handful of
# clients already keeps the server's core busy; more would only queue.
LOGIN_CLIENTS = 8
REDIS_2W = System(
    "wsfanout-redis-2w",
    "wsfanout:app",
    "wsfanout",
    {**WSFANOUT_ENV, "WSFANOUT_REDIS_URL": REDIS_URL, "WSFANOUT_REDIS_PREFIX": "wsfanout-bench:"},
    workers=2,
)


NO_HISTORY = {"WSFANOUT_HISTORY_SIZE": "0"}  # no offsets, no history, no Lua (DESIGN 5.1)
HISTORY_OFF = System(
    "wsfanout-nohistory", "wsfanout:app", "wsfanout", {**WSFANOUT_ENV, **NO_HISTORY}
)
REDIS_2W_OFF = dataclasses.replace(
    REDIS_2W, name="wsfanout-redis-2w-nohist", env={**REDIS_2W.env, **NO_HISTORY}
)
REDIS_2W_UVICORN = dataclasses.replace(REDIS_2W, name="wsfanout-uvicorn-redis-2w", server="uvicorn")
# The host's lifecycle hooks (DESIGN 12) hanging or failing on every event, and a webhook
# whose receiver is down: fan-out must not notice ("hooks", run only when named).
HOOK_SLEEP = System(
    "wsfanout-hook-sleep", "bench.hooked:app", "wsfanout", {**WSFANOUT_ENV, "BENCH_HOOK": "sleep"}
)
HOOK_RAISE = dataclasses.replace(
    HOOK_SLEEP, name="wsfanout-hook-raise", env={**WSFANOUT_ENV, "BENCH_HOOK": "raise"}
)
WEBHOOK_DOWN = System(
    "wsfanout-webhook-down",
    "wsfanout:app",
    "wsfanout",
    {
        **WSFANOUT_ENV,
        "WSFANOUT_WEBHOOK_URL": "http://127.0.0.1:9/nobody-listens",
        "WSFANOUT_WEBHOOK_SECRET": "bench-webhook-secret",
    },
)
OPT_IN = frozenset({"hooks", "scale"})  # scenarios run only when named with --only
# Pairs whose ratio is printed: history on (the default) over history off.
HISTORY_PAIRS = (
    ("wsfanout", "wsfanout-nohistory"),
    ("wsfanout-redis-2w", "wsfanout-redis-2w-nohist"),
)


@dataclass(frozen=True)
class Scenario:
    name: str
    systems: tuple[System, ...]
    config: dict[str, Any]
    label: str
    subject: str = "wsfanout"  # the ratio column is subject / reference
    reference: str = "baseline"
    # More ratios printed under the table (and kept in the results), numerator / denominator,
    # of the scenario's first two metrics (RATIO_METRICS).
    ratios: tuple[tuple[str, str], ...] = ()
    settle_s: float = SETTLE_S  # after the handshakes, before anything is measured


# Each server's uvicorn system over its hypercorn one.
UVICORN_RATIOS = (("wsfanout-uvicorn", "wsfanout"), ("baseline-uvicorn", "baseline"))
PG_UVICORN_RATIOS = (("wsfanout-uvicorn-pg", "wsfanout-pg"), ("wsfanout-uvicorn", "wsfanout"))


def scenarios(quick: bool) -> list[Scenario]:
    """Every scenario; ``quick``: small sizes, and each kind of server once rather than
    every variant of a setting (a smoke run of the harness: ``just test`` runs it)."""
    found = _scenarios(quick)
    if not quick:
        return found
    return [
        dataclasses.replace(
            s,
            systems=tuple(x for x in s.systems if x.name not in QUICK_SKIP),
            settle_s=QUICK_SETTLE_S,
        )
        for s in found
    ]


# Variants of a setting the quick run leaves out: the full run measures them.
QUICK_SKIP = frozenset(
    {"wsfanout-compress", "wsfanout-batch1", "wsfanout-nohistory", "wsfanout-redis-2w-nohist"}
)


def _scenarios(quick: bool) -> list[Scenario]:
    scale = scale_module()
    n = 100 if quick else 1000
    messages = 20 if quick else 200
    capacity = 500 if quick else CAPACITY
    login_seconds = 1 if quick else 10
    paced_seconds = 1 if quick else 3
    return [
        Scenario(
            "burst",
            (
                WSFANOUT,
                WSFANOUT_UVICORN,
                HISTORY_OFF,
                COMPRESS,
                NO_BATCH,
                BASELINE,
                BASELINE_UVICORN,
            ),
            {"scenario": "burst", "connections": n, "messages": messages, "size": 100},
            f"S1 burst: {n} conns, {messages} broadcasts of 100 B",
            ratios=(
                ("wsfanout-uvicorn", "baseline"),  # the target: >= 15x the bare app's deliveries/s
                ("wsfanout-uvicorn", "wsfanout"),
                ("wsfanout-uvicorn", "baseline-uvicorn"),
                ("baseline-uvicorn", "baseline"),
            ),
        ),
        Scenario(
            "hooks",
            (WSFANOUT, HOOK_SLEEP, HOOK_RAISE, WEBHOOK_DOWN, BASELINE),
            {"scenario": "burst", "connections": n, "messages": messages, "size": 100},
            f"hooks: S1 burst ({n} conns, {messages} broadcasts of 100 B) with the host's "
            "hooks sleeping 5 s or raising on every event, and a webhook receiver down",
            ratios=(
                ("wsfanout-hook-sleep", "wsfanout"),
                ("wsfanout-hook-raise", "wsfanout"),
                ("wsfanout-webhook-down", "wsfanout"),
            ),
        ),
        Scenario(
            "paced",
            (WSFANOUT, WSFANOUT_UVICORN, BASELINE, BASELINE_UVICORN),
            {
                "scenario": "paced",
                "connections": n,
                "messages": paced_seconds * 60,
                "size": 100,
                "rate": 60,
            },
            f"S1 paced: {n} conns, 60 broadcasts/s = {60 * n} deliveries/s for {paced_seconds} s",
            ratios=UVICORN_RATIOS,
        ),
        Scenario(
            "groups",
            (WSFANOUT, WSFANOUT_UVICORN, HISTORY_OFF, BASELINE, BASELINE_UVICORN),
            {
                "scenario": "groups",
                "connections": n,
                "messages": 20 * messages,
                "size": 100,
                "senders": 10,
            },
            f"groups: {n} conns in {n // 10} groups of 10, {20 * messages} sends",
            ratios=UVICORN_RATIOS,
        ),
        Scenario(
            "redis",
            (WSFANOUT, WSFANOUT_UVICORN, REDIS_2W, REDIS_2W_UVICORN, REDIS_2W_OFF),
            {"scenario": "burst", "connections": n, "messages": messages, "size": 100},
            "many nodes: S1 burst on 2 workers sharing fan-out through Redis, vs 1 worker alone",
            subject="wsfanout-redis-2w",
            reference="wsfanout",
            ratios=(
                ("wsfanout-uvicorn-redis-2w", "wsfanout-redis-2w"),
                ("wsfanout-uvicorn-redis-2w", "wsfanout-uvicorn"),
                ("wsfanout-uvicorn", "wsfanout"),
            ),
        ),
        Scenario(
            "capacity",
            (
                WSFANOUT,
                WSFANOUT_UVICORN,
                COMPRESS,
                BASELINE,
                BASELINE_UVICORN,
                BASELINE_UVICORN_BROWSER,
            ),
            {
                "scenario": "capacity",
                "connections": capacity,
                "concurrency": CAPACITY_IN_FLIGHT,
                "sources": SOURCES,
            },
            f"capacity: {capacity:,} idle authenticated connections",
            ratios=(
                ("wsfanout-uvicorn", "baseline-uvicorn-browser"),
                ("wsfanout-uvicorn", "baseline-uvicorn"),
                *UVICORN_RATIOS,
            ),
        ),
        Scenario(
            "capacity-pg",
            (WSFANOUT, WSFANOUT_UVICORN, WSFANOUT_PG, WSFANOUT_UVICORN_PG, BASELINE),
            {
                "scenario": "capacity",
                "connections": capacity,
                "concurrency": CAPACITY_IN_FLIGHT,
                "sources": SOURCES,
            },
            f"capacity, the store on PostgreSQL vs SQLite: {capacity:,} idle authenticated "
            "connections (each handshake reads its session, user and groups)",
            subject="wsfanout-pg",
            reference="wsfanout",
            ratios=PG_UVICORN_RATIOS,
        ),
        Scenario(
            "logins",
            (WSFANOUT, WSFANOUT_UVICORN, WSFANOUT_PG, WSFANOUT_UVICORN_PG),
            {
                "scenario": "logins",
                "connections": 0,
                "clients": LOGIN_CLIENTS,
                "seconds": login_seconds,
                "sources": SOURCES,
            },
            f"logins: POST /login by {LOGIN_CLIENTS} HTTP clients for {login_seconds} s, "
            "the store on PostgreSQL vs SQLite (no baseline: the bare app has no login)",
            subject="wsfanout-pg",
            reference="wsfanout",
            ratios=PG_UVICORN_RATIOS,
        ),
        Scenario(
            "scale",
            scale.systems(scale.QUICK_WORKERS if quick else scale.WORKERS),
            scale.config(quick),
            f"scale: {scale.config(quick)['connections']:,} browser-like connections per worker "
            "(Redis), then one broadcast to all (bench/scale.py)",
        ),
    ]


def scale_module() -> Any:
    """bench/scale.py, the scale scenario (opt-in: --only scale)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module("bench.scale")


def family(pid: int) -> list[int]:
    """A process and all its descendants (hypercorn's workers)."""
    found = [pid]
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        found += family(int(child))
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its descendants: the scheduler's count of every
    thread's time on a CPU, in ns (``/proc/PID/task/TID/schedstat``), where /proc/PID/stat
    counts clock ticks (10 ms: a burst's 0.1 s of server CPU was 10 of them, read to a
    tenth). A thread that ends during a measurement takes its time with it; the servers'
    threads (the store's, the executor's) live as long as they do."""
    total = 0.0
    for member in family(pid):
        total += _process_cpu(member)
    return total


def _process_cpu(pid: int) -> float:
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
        return sum(int((task / "schedstat").read_text().split()[0]) for task in tasks) / 1e9
    except FileNotFoundError:  # no schedstat here (CONFIG_SCHED_INFO), or a thread just ended
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / TICKS


def rss_kib(pid: int) -> int:
    """Resident memory of a process and its descendants."""
    total = 0
    for member in family(pid):
        for line in Path(f"/proc/{member}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def redis_cpu_seconds() -> float | None:
    try:
        import redis

        info = redis.Redis.from_url(REDIS_URL, socket_timeout=2).info("cpu")
    except Exception:
        return None
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def forget_redis_keys(prefix: str) -> None:
    """Delete what the runs kept in Redis under the bench's prefix (history, presence)."""
    try:
        import redis

        client = redis.Redis.from_url(REDIS_URL, socket_timeout=2)
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    except Exception as exc:  # a leftover key is no reason to lose the results
        print(f"could not delete the bench's Redis keys ({exc})", flush=True)


def postgres_rows(query: str, *args: Any) -> list[tuple[Any, ...]]:
    """Run a query on the machine's PostgreSQL as its administrator; its rows."""
    import asyncpg

    async def run() -> list[tuple[Any, ...]]:
        connection = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
        try:
            return [tuple(row) for row in await connection.fetch(query, *args)]
        finally:
            await connection.close()

    return asyncio.run(run())


def postgres_run(statement: str) -> None:
    """Run a statement that cannot be prepared (CREATE/DROP DATABASE) as the administrator."""
    import asyncpg

    async def run() -> None:
        connection = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    asyncio.run(run())


@contextlib.contextmanager
def postgres_database() -> Iterator[str | None]:
    """A database of the run's own on the machine's PostgreSQL (``wsfanout_bench_<random>``),
    dropped at the end, also on failure; its URL. None, with a line saying why, when
    PostgreSQL cannot be reached. No other database is touched."""
    name = f"wsfanout_bench_{secrets.token_hex(6)}"
    try:
        postgres_run(f'CREATE DATABASE "{name}"')
    except Exception as exc:  # unreachable, refused: the run goes on without PostgreSQL
        print(
            "skipping the PostgreSQL runs (capacity-pg, and wsfanout-pg in logins): "
            f"no PostgreSQL at {POSTGRES_ADMIN_URL} ({type(exc).__name__}: {exc})",
            flush=True,
        )
        yield None
        return
    print(f"PostgreSQL: database {name} for this run (dropped at the end)", flush=True)
    try:
        yield POSTGRES_ADMIN_URL.rpartition("/")[0] + "/" + name
    finally:
        try:
            postgres_run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except Exception as exc:
            print(f"could not drop the bench's database {name} ({exc})", flush=True)


def postgres_backends_cpu(database: str) -> dict[int, float]:
    """CPU seconds of each PostgreSQL backend serving this database (the servers' pooled
    connections), by pid; empty if they cannot be listed or read."""
    found: dict[int, float] = {}
    try:
        rows = postgres_rows("SELECT pid FROM pg_stat_activity WHERE datname = $1", database)
    except Exception:
        return found
    for (pid,) in rows:
        with contextlib.suppress(OSError):  # gone meanwhile, or not on this machine
            found[pid] = cpu_seconds(pid)
    return found


def pin(core: int) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", str(core)]
    return []


def server_command(system: System, fd: int) -> list[str]:
    """How a system is launched on the listening socket ``fd``, as ``python -m`` arguments.
    wsfanout under uvicorn runs as users run it, ``wsfanout serve --server uvicorn`` (its
    settings: websockets-sansio, uvloop, h11, deflate as WSFANOUT_COMPRESSION says, the
    frame limit, no proxy headers); the bare app gets the same from uvicorn's command line."""
    workers = system.workers
    if system.server == "hypercorn":  # workers 0: hypercorn serves in its own process
        return f"hypercorn --workers {workers} --backlog 4096 --bind fd://{fd} {system.app}".split()
    if system.server != "uvicorn":
        raise ValueError(f"{system.name}: no server {system.server!r}")
    if system.app == "wsfanout:app":  # 1 worker: uvicorn serves in wsfanout serve's process
        return (
            f"wsfanout.cli serve --server uvicorn --bind fd://{fd} --ping-interval 0 "
            f"--workers {workers or 1}"
        ).split()
    return (
        f"bench.uvicorn_fd --fd {fd} --ws websockets-sansio --ws-per-message-deflate false "
        "--no-proxy-headers --http h11 --lifespan on --no-access-log --log-level warning "
        "--backlog 4096 " + (f"--workers {workers} " if workers > 1 else "") + f"{system.app}"
    ).split()


class Server:
    def __init__(
        self, system: System, data_dir: Path, store_env: dict[str, str], pinned: bool = True
    ) -> None:
        self.system = system
        self.data_dir = data_dir
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(4096)
        self.port = sock.getsockname()[1]
        env = {
            **os.environ,
            # the tree run from (or, for --against, the other checkout's wsfanout first)
            "PYTHONPATH": os.pathsep.join(
                [str(tree / "src") for tree in (system.tree,) if tree]
                + [str(ROOT / "src"), str(ROOT)]
            ),
            "WSFANOUT_DATA_DIR": str(data_dir),
            "WSFANOUT_SECRET_KEY": SECRET,
            **store_env,
            **system.env,
        }
        self.proc = subprocess.Popen(
            [
                *(pin(0) if pinned else []),
                sys.executable,
                "-m",
                *server_command(system, sock.fileno()),
            ],
            pass_fds=[sock.fileno()],
            env=env,
            cwd=data_dir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        sock.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{system.name} did not start: {self.stderr()}") from None
                time.sleep(0.05)

    def stderr(self) -> str:
        self.stop()
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode()[-2000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass(frozen=True)
class Users:
    """One store's bench users, as the load generator uses them."""

    env: dict[str, str]  # what points a server at this store
    names: list[str]
    cookies: list[str]  # a session cookie per user
    groups: list[str]  # each user's group
    cookie_name: str
    postgres: str | None = None  # the PostgreSQL database, whose backends' CPU is measured


def prepare(where: Path | str, users: int) -> Users:
    """Create users bench0000… (password PASSWORD) in groups g00… (10 each), each with a
    session, in a SQLite file or a PostgreSQL database (a ``postgresql://`` URL)."""
    sys.path.insert(0, str(ROOT / "src"))
    from wsfanout.passwords import hash_password
    from wsfanout.sessions import COOKIE_NAME, SessionCodec
    from wsfanout.store import Store

    async def build() -> tuple[list[str], list[str], list[str]]:
        store = await Store.open(where)
        hashed = hash_password(PASSWORD)  # one hash for all: creating users stays fast
        codec = SessionCodec((SECRET,), 86400)
        names, cookies, groups = [], [], []
        for g in range(users // 10):
            await store.add_group(f"g{g:03d}")
        for i in range(users):
            name, group = f"bench{i:05d}", f"g{i // 10:03d}"
            user_id = await store.add_user(name, hashed, groups=(group,))
            session_id = await store.create_session(user_id, 86400)  # a login, as the page's
            names.append(name)
            cookies.append(f"{COOKIE_NAME}={codec.issue(user_id, name, session_id)}")
            groups.append(group)
        await store.close()
        return names, cookies, groups

    names, cookies, groups = asyncio.run(build())
    if isinstance(where, Path):  # the file every server's data directory holds
        return Users({}, names, cookies, groups, COOKIE_NAME)
    database = where.rpartition("/")[2].partition("?")[0]
    env = {"WSFANOUT_DATABASE_URL": where}
    return Users(env, names, cookies, groups, COOKIE_NAME, database)


def start_profiler(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy the server (raw stacks into ``out``) until it is sent SIGINT."""
    # the venv's py-spy (the bench extra) when the venv is not on PATH (`just bench`)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    command = [spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "200"]
    profiler = subprocess.Popen(
        [*command, "--output", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # py-spy attaches
    return profiler


def run_once(
    scenario: Scenario,
    system: System,
    data_dir: Path,
    users: Users,
    profile_dir: Path | None = None,
    plain: bool = False,
    raw: bool = False,
) -> dict[str, Any]:
    server = Server(system, data_dir, users.env)
    try:
        groups = users.groups
        config = {
            **scenario.config,
            "client": "plain" if plain else system.client,
            "clientlib": not raw,
            "mode": system.mode,
            "url": f"ws://127.0.0.1:{server.port}/",
            "cookies": users.cookies,
            "groups": groups,
            "usernames": users.names,
            "password": PASSWORD,
            "cookieName": users.cookie_name,
            "concurrency": scenario.config.get("concurrency", 100),
        }
        n = config["connections"]
        config["groupSizes"] = {g: groups[:n].count(g) for g in sorted(set(groups[:n]))}
        rss_before = rss_kib(server.proc.pid)
        cpu_start = cpu_seconds(server.proc.pid)
        pg_start = postgres_backends_cpu(users.postgres) if users.postgres else {}
        profiled = profile_dir is not None and system.name in PROFILED
        profile = (profile_dir or Path()) / f"{scenario.name}-{system.name}.txt"
        profiler = None
        if profiled and config["scenario"] == "capacity":  # its measured phase: handshakes
            profiler = start_profiler(server.proc.pid, profile)
        config_path = data_dir / "loadgen.json"
        config_path.write_text(json.dumps(config))
        # logins.mjs speaks the same lines on stdin and stdout as loadgen.mjs
        script = "logins.mjs" if config["scenario"] == "logins" else "loadgen.mjs"
        # loadgen.mjs imports web/wsfanout.js, an ES module without a package.json saying so:
        # Node 20 before 20.19 loads it only with module detection on.
        loadgen = subprocess.Popen(
            [
                *pin(1),
                "node",
                "--experimental-detect-module",
                str(BENCH / script),
                str(config_path),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert loadgen.stdin is not None and loadgen.stdout is not None
        ready = json.loads(loadgen.stdout.readline() or '{"error": "loadgen died"}')
        if "error" in ready:
            raise RuntimeError(f"{system.name}/{scenario.name}: {ready['error']}")
        time.sleep(scenario.settle_s)  # let the server settle after the handshakes
        rss_after = rss_kib(server.proc.pid)
        handshake_cpu = cpu_seconds(server.proc.pid) - cpu_start
        if profiled and profiler is None:
            profiler = start_profiler(server.proc.pid, profile)
        cpu_before = cpu_seconds(server.proc.pid)
        redis_before = redis_cpu_seconds()
        loadgen.stdin.write("go\n")
        loadgen.stdin.flush()
        result: dict[str, Any] = json.loads(loadgen.stdout.readline() or '{"error": "no result"}')
        cpu_after = cpu_seconds(server.proc.pid)
        redis_after = redis_cpu_seconds()
        pg_end = postgres_backends_cpu(users.postgres) if users.postgres else {}
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(30)
        loadgen.wait(30)
        if "error" in result:
            raise RuntimeError(f"{system.name}/{scenario.name}: {result['error']}")
        result["server_cpu_s"] = cpu_after - cpu_before
        if (
            "WSFANOUT_REDIS_URL" in system.env
            and redis_before is not None
            and redis_after is not None
        ):
            result["redis_cpu_s"] = redis_after - redis_before
            if result["deliveries"]:
                result["redis_us_per_delivery"] = 1e6 * result["redis_cpu_s"] / result["deliveries"]
        result["server_us_per_delivery"] = (
            1e6 * result["server_cpu_s"] / result["deliveries"] if result["deliveries"] else None
        )
        # PostgreSQL's share, from before the first handshake to the end (in the capacity
        # runs nothing happens after the handshakes; in the login runs nothing before).
        pg_cpu = sum(cpu - pg_start.get(pid, 0.0) for pid, cpu in pg_end.items())
        if users.postgres and pg_end:
            result["pg_cpu_s"] = pg_cpu
        if n:
            result["rss_kib_per_conn"] = (rss_after - rss_before) / n
            result["server_us_per_handshake"] = 1e6 * handshake_cpu / n
            if "pg_cpu_s" in result:
                result["pg_us_per_handshake"] = 1e6 * pg_cpu / n
        if result.get("logins"):
            result["server_us_per_login"] = 1e6 * result["server_cpu_s"] / result["logins"]
            if "pg_cpu_s" in result:
                result["pg_us_per_login"] = 1e6 * pg_cpu / result["logins"]
        if not result.get("complete", True):
            result["note"] = f"incomplete: {result['deliveries']} of {result['expected']}"
        if result.get("failures"):
            result["note"] = f"failed logins: {result['failures']}"
        if config["scenario"] in FAN_OUT and result["elapsed_s"] >= LOADGEN_BOUND_WALL:
            ours = result["loadgen_cpu_s"] / result["elapsed_s"]
            theirs = result["server_cpu_s"] / result["elapsed_s"]
            if ours >= LOADGEN_BOUND and ours > theirs:
                bound = f"loadgen-bound: loadgen {ours:.0%} of a core, server {theirs:.0%}"
                result["note"] = f"{result['note']}; {bound}" if "note" in result else bound
        return result
    finally:
        server.stop()


# The systems --profile py-spies (a single process each: the one serving).
PROFILED = ("wsfanout", "wsfanout-pg", "wsfanout-uvicorn", "wsfanout-uvicorn-pg")
METRICS = {
    "burst": [
        ("deliveries_per_s", "deliveries/s", True),
        ("server_us_per_delivery", "server µs/delivery", False),
        ("p50_ms", "p50 ms", False),
        ("p99_ms", "p99 ms", False),
        ("wire_bytes_per_delivery", "wire B/delivery", False),
        ("loadgen_cpu_s", "loadgen CPU s", None),
        ("server_cpu_s", "server CPU s", None),
        ("elapsed_s", "wall s", None),
    ],
    "paced": [
        ("p50_ms", "p50 ms", False),
        ("p99_ms", "p99 ms", False),
        ("server_us_per_delivery", "server µs/delivery", False),
        ("loadgen_cpu_s", "loadgen CPU s", None),
    ],
    "groups": [
        ("deliveries_per_s", "deliveries/s", True),
        ("server_us_per_delivery", "server µs/delivery", False),
        ("p99_ms", "p99 ms", False),
        ("loadgen_cpu_s", "loadgen CPU s", None),
    ],
    "redis": [
        ("deliveries_per_s", "deliveries/s", True),
        ("server_us_per_delivery", "workers µs/delivery", False),
        ("redis_us_per_delivery", "Redis µs/delivery", False),
        ("p50_ms", "p50 ms", False),
        ("p99_ms", "p99 ms", False),
        ("loadgen_cpu_s", "loadgen CPU s", None),
    ],
    "capacity": [
        ("handshakes_per_s", "handshakes/s", True),
        ("rss_kib_per_conn", "RSS KiB/conn", False),
        ("server_us_per_handshake", "server µs/handshake", False),
        ("handshake_s", "handshake wall s", None),
        ("loadgen_handshake_cpu_s", "loadgen CPU s", None),
    ],
}
METRICS["hooks"] = METRICS["burst"]
METRICS["capacity-pg"] = [
    *METRICS["capacity"][:3],
    ("pg_us_per_handshake", "PostgreSQL µs/handshake", False),
    *METRICS["capacity"][3:],
]
METRICS["logins"] = [
    ("logins_per_s", "logins/s", True),
    ("server_us_per_login", "server µs/login", False),
    ("pg_us_per_login", "PostgreSQL µs/login", False),
    ("p50_ms", "p50 ms", False),
    ("p99_ms", "p99 ms", False),
    ("errors", "failed logins", None),
    ("loadgen_cpu_s", "loadgen CPU s", None),
]


# A scenario's extra ratios (Scenario.ratios) are of its first two metrics: its headline
# (throughput, or latency for paced) and what it costs or holds.
RATIO_METRICS = 2


def median(values: list[Any]) -> float | None:
    numbers = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(numbers) if numbers else None


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def knows_uvicorn(tree: Path) -> bool:
    """Whether another checkout's ``wsfanout serve`` takes ``--server uvicorn``."""
    cli = tree / "src" / "wsfanout"
    sources = [cli / "cli.py", *sorted((cli / "cli").glob("*.py"))]
    return any(path.is_file() and '"--server"' in path.read_text() for path in sources)


def parser() -> argparse.ArgumentParser:
    """``just bench``'s arguments (tests/test_docs.py reads the documented ones with it)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--reps",
        type=int,
        help="repetitions of each run (median is shown; default 3, the scale scenario's 1)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--only", action="append", help="run only these scenarios")
    parser.add_argument("--size", type=int, help="payload bytes per message (default 100)")
    parser.add_argument(
        "--profile", type=Path, help="py-spy wsfanout's measured phases into this folder"
    )
    parser.add_argument(
        "--plain",
        action="store_true",
        help="wsfanout's clients offer no permessage-deflate (the old, non-browser client)",
    )
    parser.add_argument(
        "--raw-clients",
        action="store_true",
        help="wsfanout's clients speak the protocol by hand rather than through "
        "web/wsfanout.js: less load generator CPU per delivery, for loadgen-bound runs",
    )
    parser.add_argument(
        "--against",
        type=Path,
        help="another checkout (a git worktree of an earlier commit): its wsfanout runs as "
        "wsfanout-before beside this one in every scenario, for a before/after in one run",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="JSON results file (default bench/results.json; bench/results-quick.json with "
        "--quick, so a smoke run never overwrites the figures the README cites)",
    )
    return parser


def main() -> int:
    args = parser().parse_args()
    if args.out is None:
        args.out = BENCH / ("results-quick.json" if args.quick else "results.json")

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if not (BENCH / "node_modules" / "ws").exists():
        print("installing the load generator's dependencies (npm ci in bench/)", flush=True)
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--prefix", str(BENCH)], check=True)

    chosen = [
        s
        for s in scenarios(args.quick)
        if (s.name in args.only if args.only else s.name not in OPT_IN)
    ]
    if args.against:
        tree = args.against.resolve()
        before = [dataclasses.replace(WSFANOUT, name="wsfanout-before", tree=tree)]
        # An older tree's `wsfanout serve` may have no --server: then it runs under hypercorn only.
        if knows_uvicorn(tree):
            before.append(
                dataclasses.replace(WSFANOUT_UVICORN, name="wsfanout-uvicorn-before", tree=tree)
            )
        chosen = [
            dataclasses.replace(s, systems=(s.systems[0], *before, *s.systems[1:])) for s in chosen
        ]
        print(
            f"--against {args.against}: its wsfanout runs as "
            + " and ".join(system.name for system in before),
            flush=True,
        )
    for needs_redis in ("redis", "scale"):
        if any(s.name == needs_redis for s in chosen) and redis_cpu_seconds() is None:
            print(f"skipping the {needs_redis} scenario: no Redis at {REDIS_URL}", flush=True)
            chosen = [s for s in chosen if s.name != needs_redis]
    if args.size:
        for scenario in chosen:
            if "size" in scenario.config:
                scenario.config["size"] = args.size
    # As many users as the largest fan-out run connects; capacity runs cycle them, and
    # logins take them in turn.
    sized = [s.config["connections"] for s in chosen if s.config["scenario"] in FAN_OUT]
    users = min(max(sized), 1000) if sized else 1000
    # A kill ends the run as Ctrl-C does, through the cleanups (the servers, the database).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    postgres_version: str | None = None
    needs_postgres = any(system.store == "postgresql" for s in chosen for system in s.systems)
    with (
        tempfile.TemporaryDirectory(prefix="wsfanout-bench-") as tmp,
        postgres_database() if needs_postgres else contextlib.nullcontext() as postgres_url,
    ):
        data_dir = Path(tmp)
        if needs_postgres and postgres_url is None:
            chosen = [
                dataclasses.replace(
                    s, systems=tuple(m for m in s.systems if m.store != "postgresql")
                )
                for s in chosen
                if s.name != "capacity-pg"  # without PostgreSQL, the capacity scenario again
            ]
        print(f"creating {users} users ...", flush=True)
        stores = {"sqlite": prepare(data_dir / "wsfanout.sqlite3", users)}
        if postgres_url is not None:
            stores["postgresql"] = prepare(postgres_url, users)
            postgres_version = postgres_rows("SHOW server_version")[0][0]
        # --reps, or 3 (the scale scenario: 1, a full run of it takes many minutes)
        reps = {
            s.name: args.reps or (scale_module().REPS if s.name == "scale" else 3) for s in chosen
        }
        for rep in range(max(reps.values(), default=0)):
            for scenario in chosen:
                if rep >= reps[scenario.name]:
                    continue
                for system in scenario.systems:
                    started = time.monotonic()
                    measure = scale_module().run_once if scenario.name == "scale" else run_once
                    result = measure(
                        scenario,
                        system,
                        data_dir,
                        stores[system.store],
                        args.profile,
                        args.plain,
                        args.raw_clients,
                    )
                    results.setdefault(scenario.name, {}).setdefault(system.name, []).append(result)
                    note = f" ({result['note']})" if "note" in result else ""
                    print(
                        f"rep {rep + 1}/{reps[scenario.name]} {scenario.name:11} {system.name:25} "
                        f"{time.monotonic() - started:5.1f} s{note}",
                        flush=True,
                    )

    if any(s.name == "redis" for s in chosen):
        forget_redis_keys(REDIS_2W.env["WSFANOUT_REDIS_PREFIX"])
    print()
    summary: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            **({"postgresql": postgres_version} if postgres_version else {}),
        },
        "reps": max(reps.values(), default=0),
        "quick": args.quick,
        "command": " ".join(["bench/run.py", *sys.argv[1:]]),
        "scenarios": {},
    }
    for scenario in chosen:
        by_system = results[scenario.name]
        if scenario.name == "scale":  # a row per system: its own table
            medians = scale_module().report(scenario, by_system)
            summary["scenarios"][scenario.name] = {
                "label": scenario.label,
                "medians": medians,
                "runs": by_system,
            }
            continue
        print(f"## {scenario.label}")
        names = [s.name for s in scenario.systems]
        width = max(18, 2 + max(len(n) for n in names))
        header = f"{'metric':22}" + "".join(f"{n:>{width}}" for n in names) + f"{'ratio':>10}"
        if scenario.reference != "baseline":
            print(f"(ratio: {scenario.subject} / {scenario.reference})")
        print(header)
        # What the websocket clients negotiated; a run that opens none has nothing to show.
        shown = (
            ("client", "speaks", "negotiated") if scenario.config["connections"] else ("client",)
        )
        for key in shown:
            cells = []
            for n in names:
                seen = {str(r.get(key) or "none").replace("permessage-", "") for r in by_system[n]}
                cells.append(f"{'/'.join(sorted(seen))[: width - 1]:>{width}}")
            print(f"{key:22}" + "".join(cells))
        table: dict[str, dict[str, float | None]] = {}
        for key, label, _higher_is_better in METRICS[scenario.name]:
            values = {n: median([r.get(key) for r in by_system[n]]) for n in names}
            table[key] = values
            base, ours = values.get(scenario.reference), values.get(scenario.subject)
            ratio = f"{ours / base:.2f}x" if base and ours is not None else "-"
            row = "".join(f"{fmt(values[n]):>{width}}" for n in names)
            print(f"{label:22}{row}{ratio:>10}")
        if "wsfanout-batch1" in names:
            base, ours = (
                table["server_us_per_delivery"]["baseline"],
                table["server_us_per_delivery"]["wsfanout-batch1"],
            )
            if base and ours:
                print(f"{'batch1 µs/delivery vs baseline':40} {ours / base:.2f}x")
        if scenario.reference != "baseline" and "baseline" in names:
            key, label, _higher_is_better = METRICS[scenario.name][0]
            base, ours = table[key]["baseline"], table[key].get(scenario.subject)
            if base and ours:
                print(f"{scenario.subject + ' / baseline ' + label:40} {ours / base:.2f}x")
        cost = table.get("server_us_per_delivery", {})
        for on, off in HISTORY_PAIRS:
            on_cost, off_cost = cost.get(on), cost.get(off)
            if on_cost and off_cost:
                print(f"{'history on / off µs/delivery (' + on + ')':40} {on_cost / off_cost:.2f}x")
        ratios: dict[str, dict[str, float]] = {}
        lines = []
        for top, bottom in scenario.ratios:
            for key, label, _higher_is_better in METRICS[scenario.name][:RATIO_METRICS]:
                ours, base = table[key].get(top), table[key].get(bottom)
                if base and ours:  # a 0 was not measured (no schedstat: CPU ticks), no ratio
                    ratios.setdefault(f"{top} / {bottom}", {})[key] = ours / base
                    lines.append((f"{top} / {bottom} {label}", f"{ours / base:.2f}x"))
        for text, ratio in lines:
            print(f"{text:{max(40, *(len(t) for t, _ in lines))}} {ratio}")
        bound = {n: sum("loadgen-bound" in r.get("note", "") for r in by_system[n]) for n in names}
        if any(bound.values()):
            print(
                "loadgen-bound (its figures measure the load generator; --raw-clients): "
                + ", ".join(f"{n} {k} of {len(by_system[n])}" for n, k in bound.items() if k)
            )
        print()
        summary["scenarios"][scenario.name] = {
            "label": scenario.label,
            "medians": table,
            **({"ratios": ratios} if ratios else {}),
            "runs": by_system,
        }
    args.out.write_text(json.dumps(summary, indent=1))
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
