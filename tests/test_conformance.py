"""The Autobahn|Testsuite conformance run (tests/conformance, ``just conformance``): its echo
app, served through wsfanout's own server adapters, echoes and bounds as wsfanout does; its
table and verdict; the documented commands. The run itself is ``just conformance`` (CI runs
``just conformance --fast`` after ``just test``)."""

from __future__ import annotations

import asyncio
import shlex
import subprocess
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests import docs
from tests.conformance import run
from tests.server import ROOT
from wsfanout import protocol

PAGE = "docs/operating/conformance.md"


@pytest.mark.parametrize("compression", ["on"])
def test_the_echo_app_echoes_and_bounds(tmp_path: Path, server_kind: str, compression: str) -> None:
    """Under each server, compression off and on, the echo app sends back text as text and
    bytes as bytes, and answers a message over its frame limit with wsfanout's ``too_large``
    frame and 1009 (the bound the conformance run raises to 16 MiB)."""
    log = tmp_path / "server.log"

    async def talk(port: int) -> tuple[list[str | bytes], str | bytes, int | None, str | None]:
        async with connect(f"ws://127.0.0.1:{port}/", max_size=None) as ws:
            extensions = (
                ws.response.headers.get("Sec-WebSocket-Extensions") if ws.response else None
            )
            echoed = []
            for message in ("héllo", b"\x00\xff", "x" * 1000):
                await ws.send(message)
                echoed.append(await ws.recv())
            await ws.send("y" * 1025)
            explained = await ws.recv()
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
            code = closed.value.rcvd.code if closed.value.rcvd else None
            return echoed, explained, code, extensions

    with run.echo_server(server_kind, compression, log, frame_limit=1024) as port:
        echoed, explained, code, extensions = asyncio.run(talk(port))
    assert echoed == ["héllo", b"\x00\xff", "x" * 1000]
    assert explained == protocol.too_large(1024)
    assert code == 1009
    assert (extensions or "").startswith("permessage-deflate") == (compression == "on")
    assert "Traceback" not in log.read_text()


def test_the_verdict_counts_every_failure() -> None:
    """A case whose behaviour or closing behaviour FAILED, UNIMPLEMENTED, cases missing, or
    a traceback in the server's log each make the run not conformant; OK, NON-STRICT and
    INFORMATIONAL do not."""
    results = {
        "1.1.1": {"behavior": "OK", "behaviorClose": "OK"},
        "3.1": {"behavior": "NON-STRICT", "behaviorClose": "OK"},
        "7.1.6": {"behavior": "INFORMATIONAL", "behaviorClose": "INFORMATIONAL"},
    }
    good = run.Run("hypercorn", "off", dict(results))
    good.expected = 3
    assert good.problems() == []
    assert good.counts() == {
        "1": {"OK": 1},
        "3": {"NON-STRICT": 1},
        "7": {"INFORMATIONAL": 1},
    }
    bad = run.Run(
        "uvicorn", "on", {**results, "6.4.3": {"behavior": "OK", "behaviorClose": "FAILED"}}
    )
    bad.cases["12.1.1"] = {"behavior": "UNIMPLEMENTED", "behaviorClose": "OK"}
    bad.expected = 6
    bad.log = "Traceback (most recent call last):"
    problems = bad.problems()
    assert [p.split(":")[0] for p in problems] == [
        "uvicorn-compression-on 6.4.3",
        "uvicorn-compression-on 12.1.1",
        "uvicorn-compression-on",
        "uvicorn-compression-on",
    ], problems
    assert "5 cases ran of 6" in problems[2] and "traceback" in problems[3]
    table = run.table([good, bad])
    assert "| uvicorn | on | 6.* |  |  |  |  | 1 |" in table, table


def test_the_conformance_commands() -> None:
    """The conformance page's commands are not run here (``just conformance --fast`` runs in
    CI after ``just test``; a full run takes over an hour, most of it cases 12 and 13): each
    one's arguments are read by run.py's parser, and ``just`` knows the recipe
    (``just --dry-run``)."""
    page = "docs/operating/conformance.md"
    commands = docs.commands(docs.block(page, "test_the_conformance_commands"))
    assert any(c.startswith("just conformance") for c in commands), commands
    for command in commands:
        words = shlex.split(command)
        assert words[:2] == ["just", "conformance"], command
        run.parser().parse_args(words[2:])
        dry = subprocess.run(
            ["just", "--dry-run", *words[1:]], cwd=ROOT, capture_output=True, text=True
        )
        assert dry.returncode == 0 and "tests.conformance.run" in dry.stderr, dry


def test_the_documented_table_is_a_whole_run() -> None:
    """The page's results table is run.py's (its head), has rows for both servers, compression
    off and on, and shows no case FAILED or UNIMPLEMENTED."""
    page = (ROOT / PAGE).read_text()
    head = run.table([]).splitlines()
    assert "\n".join(head) in page
    rows = [line.split("|")[1:-1] for line in page.splitlines() if line.startswith("| hypercorn |")
            or line.startswith("| uvicorn |")]  # fmt: skip
    seen = {(server.strip(), compression.strip()) for server, compression, *_ in rows}
    assert seen == {(s, c) for s in run.SERVERS for c in run.COMPRESSION}, seen
    for row in rows:
        unimplemented, failed = row[-2:]
        assert not unimplemented.strip() and not failed.strip(), row
