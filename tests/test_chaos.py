"""The chaos run (bench/chaos/): its documented commands parse, and its audit finds each
way a message can go wrong in logs made by hand. The run itself takes minutes and its own
servers: CI runs it after `just test` (`just chaos --duration 60`)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import orjson

from tests import docs

sys.path.insert(0, str(docs.ROOT))

from bench.chaos import audit, population, run


def test_the_chaos_commands() -> None:
    """Every ``just chaos`` line of the page is read by the run's own parser (a full run
    takes 10 minutes; CI runs the 60-second one)."""
    lines = docs.commands(docs.block("docs/chaos.md", "test_the_chaos_commands"))
    assert lines
    for line in lines:
        words = shlex.split(line)
        assert words[:2] == ["just", "chaos"], line
        run.parser().parse_args(words[2:])


def write(path: Path, rows: list[list[Any]]) -> None:
    path.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in rows))


def test_the_audit_counts_each_way_a_message_goes_wrong(tmp_path: Path) -> None:
    """Two readers of one user, five acknowledged broadcasts: reader 0 gets m1 twice, skips
    m2 without a word, and is told it lost m3 and m4; reader 1 gets m1, m3, m2 (out of
    order), and never m4 or m5, though it stayed connected."""
    people = population.Population({"u0": ["g0"]}, [("u0", 0), ("u0", 1)])
    sent = [["p", f"m{i}", "ws", "all", float(i)] for i in range(1, 6)]
    write(
        tmp_path / "publishers.log", [*sent, *(["a", f"m{i}", i + 0.5, "ok"] for i in range(1, 6))]
    )
    start = {"all": ["e1", 0], "group:g0": ["e1", 0], "user:u0": ["e1", 0]}
    write(
        tmp_path / "readers0.log",
        [
            ["w", 0, 0.0, start],
            ["m", 0, 1.1, "all", 1, "m1"],
            ["m", 0, 1.2, "all", 1, "m1"],
            ["m", 0, 3.1, "all", 3, "m3"],  # 2 skipped: m2 silently lost
            ["w", 0, 9.0, {**start, "all": ["e2", 0]}],  # another epoch: m4, m5 ...
            ["r", 0, 9.0, False, ["all"], 0],  # ... reported lost
        ],
    )
    write(
        tmp_path / "readers1.log",
        [
            ["w", 1, 0.0, start],
            ["m", 1, 1.1, "all", 1, "m1"],
            ["m", 1, 3.1, "all", 3, "m3"],
            ["m", 1, 3.2, "all", 2, "m2"],
        ],
    )
    checked = audit.Audit(people)
    checked.publishers(tmp_path / "publishers.log")
    for log in ("readers0.log", "readers1.log"):
        checked.reader_log(tmp_path / log)
    counts = checked.judge()["counts"]
    assert counts["acknowledged"] == 5
    assert counts["expected deliveries"] == 10
    assert counts["delivered once"] == 5  # m1 (twice to reader 0), m3 twice, m2 to reader 1
    assert counts["duplicated"] == 1
    assert counts["out of order"] == 1
    assert counts["reported lost"] == 2  # m4 and m5 for reader 0, whose epoch changed
    # m2 for reader 0 (a gap); m4 and m5 for reader 1, which stands at 3 after the drain
    assert counts["silently lost"] == 3
    assert audit.main(tmp_path, people, 0, 0) == 1
