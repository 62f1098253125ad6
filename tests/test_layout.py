"""The shape DESIGN section 3 promises: no module over 500 lines, and no branch on a missing
backplane (the layering itself is checked by `lint-imports` in `just lint`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import wsfanout

SRC = Path(wsfanout.__file__).parent
MAX_LINES = 500


def _modules() -> list[Path]:
    return sorted(path for path in SRC.rglob("*.py") if "web" not in path.relative_to(SRC).parts)


@pytest.mark.parametrize("path", _modules(), ids=lambda path: str(path.relative_to(SRC)))
def test_no_module_is_over_500_lines(path: Path) -> None:
    """A module past 500 lines has found a second job (DESIGN section 3)."""
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(SRC)} has {lines} lines"


def test_the_hub_never_asks_whether_there_is_a_backplane() -> None:
    """One interface, an engine per backend: nothing branches on a missing backplane."""
    pattern = re.compile(r"backplane\s+is\s+(not\s+)?None")
    found = [
        f"{path.relative_to(SRC)}:{number}"
        for path in _modules()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert found == []
