"""The documentation's code blocks, as the tests read and run them.

A block a reader would paste follows a marker naming the test that runs it::

    <!-- run: tests/test_docs.py::test_managing_users -->
    ```sh
    wsfanout db init
    ```

That test reads it with ``block(page, "test_managing_users")`` (``tests/test_docs.py`` checks
both halves of the link), substitutes what must be its own (a port, a database name, a
queue) with ``substituted``, and runs it: shell blocks with ``run_shell``, under bash as a
reader would, servers a block starts kept in the background until ``/healthz`` answers.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import termios
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # the venv running the tests: wsfanout, hypercorn, ...

MARKER = re.compile(r"<!-- run: (tests/\w+\.py)::(\w+) -->")
FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)")
# Blocks that are not commands, allowed without a marker: protocol frames (json), program
# output and diagrams (text, or no language at all).
NOT_PASTED = frozenset({"json", "text", ""})


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: str  # relative to the repository, as "docs/publishing.md"
    line: int  # of the opening fence, from 1
    language: str
    text: str
    test: tuple[str, str] | None  # the marker on the line before: (test file, test name)


def pages() -> list[str]:
    """README.md and every page of the docs site."""
    site = sorted(path.relative_to(ROOT).as_posix() for path in (ROOT / "docs").rglob("*.md"))
    return ["README.md", *site]


def blocks_of(page: str) -> list[Block]:
    """Every fenced block of ``page``, in order."""
    lines = (ROOT / page).read_text().splitlines()
    found, index = [], 0
    while index < len(lines):
        fence = FENCE.match(lines[index])
        if fence is None:
            index += 1
            continue
        end = index + 1
        while end < len(lines) and not lines[end].startswith(fence.group(1)):
            end += 1
        marker = MARKER.fullmatch(lines[index - 1].strip()) if index else None
        text = "".join(line + "\n" for line in lines[index + 1 : end])
        test = (marker.group(1), marker.group(2)) if marker else None
        found.append(Block(page, index + 1, fence.group(2), text, test))
        index = end + 1
    return found


def blocks(page: str, test: str) -> list[str]:
    """The blocks of ``page`` marked as run by ``test`` (in any test file), in order."""
    found = [b.text for b in blocks_of(page) if b.test is not None and b.test[1] == test]
    assert found, f"{page} has no block marked <!-- run: ...::{test} -->"
    return found


def block(page: str, test: str) -> str:
    """The one block of ``page`` marked as run by ``test``."""
    found = blocks(page, test)
    assert len(found) == 1, f"{page} has {len(found)} blocks marked for {test}, not one"
    return found[0]


def substituted(text: str, changes: dict[str, str]) -> str:
    """``text`` with each key replaced by its value, in order; every key must occur, so that
    a changed page fails the test rather than run the reader's own addresses."""
    for old, new in changes.items():
        assert old in text, f"{old!r} is no longer in the block:\n{text}"
        text = text.replace(old, new)
    return text


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def without_comment(line: str) -> str:
    """A shell line without its trailing ``# comment`` (a ``#`` outside quotes, after a
    blank or at the start)."""
    quote = ""
    for index, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index].rstrip()
    return line.rstrip()


def commands(script: str) -> list[str]:
    """The block's commands: comments dropped, continued lines joined, blank lines gone."""
    joined, pending = [], ""
    for raw in script.splitlines():
        line = without_comment(raw)
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        if (pending + line).strip():
            joined.append((pending + line).strip())
        pending = ""
    assert not pending, f"a continued line ends the block:\n{script}"
    return joined


SERVER = re.compile(r"^(?:\w+=\S+\s+)*(?:hypercorn|uvicorn|wsfanout serve|just serve)\b")
PORT = re.compile(r"127\.0\.0\.1:(\d+)|--port (\d+)")

PRELUDE = """\
set -euo pipefail
set -m  # each server started in the background is a process group of its own
__servers=()
__stop_all() { for p in "${__servers[@]}"; do kill -TERM -- "-$p" 2>/dev/null || true; done; }
trap __stop_all EXIT
trap 'exit 143' TERM
__serve() {  # pid port: wait for /healthz on port (say what it answers), then stop the server
    local pid=$1 port=$2 tries=0 answer
    __servers+=("$pid")
    until answer=$(curl -fsS --max-time 2 "http://127.0.0.1:$port/healthz" 2>/dev/null); do
        kill -0 "$pid" 2>/dev/null || { echo "the server exited before /healthz" >&2; exit 1; }
        tries=$((tries + 1)); [ "$tries" -lt 600 ] || { echo "no /healthz on $port" >&2; exit 1; }
        sleep 0.1
    done
    echo "@healthz $port $answer"
    kill -TERM -- "-$pid"
    wait "$pid" || true
    __servers=("${__servers[@]/$pid}")
}
"""


@dataclass(frozen=True)
class Ran:
    """What a shell block printed, and what each server it started said on /healthz."""

    output: str  # stdout (and stderr, on a terminal)
    errors: str  # stderr
    healthz: list[str]  # each server's /healthz body, in the order they started


def script_of(text: str) -> str:
    """A block as a bash script: each command that starts a server runs in the background
    until ``/healthz`` answers on its port (which the test substituted), then is stopped."""
    lines = [PRELUDE]
    for command in commands(text):
        if SERVER.match(command):
            ports = [int(a or b) for a, b in PORT.findall(command)]
            assert ports and 8000 not in ports, f"no port of the test's own in: {command}"
            lines.append(f"{command} &\n__serve $! {ports[-1]}")
        else:
            lines.append(command)
    return "\n".join(lines) + "\n"


def run_shell(
    text: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    path: tuple[Path, ...] = (VENV_BIN,),
    timeout: float = 120,
    answers: tuple[tuple[str, str], ...] = (),
) -> Ran:
    """Run a shell block under ``bash`` in ``cwd``, as a reader would: ``path`` first on
    PATH, no ``WSFANOUT_*`` variable but ``env``'s. With ``answers`` it runs on a terminal
    of its own, and each (prompt, reply) is typed once the prompt shows, in order: for
    commands that ask for a password. The test fails with the output unless every command
    succeeds."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("WSFANOUT_")}
    inherited.pop("VIRTUAL_ENV", None)
    search = os.pathsep.join([*map(str, path), os.environ["PATH"]])
    environment = {**inherited, "PATH": search, **(env or {})}
    handle, name = tempfile.mkstemp(prefix="block-", suffix=".sh")
    os.close(handle)
    script = Path(name)
    script.write_text(script_of(text))
    try:
        if answers:
            code, output, errors = _on_terminal(script, cwd, environment, timeout, answers)
        else:
            code, output, errors = _piped(script, cwd, environment, timeout)
    finally:
        script.unlink(missing_ok=True)
    assert code == 0, f"the block failed ({code}):\n{output}\n{errors}"
    healthz = [line.split(" ", 2)[2] for line in output.splitlines() if line.startswith("@healthz")]
    return Ran(output, errors, healthz)


def _piped(script: Path, cwd: Path, env: dict[str, str], timeout: float) -> tuple[int, str, str]:
    process = subprocess.Popen(
        ["bash", str(script)],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its servers' groups are its own; ours are told apart
    )
    try:
        output, errors = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # bash stops its servers on the way out
        output, errors = process.communicate(timeout=30)
        raise AssertionError(
            f"the block did not end within {timeout} s:\n{output}{errors}"
        ) from None
    return process.returncode, output, errors


def _on_terminal(
    script: Path,
    cwd: Path,
    env: dict[str, str],
    timeout: float,
    answers: tuple[tuple[str, str], ...],
) -> tuple[int, str, str]:
    """Run bash on a new pseudo-terminal (its controlling one, which getpass opens)."""
    main, side = pty.openpty()

    def control() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    process = subprocess.Popen(
        ["bash", str(script)],
        cwd=cwd,
        env=env,
        stdin=side,
        stdout=side,
        stderr=side,
        start_new_session=True,
        preexec_fn=control,
    )
    os.close(side)
    seen, pending = b"", list(answers)
    deadline = time.monotonic() + timeout
    try:
        while True:
            assert time.monotonic() < deadline, f"the block did not end: {seen.decode()}"
            ready, _, _ = select.select([main], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(main, 65536)
                except OSError:  # the terminal's last process is gone
                    chunk = b""
                if not chunk:
                    break
                seen += chunk
            if pending and seen.rstrip().endswith(pending[0][0].encode()):
                os.write(main, pending.pop(0)[1].encode() + b"\n")
    finally:
        os.close(main)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        code = process.wait(30)
    assert not pending, f"never asked {pending[0][0]!r}: {seen.decode()}"
    return code, seen.decode().replace("\r\n", "\n"), ""
