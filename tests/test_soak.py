"""bench/soak.py: the soak's harness runs end to end (a small pool for seconds), its verdict
fails on growth, and the soak page's commands are what its parser takes."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests import docs
from tests.server import bench_node_modules

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import soak  # noqa: E402 - the repository's root first

NEEDS_NODE = pytest.mark.skipif(
    shutil.which("node") is None and os.environ.get("CI") != "true",
    reason="the soak's clients need Node.js (node, npm)",
)


def args(*extra: str) -> argparse.Namespace:
    parsed = soak.parser().parse_args(list(extra))
    parsed.warmup = 20.0
    return parsed


def samples(rss: list[float], fds: list[int], conns: int = 100) -> list[dict[str, Any]]:
    clients = {"p99_ms": 5.0}
    return [
        {
            "t": 10.0 * (i + 1),
            "clients": clients,
            "nodes": [{"rss_mib": r, "fds": f, "tasks": 400, "conns": conns}],
        }
        for i, (r, f) in enumerate(zip(rss, fds, strict=True))
    ]


IDLE = [{"rss_mib": 100.0, "fds": 30, "tasks": 8, "conns": 0}]
END = {"totals": {"delivered": 10, "expected": 10}}


@pytest.mark.parametrize(
    ("rss", "fds", "after_fds", "failure"),
    [
        ([200.0] * 10, [130] * 10, 30, None),
        ([200.0 + 5 * i for i in range(10)], [130] * 10, 30, "RSS grew"),
        ([200.0] * 10, [130 + 10 * i for i in range(10)], 30, "besides its connections grew"),
        ([200.0] * 10, [130] * 4 + [400] + [130] * 5, 30, "descriptors besides"),
        ([200.0] * 10, [130] * 10, 60, "fds after every client left"),
    ],
)
def test_the_verdict(rss: list[float], fds: list[int], after_fds: int, failure: str | None) -> None:
    """Flat memory and descriptors pass; RSS or descriptors growing past their bounds over the
    samples after the warm-up, descriptors beyond the connections, or descriptors left behind
    once the clients are gone, fail."""
    after = [{**IDLE[0], "fds": after_fds}]
    result = soak.judge(args("--churn", "10"), 1, samples(rss, fds), IDLE, after, END)
    if failure is None:
        assert result["failures"] == []
    else:
        assert any(failure in found for found in result["failures"]), result["failures"]


def test_descriptors_may_follow_the_connections() -> None:
    """Descriptors that rise and fall with the connections open (the pool refilling after
    the churn outran the handshakes) are no leak: what must stay flat is the rest."""
    rising = samples([200.0] * 10, [130] * 10)
    for i, sample in enumerate(rising):
        sample["nodes"][0]["conns"] = 100 + 10 * i
        sample["nodes"][0]["fds"] = 130 + 10 * i
    result = soak.judge(args("--churn", "10"), 1, rising, IDLE, IDLE, END)
    assert result["failures"] == []
    assert result["slopes_per_s"][0]["fds"] == pytest.approx(1.0)
    assert result["slopes_per_s"][0]["fds_besides"] == pytest.approx(0.0)


def test_the_verdict_counts_what_was_owed() -> None:
    """A run that delivered less than it owed fails, however flat its curves."""
    short = {"totals": {"delivered": 9, "expected": 10}}
    result = soak.judge(args(), 1, samples([200.0] * 5, [130] * 5), IDLE, IDLE, short)
    assert result["failures"] == ["delivered 9 of 10 owed (90.0000%; at least 99.90%)"]


def test_the_soak_commands() -> None:
    """The soak page's commands are not run here (ten minutes each): each ``just soak``
    line's arguments are read by bench/soak.py's own parser, and ``just`` takes them."""
    commands = docs.commands(docs.block("docs/soak.md", "test_the_soak_commands"))
    assert any(shlex.split(c)[:2] == ["just", "soak"] for c in commands)
    for command in commands:
        words = shlex.split(command)
        assert words[:2] == ["just", "soak"], command
        soak.parser().parse_args(words[2:])
        if shutil.which("just"):
            subprocess.run(
                ["just", "--dry-run", *words[1:]], cwd=ROOT, check=True, capture_output=True
            )


@NEEDS_NODE
@pytest.mark.slow(23)
@pytest.mark.timeout(180)
def test_a_short_soak(tmp_path: Path) -> None:
    """A small pool churning for a few seconds on one node, through the JavaScript client:
    every message owed arrives, descriptors and tasks come back once the clients leave,
    and the verdict passes (exit 0)."""
    bench_node_modules()
    out = tmp_path / "soak.json"
    command = [
        sys.executable,
        str(ROOT / "bench" / "soak.py"),
        *("--nodes", "1", "--duration", "8", "--interval", "2", "--grace", "6"),
        *("--connections", "200", "--users", "100", "--churn", "20"),
        *("--broadcasts", "5", "--group-messages", "50", "--json", str(out)),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=150, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "1 node: PASS" in done.stdout
    (result,) = json.loads(out.read_text())["results"]
    totals = result["totals"]
    assert totals["expected"] > 0 and totals["delivered"] == totals["expected"]
    assert totals["connects"] >= 200 and totals["disconnects"] > 0 and totals["lost"] == 0
    assert len(result["samples"]) >= 3
    assert all(s["nodes"][0]["conns"] > 0 for s in result["samples"][:-1])
    assert "- verdict: **pass**" in soak.markdown([result])
