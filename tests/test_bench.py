"""bench: the benchmark harness itself runs end to end (tiny sizes, one repetition)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None and os.environ.get("CI") != "true",
    reason="the benchmark's load generator needs Node.js (node, npm)",
)


def test_quick_bench_measures_both_systems(tmp_path: Path) -> None:
    """`bench/run.py --quick` runs every scenario against wsfanout and the baseline."""
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
    expected = {"burst", "paced", "groups", "capacity"}
    if "skipping the redis scenario" not in result.stdout:
        expected.add("redis")  # two workers sharing fan-out through Redis
    assert set(scenarios) == expected
    for name in sorted(expected - {"capacity"}):
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
