"""bench: the benchmark harness itself runs end to end (tiny sizes, one repetition)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest
import redis

from tests import postgres
from tests.server import bench_node_modules

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.skipif(
        shutil.which("node") is None and os.environ.get("CI") != "true",
        reason="the benchmark's load generator needs Node.js (node, npm)",
    ),
    pytest.mark.slow(95),
]


def database_exists(name: str) -> bool:
    async def look() -> bool:
        connection = await asyncpg.connect(postgres.ADMIN_URL, timeout=10)
        try:
            found = await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        finally:
            await connection.close()
        return found is not None

    return asyncio.run(look())


# A dozen servers and their load, one after another: about 100 s alone on 2 cores, and more
# when the suite's other workers load the machine (the suite's 180 s per test cut it off).
@pytest.mark.timeout(420)
def test_quick_bench_measures_both_systems(tmp_path: Path) -> None:
    """`bench/run.py --quick` runs every scenario against wsfanout and the baseline, each under
    hypercorn and under uvicorn, and the store on PostgreSQL beside SQLite (a database of the
    run's own, dropped after)."""
    bench_node_modules()
    out = tmp_path / "results.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "run.py"),
            "--quick",
            "--reps",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ratio" in result.stdout
    summary = json.loads(out.read_text())
    scenarios = summary["scenarios"]
    expected = {"burst", "paced", "groups", "capacity", "logins"}
    if "skipping the redis scenario" not in result.stdout:
        expected.add("redis")  # two workers sharing fan-out through Redis
    with_postgres = "skipping the PostgreSQL runs" not in result.stdout
    if os.environ.get("CI") == "true":
        assert with_postgres, result.stdout  # CI runs PostgreSQL (tests/postgres.py)
    if with_postgres:
        expected.add("capacity-pg")
    assert set(scenarios) == expected
    # Every scenario has wsfanout under uvicorn too, and the fan-out ones the bare app under it.
    uvicorn = {"wsfanout-uvicorn", "baseline-uvicorn"}
    for name in ("burst", "paced", "groups", "capacity"):
        assert uvicorn <= set(scenarios[name]["runs"]), (name, set(scenarios[name]["runs"]))
    if "redis" in expected:
        assert {"wsfanout-uvicorn", "wsfanout-uvicorn-redis-2w"} <= set(scenarios["redis"]["runs"])
    for name in sorted(expected - {"capacity", "capacity-pg", "logins"}):
        for system, runs in scenarios[name]["runs"].items():
            (run,) = runs
            assert run["complete"], (name, system, run)
            assert run["deliveries"] == run["expected"] > 0, (name, system)
            assert run["errors"] == 0
    medians = scenarios["burst"]["medians"]
    for system in ("wsfanout", "baseline", "wsfanout-uvicorn", "baseline-uvicorn"):
        assert medians["deliveries_per_s"][system] > 0, system
    # wsfanout under uvicorn over the bare app under hypercorn (the target), and over itself
    # under hypercorn: printed, and kept in the results
    ratios = scenarios["burst"]["ratios"]
    assert ratios["wsfanout-uvicorn / baseline"]["deliveries_per_s"] > 0
    assert ratios["wsfanout-uvicorn / wsfanout"]["deliveries_per_s"] > 0
    assert "wsfanout-uvicorn / baseline deliveries/s" in result.stdout
    capacity = scenarios["capacity"]
    for system in ("wsfanout", "wsfanout-uvicorn", "baseline-uvicorn", "baseline-uvicorn-browser"):
        (run,) = capacity["runs"][system]
        assert run["complete"], (system, run)
        assert capacity["medians"]["handshakes_per_s"][system] > 0, system
    # The bare app also with Chrome's handshake (its deflate offer declined), as wsfanout's.
    (run,) = capacity["runs"]["baseline-uvicorn-browser"]
    assert (run["client"], run["negotiated"]) == ("browser", ""), run
    assert capacity["runs"]["baseline-uvicorn"][0]["client"] == "plain"
    assert "wsfanout-uvicorn / baseline-uvicorn-browser handshakes/s" in result.stdout
    for system in ("wsfanout", "wsfanout-uvicorn"):
        assert capacity["medians"]["rss_kib_per_conn"][system] > 0, system
    logins = scenarios["logins"]
    assert set(logins["runs"]) == (
        {"wsfanout", "wsfanout-uvicorn", "wsfanout-pg", "wsfanout-uvicorn-pg"}
        if with_postgres
        else {"wsfanout", "wsfanout-uvicorn"}
    )
    for system, runs in logins["runs"].items():
        (run,) = runs
        assert run["logins"] > 0, (system, run)
        assert run["errors"] == 0, (system, run["failures"])
    if with_postgres:
        for system in ("wsfanout-pg", "wsfanout-uvicorn-pg"):
            assert scenarios["capacity-pg"]["medians"]["handshakes_per_s"][system] > 0, system
            assert logins["medians"]["logins_per_s"][system] > 0, system
        found = re.search(r"database (wsfanout_bench_[0-9a-f]+) ", result.stdout)
        assert found is not None, result.stdout
        assert not database_exists(found[1])


@pytest.mark.timeout(180)
def test_quick_scale_scenario(tmp_path: Path) -> None:
    """`bench/run.py --quick --only scale`: 200 browser-like connections per worker at 1 and 2
    workers sharing fan-out through Redis, under hypercorn and uvicorn, and the bare app's;
    every connection has the broadcast, the connections are counted on every worker, and
    neither a process nor a Redis key of the run outlives it."""
    from tests.server import need_redis

    need_redis()
    bench_node_modules()
    out = tmp_path / "results.json"
    command = [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--only", "scale"]
    result = subprocess.run(
        [*command, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    scale = json.loads(out.read_text())["scenarios"]["scale"]
    assert "bcast max ms" in result.stdout
    names = {f"{kind}-{w}w" for w in (1, 2) for kind in ("wsfanout", "wsfanout-uvicorn")}
    bare = {f"{kind}-{w}w" for w in (1, 2) for kind in ("baseline", "baseline-uvicorn")}
    assert set(scale["runs"]) == names | bare
    for system, runs in scale["runs"].items():
        (run,) = runs  # one repetition: the scale scenario's default
        assert "note" not in run and run["workers_gone"] == [], (system, run.get("note"), run)
        assert run["connections"] == 200 * run["workers"], system
        assert len(run["per_worker"]) == run["workers"], (system, run["per_worker"])
        assert sum(run["per_worker"]) >= run["connections"], (system, run["per_worker"])
        assert run["handshakes_per_s"] > 0, system
        assert run["errors"] == 0, (system, run)
        if system in names:
            assert run["complete"], (system, run)
            assert run["received"] == run["connections"], system
            assert 0 < run["p50_ms"] <= run["p99_ms"] <= run["max_ms"], (system, run)
        for pid in run["pids"]:
            assert not Path(f"/proc/{pid}").exists() or pid_is_another(pid), (system, pid)
        keys = redis.Redis.from_url("redis://127.0.0.1:6379/0").keys(run["redis_prefix"] + "*")
        assert keys == [], (system, keys[:5])


def pid_is_another(pid: int) -> bool:
    """A pid the system gave again to a process that is neither a server nor a load generator."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return b"loadgen.mjs" not in cmdline and b"hypercorn" not in cmdline and b"spawn" not in cmdline
