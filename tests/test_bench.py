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

from tests import postgres

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None and os.environ.get("CI") != "true",
    reason="the benchmark's load generator needs Node.js (node, npm)",
)


def database_exists(name: str) -> bool:
    async def look() -> bool:
        connection = await asyncpg.connect(postgres.ADMIN_URL, timeout=10)
        try:
            found = await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        finally:
            await connection.close()
        return found is not None

    return asyncio.run(look())


def test_quick_bench_measures_both_systems(tmp_path: Path) -> None:
    """`bench/run.py --quick` runs every scenario against wsfanout and the baseline, and
    the store on PostgreSQL beside SQLite (a database of the run's own, dropped after)."""
    if not (ROOT / "bench" / "node_modules" / "ws").exists():
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--prefix", str(ROOT / "bench")],
            check=True,
            timeout=300,
        )
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
    for name in sorted(expected - {"capacity", "capacity-pg", "logins"}):
        for system, runs in scenarios[name]["runs"].items():
            (run,) = runs
            assert run["complete"], (name, system, run)
            assert run["deliveries"] == run["expected"] > 0, (name, system)
            assert run["errors"] == 0
    medians = scenarios["burst"]["medians"]
    assert medians["deliveries_per_s"]["wsfanout"] > 0
    assert medians["deliveries_per_s"]["baseline"] > 0
    capacity = scenarios["capacity"]["medians"]
    assert capacity["handshakes_per_s"]["wsfanout"] > 0
    assert capacity["rss_kib_per_conn"]["wsfanout"] > 0
    logins = scenarios["logins"]
    assert set(logins["runs"]) == ({"wsfanout", "wsfanout-pg"} if with_postgres else {"wsfanout"})
    for system, runs in logins["runs"].items():
        (run,) = runs
        assert run["logins"] > 0, (system, run)
        assert run["errors"] == 0, (system, run["failures"])
    if with_postgres:
        assert scenarios["capacity-pg"]["medians"]["handshakes_per_s"]["wsfanout-pg"] > 0
        assert logins["medians"]["logins_per_s"]["wsfanout-pg"] > 0
        found = re.search(r"database (wsfanout_bench_[0-9a-f]+) ", result.stdout)
        assert found is not None, result.stdout
        assert not database_exists(found[1])
