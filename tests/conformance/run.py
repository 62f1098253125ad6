"""``just conformance``: the Autobahn|Testsuite fuzzingclient against the echo app (echo.py),
served through wsfanout's own server adapters (serve.py) under hypercorn and uvicorn, with
compression off (cases 1-7, 9, 10) and on (the same, plus 12 and 13: permessage-deflate).

    python -m tests.conformance.run [--fast] [--server hypercorn|uvicorn] [--compression off|on]

The fuzzingclient (``wstest``, Python 2.7) is installed on first use into ``.autobahn/venv``
(git-ignored), a virtualenv of pyenv's Python 2.7.18 (``$AUTOBAHN_PYTHON2`` to name another),
with the pins of its upstream requirements (requirements-py27.txt). Its reports go to
``.autobahn/reports/AGENT/`` (index.html; AGENT: ``hypercorn-compression-off`` and so on).
Prints a table of results (server, compression, case group: how many cases OK, NON-STRICT,
INFORMATIONAL, UNIMPLEMENTED, FAILED) and exits 1 if any case FAILED or UNIMPLEMENTED,
was not run, or a server logged a traceback.

The echo app's frame limit is raised to 16 MiB for the run (``WSFANOUT_MAX_FRAME_BYTES``):
case 9 echoes messages of up to 16 MiB, which the default limit (64 KiB) refuses with 1009
by design. The bounding code runs all the same (hypercorn's ``Frames``, the bounded deflate,
uvicorn's ``ws_max_size``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

ROOT: Final = Path(__file__).resolve().parents[2]
HERE: Final = Path(__file__).resolve().parent
HOME: Final = ROOT / ".autobahn"  # git-ignored: the virtualenv, the reports, the server logs
VENV: Final = HOME / "venv"
REQUIREMENTS: Final = HERE / "requirements-py27.txt"
VIRTUALENV: Final = "virtualenv==20.15.1"  # the last releases that run on Python 2.7
SERVERS: Final = ("hypercorn", "uvicorn")
COMPRESSION: Final = ("off", "on")
FRAME_LIMIT: Final = 16 * 1024 * 1024  # case 9's largest message
BEHAVIOURS: Final = ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED")

# The cases each run asks for, by compression: fuzzingclient patterns, each item (its
# patterns separated by spaces) one run of the fuzzingclient.
CASES: Final = {
    "off": ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*", "10.*"],
    "on": [
        *("1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*", "10.*"),
        *(f"12.{n}.*" for n in range(1, 6)),  # 18 cases each, of 1000 messages
        *(f"13.{n}.*" for n in range(1, 8)),
    ],
}
# --fast (CI): with compression off, every case of groups 1-7 and 10, and case 9's smaller
# messages and fragments (its 1-16 MiB ones take most of a run); with compression on, the
# first case of each of 12's and 13's sets (the client offers deflate in those only: the
# rest would run as with compression off).
FAST_EXCLUDED: Final = [
    "9.1.4", "9.1.5", "9.1.6", "9.2.4", "9.2.5", "9.2.6",  # 4, 8, 16 MiB messages
    "9.3.1", "9.3.2", "9.4.1", "9.4.2",  # 4 MiB in 64- and 256-byte fragments
    "9.5.*", "9.6.*", "9.7.*", "9.8.*",  # 1 MiB in chunks, 1000 messages each
]  # fmt: skip
FAST_CASES: Final = {
    "off": CASES["off"],
    "on": [" ".join([f"12.{n}.1" for n in range(1, 6)] + [f"13.{n}.1" for n in range(1, 8)])],
}


def parser() -> argparse.ArgumentParser:
    """The command line of ``just conformance``."""
    parser = argparse.ArgumentParser(
        prog="just conformance", description=__doc__.splitlines()[0].strip("`: ")
    )
    parser.add_argument("--fast", action="store_true", help="the CI subset (a few minutes)")
    parser.add_argument(
        "--server", choices=SERVERS, action="append", help="one server (default: both)"
    )
    parser.add_argument(
        "--compression", choices=COMPRESSION, action="append", help="off or on (default: both)"
    )
    parser.add_argument(
        "--cases", nargs="+", help="fuzzingclient case patterns (6.4.* 7.5.1), each run alone"
    )
    parser.add_argument("--json", type=Path, help="also write the counts here")
    parser.add_argument(
        "--report", action="store_true", help="run nothing: the table of the last runs' reports"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    options = parser().parse_args(argv)
    # Stopped (SIGTERM, as by CI's time limit): the fuzzingclient and the server stop too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    results: list[Run] = []
    if options.report:
        results = reported()
    else:
        wstest = install()
        for server in options.server or SERVERS:
            for compression in options.compression or COMPRESSION:
                cases = options.cases or (FAST_CASES if options.fast else CASES)[compression]
                excluded = FAST_EXCLUDED if options.fast and not options.cases else []
                results.append(fuzz(wstest, server, compression, cases, excluded))
    if not results:
        print("no results: nothing ran (or, with --report, no reports in .autobahn/reports)")
        return 1
    print()
    print(table(results))
    problems = [problem for run in results for problem in run.problems()]
    if options.json:
        options.json.write_text(json.dumps([run.summary() for run in results], indent=2) + "\n")
    if problems:
        print("\nNot conformant:", *problems, sep="\n  ")
        return 1
    print(f"\nconformant: {sum(len(run.cases) for run in results)} cases, none failed")
    return 0


# Installing the fuzzingclient


def install() -> Path:
    """``wstest`` in .autobahn/venv, installed first if needed (a stamp per requirements)."""
    wstest = VENV / "bin" / "wstest"
    stamp = VENV / ".installed"
    pins = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    if wstest.exists() and stamp.exists() and stamp.read_text() == pins:
        return wstest
    python2 = find_python2()
    HOME.mkdir(exist_ok=True)
    shutil.rmtree(VENV, ignore_errors=True)
    log = HOME / "install.log"
    print(f"installing the Autobahn|Testsuite fuzzingclient into {VENV} (about 90 s, once)")
    with log.open("w") as out, tempfile.TemporaryDirectory() as tools:

        def step(what: str, *command: str | Path, env: dict[str, str] | None = None) -> None:
            print(f"  {what}", flush=True)
            out.flush()
            done = subprocess.run(
                [str(part) for part in command], stdout=out, stderr=subprocess.STDOUT, env=env
            )
            if done.returncode:
                out.flush()
                tail = log.read_text().splitlines()[-20:]
                sys.exit(f"installing the fuzzingclient failed ({what}):\n" + "\n".join(tail))

        pip = ("-m", "pip", "install", "--disable-pip-version-check", "--no-warn-script-location")
        step(f"virtualenv for {python2}", python2, *pip, "--target", tools, VIRTUALENV)
        env = {**os.environ, "PYTHONPATH": tools}
        step("a Python 2.7 virtualenv", python2, "-m", "virtualenv", "--no-periodic-update",
             VENV, env=env)  # fmt: skip
        venv_python = VENV / "bin" / "python"
        # Twisted's build needs incremental first, as in upstream's Dockerfile
        step("incremental (for Twisted's build)", venv_python, *pip, "incremental==16.10.1")
        step("autobahntestsuite and its pinned requirements (Twisted builds)", venv_python,
             *pip, "-r", REQUIREMENTS)  # fmt: skip
    stamp.write_text(pins)
    return wstest


def find_python2() -> Path:
    """Python 2.7: ``$AUTOBAHN_PYTHON2``, else pyenv's 2.7.18, else ``python2.7`` on PATH."""
    named = os.environ.get("AUTOBAHN_PYTHON2")
    if named:
        return Path(named)
    roots = [os.environ.get("PYENV_ROOT"), Path.home() / ".pyenv", "/root/.pyenv"]
    for root in roots:
        if root:
            candidate = Path(root) / "versions" / "2.7.18" / "bin" / "python"
            if candidate.exists():
                return candidate
    found = shutil.which("python2.7")
    if found:
        return Path(found)
    sys.exit(
        "the fuzzingclient needs Python 2.7: none under ~/.pyenv/versions/2.7.18 nor on PATH "
        "(`pyenv install 2.7.18`, or name one in $AUTOBAHN_PYTHON2)"
    )


# One run: a server, a compression, the fuzzingclient


class Run:
    """The fuzzingclient's results for one server and compression."""

    def __init__(self, server: str, compression: str, cases: dict[str, dict[str, Any]]) -> None:
        self.server = server
        self.compression = compression
        self.cases = cases  # case id: the fuzzingclient's result (behavior, behaviorClose, ...)
        self.log = ""  # the server's log
        self.expected = 0  # how many cases were asked for (0: unknown)

    @property
    def agent(self) -> str:
        return f"{self.server}-compression-{self.compression}"

    def counts(self) -> dict[str, Counter[str]]:
        """Per case group ("1" ... "13"), how many cases of each behaviour."""
        groups: dict[str, Counter[str]] = {}
        for case, result in sorted(self.cases.items(), key=lambda item: _order(item[0])):
            groups.setdefault(case.split(".")[0], Counter())[behaviour(result)] += 1
        return groups

    def problems(self) -> list[str]:
        found = [
            f"{self.agent} {case}: {behaviour(result)} (behavior {result.get('behavior')}, "
            f"close {result.get('behaviorClose')}, code {result.get('remoteCloseCode')})"
            for case, result in sorted(self.cases.items(), key=lambda item: _order(item[0]))
            if behaviour(result) not in ("OK", "NON-STRICT", "INFORMATIONAL")
        ]
        if not self.cases:
            found.append(f"{self.agent}: no case ran")
        elif self.expected and len(self.cases) != self.expected:
            found.append(f"{self.agent}: {len(self.cases)} cases ran of {self.expected}")
        if "Traceback" in self.log:
            found.append(
                f"{self.agent}: the server logged a traceback (.autobahn/{self.agent}.log)"
            )
        return found

    def summary(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "compression": self.compression,
            "groups": {group: dict(counts) for group, counts in self.counts().items()},
            "problems": self.problems(),
        }


def behaviour(result: dict[str, Any]) -> str:
    """A case's result: its behaviour, FAILED where its closing behaviour failed."""
    if "FAILED" in (result.get("behavior"), result.get("behaviorClose")):
        return "FAILED"
    return str(result.get("behavior"))


def _order(case: str) -> tuple[int, ...]:
    return tuple(int(part) for part in case.split(".") if part.isdigit())


def fuzz(wstest: Path, server: str, compression: str, cases: list[str], excluded: list[str]) -> Run:
    """Serve the echo app, run the fuzzingclient's ``cases`` against it (one run of it per
    pattern, so that what finished is kept if a later one is stopped), stop the server."""
    run = Run(server, compression, {})
    reports = HOME / "reports" / run.agent
    shutil.rmtree(reports, ignore_errors=True)
    log_path = HOME / f"{run.agent}.log"
    print(f"{run.agent}: cases {' '.join(cases)}", flush=True)
    started = time.monotonic()
    with echo_server(server, compression, log_path) as port:
        for number, pattern in enumerate(cases):
            began = time.monotonic()
            outdir = reports / f"{number:02d}-{pattern.split()[0].replace('*', 'all')}"
            outdir.mkdir(parents=True)
            spec = {
                "options": {"failByDrop": True},
                "outdir": str(outdir),
                "servers": [{"agent": run.agent, "url": f"ws://127.0.0.1:{port}/"}],
                "cases": pattern.split(),
                "exclude-cases": excluded,
                "exclude-agent-cases": {},
            }
            spec_path = outdir / "spec.json"
            spec_path.write_text(json.dumps(spec, indent=2))
            wstest_log = outdir / "wstest.log"
            with wstest_log.open("w") as out:
                done = subprocess.run(
                    [str(wstest), "--mode", "fuzzingclient", "--spec", str(spec_path)],
                    cwd=outdir,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            found = read_reports(outdir, run.agent)
            run.cases.update(found)
            run.expected += _planned(wstest_log)
            if done.returncode:
                print(f"  wstest exited {done.returncode}: {wstest_log}")
            counts = Counter(behaviour(result) for result in found.values())
            took = time.monotonic() - began
            print(f"  {pattern}: {dict(counts)} in {took:.0f} s", flush=True)
    run.log = log_path.read_text()
    took = time.monotonic() - started
    counts = Counter(behaviour(result) for result in run.cases.values())
    print(f"  {len(run.cases)} cases in {took:.0f} s: {dict(counts)}", flush=True)
    return run


def read_reports(outdir: Path, agent: str) -> dict[str, dict[str, Any]]:
    """The results in one run's ``index.json`` (none if it did not finish)."""
    index = outdir / "index.json"
    if not index.exists():
        return {}
    results: dict[str, dict[str, Any]] = json.loads(index.read_text()).get(agent, {})
    return results


def reported() -> list[Run]:
    """The runs whose reports are in .autobahn/reports (``--report``), as far as they went."""
    runs = []
    for server in SERVERS:
        for compression in COMPRESSION:
            run = Run(server, compression, {})
            for outdir in sorted((HOME / "reports" / run.agent).glob("*")):
                run.cases.update(read_reports(outdir, run.agent))
            log = HOME / f"{run.agent}.log"
            run.log = log.read_text() if log.exists() else ""
            if run.cases:
                runs.append(run)
    return runs


def _planned(wstest_log: Path) -> int:
    """How many cases the fuzzingclient said it would run (0: it did not say)."""
    for line in wstest_log.read_text(errors="replace").splitlines():
        # "Autobahn Fuzzing WebSocket Client (Autobahn Version ... ) ... X test cases"
        words = line.split()
        if "cases" in words and "test" in words:
            for word in words:
                if word.isdigit():
                    return int(word)
    return 0


@contextlib.contextmanager
def echo_server(
    server: str, compression: str, log_path: Path, frame_limit: int = FRAME_LIMIT
) -> Iterator[int]:
    """The echo app under ``server`` on a socket bound to 127.0.0.1:0; yields its port."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    data_dir = tempfile.mkdtemp(prefix="wsfanout-conformance-")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "WSFANOUT_DATA_DIR": data_dir,
        "WSFANOUT_COMPRESSION": "1" if compression == "on" else "0",
        "WSFANOUT_MAX_FRAME_BYTES": str(frame_limit),
        "WSFANOUT_LOG_LEVEL": "info",
    }
    command = [sys.executable, "-m", "tests.conformance.serve", "--server", server]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*command, "--bind", f"fd://{sock.fileno()}"],
            pass_fds=[sock.fileno()],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    sock.close()
    try:
        _wait_healthy(proc, port, log_path)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(data_dir, ignore_errors=True)


def _wait_healthy(proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the echo server exited {proc.returncode}:\n{log_path.read_text()}")
        url = f"http://127.0.0.1:{port}/healthz"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as answer:
            if answer.status == 200:
                return
        time.sleep(0.1)
    sys.exit(f"the echo server did not start:\n{log_path.read_text()}")


# The table


def table(results: list[Run]) -> str:
    """A Markdown table: per server, compression and case group, how many of each behaviour."""
    head = ["server", "compression", "cases", *BEHAVIOURS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in results:
        for group, counts in run.counts().items():
            cells = [run.server, run.compression, f"{group}.*"]
            cells += [str(counts.get(name, 0) or "") for name in BEHAVIOURS]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
