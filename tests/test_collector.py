"""WSFANOUT_GC (collector.py): wsfanout tunes Python's garbage collector in a process of its own,
and leaves a host's process as it is unless the host asks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.server import ROOT, SERVERS, Server, http
from tests.test_metrics import samples
from wsfanout.collector import THRESHOLDS


def frozen_and_collections(server: Server) -> tuple[float, float]:
    status, headers = http("GET", server.http_url + "/metrics")
    assert status == 200
    found = samples(headers["_body"].encode())
    full = found[("wsfanout_gc_collections_total", (("generation", "2"),))]
    return found[("wsfanout_gc_frozen_objects", ())], full


@pytest.mark.parametrize("server_kind", SERVERS)
@pytest.mark.parametrize("mode", ["", "untouched"])
def test_a_process_of_its_own_is_tuned_unless_told_not_to(
    tmp_path: Path, demo_db: Path, server_kind: str, mode: str
) -> None:
    """``hypercorn wsfanout:app`` and ``uvicorn wsfanout:app`` (WSFANOUT_GC unset: auto, the
    default) freeze what start-up left, as /metrics shows; ``untouched`` freezes nothing."""
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    env = {"WSFANOUT_GC": mode} if mode else {}
    with Server(tmp_path, env, server=server_kind).running() as server:
        frozen, _full = frozen_and_collections(server)
    if mode == "untouched":
        assert frozen == 0
    else:
        assert frozen > 10_000  # the modules and the service, at least
    log = server.log_path.read_text()
    assert ("garbage collector tuned" in log) is (mode != "untouched"), log


HOST = """
import asyncio, gc, json, sys
from pathlib import Path
from wsfanout import Settings, create_app

async def main():
    before = gc.get_threshold()
    settings = Settings(data_dir=Path(sys.argv[1]), secret_keys=("k" * 32,), gc=sys.argv[2])
    app = create_app(settings)
    await app.startup()
    try:
        print(json.dumps({"before": before, "after": gc.get_threshold(),
                          "frozen": gc.get_freeze_count()}))
    finally:
        await app.shutdown()

asyncio.run(main())
"""


@pytest.mark.parametrize("mode", ["auto", "tuned"])
def test_a_hosts_process_is_tuned_only_when_the_host_asks(tmp_path: Path, mode: str) -> None:
    """An app a host builds with create_app() in its own process: ``auto`` leaves the host's
    collector as it found it; ``tuned`` freezes and raises the thresholds."""
    script = tmp_path / "host.py"
    script.write_text(textwrap.dedent(HOST))
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path), mode],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    if mode == "auto":
        assert found["after"] == found["before"] and found["frozen"] == 0, found
    else:
        assert tuple(found["after"]) == THRESHOLDS and found["frozen"] > 10_000, found


def test_an_unknown_mode_stops_the_start(tmp_path: Path) -> None:
    """WSFANOUT_GC takes auto, tuned or untouched; anything else is named at start."""
    done = subprocess.run(
        [sys.executable, "-m", "wsfanout.cli", "serve", "--bind", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "WSFANOUT_GC": "off", "WSFANOUT_DATA_DIR": str(tmp_path)},
        check=False,
    )
    assert done.returncode != 0
    assert "WSFANOUT_GC" in done.stderr + done.stdout, done.stderr
