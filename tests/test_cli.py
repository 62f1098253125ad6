"""cli: the wsfanout command, run as a user would, in a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

WSFANOUT = Path(sys.executable).parent / "wsfanout"  # the installed console script


def run(data_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(WSFANOUT), *args],
        env={**os.environ, "WSFANOUT_DATA_DIR": str(data_dir), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_db_init_creates_the_database(tmp_path: Path) -> None:
    """db init creates the data dir, the file and the schema."""
    result = run(tmp_path / "new", "db", "init")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "new" / "wsfanout.sqlite3").exists()
    assert "database ready" in result.stdout


def test_users_and_groups(tmp_path: Path) -> None:
    """group add and user add work, and their mistakes are one-line errors with exit 1."""
    assert run(tmp_path, "group", "add", "chess").returncode == 0
    ok = run(
        tmp_path,
        "user",
        "add",
        "bob",
        "--password",
        "pw",
        "--first-name",
        "Bob",
        "--group",
        "chess",
    )
    assert ok.returncode == 0, ok.stderr
    assert "user 'bob' created in chess" in ok.stdout
    cases = [
        (("group", "add", "chess"), "a group named 'chess' already exists"),
        (("user", "add", "BOB", "--password", "pw"), "a user named 'BOB' already exists"),
        (("user", "add", "eve", "--password", "pw", "--group", "nope"), "no group named 'nope'"),
        (("user", "add", "bad name", "--password", "pw"), "invalid username 'bad name'"),
        (("user", "add", "eve"), "give --password"),
        (("user", "add", "eve", "--password", ""), "must not be empty"),
    ]
    for args, message in cases:
        result = run(tmp_path, *args)
        assert result.returncode == 1, args
        assert result.stderr.startswith("wsfanout: error: ") and message in result.stderr, (
            result.stderr
        )
        assert "Traceback" not in result.stderr
        assert result.stderr.count("\n") == 1


def test_demo_is_idempotent(tmp_path: Path) -> None:
    """demo creates the six users once; a rerun changes nothing and says so."""
    first = run(tmp_path, "demo")
    assert first.returncode == 0, first.stderr
    assert "greg, chuck, mike, amanda, lisa, anny" in first.stdout
    again = run(tmp_path, "demo")
    assert again.returncode == 0 and "already exist" in again.stdout


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WSFANOUT_OUTBOX_BYTES": "huge"}, "WSFANOUT_OUTBOX_BYTES='huge'"),
        ({"WSFANOUT_DATABASE": "/proc/nope/x.sqlite3"}, "cannot open database"),
    ],
)
def test_bad_settings_and_paths(tmp_path: Path, env: dict[str, str], message: str) -> None:
    """A bad variable or an unusable database path is a clear one-line error."""
    result = run(tmp_path, "db", "init", **env)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    """An unknown command prints usage and exits 2."""
    result = run(tmp_path, "frobnicate")
    assert result.returncode == 2 and "usage:" in result.stderr


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something else is already listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["serve", "--bind", "nonsense"], {}, "--bind 'nonsense': expected HOST:PORT"),
        (["serve", "--bind", "no-such-host.invalid:8000"], {}, "cannot listen on"),
        (["serve", "--bind", "127.0.0.1:TAKEN"], {}, "cannot listen on 127.0.0.1:"),
        (["serve", "--ping-interval", "-5"], {}, "--ping-interval must be 0"),
        (["serve"], {"WSFANOUT_REDIS_URL": "http://x"}, "WSFANOUT_REDIS_URL='http://x'"),
        (["serve"], {"WSFANOUT_DATA_DIR": "FILE"}, "cannot"),
        (["publish", "hi", "--key", "k", "--url", "notaurl"], {}, "--url 'notaurl'"),
    ],
)
def test_serve_and_publish_refuse_clearly(
    tmp_path: Path, taken_port: int, args: list[str], env: dict[str, str], message: str
) -> None:
    """A bad address, a taken port, a bad setting or path: one line, exit 1, nothing served."""
    plain_file = tmp_path / "a-file"
    plain_file.write_text("not a directory")
    args = [a.replace("TAKEN", str(taken_port)) for a in args]
    env = {k: str(plain_file) if v == "FILE" else v for k, v in env.items()}
    result = run(tmp_path / "data", *args, **env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert "wsfanout serving on" not in result.stdout
