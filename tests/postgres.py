"""PostgreSQL for tests: a database of the run's own on the machine's server (127.0.0.1:5432,
user postgres, trust auth), a schema of each test's own in it, and whole clusters of a test's
own (``initdb``/``pg_ctl`` on a free port) for the tests that stop the server.

Without a server the tests that need one skip with the reason, except under CI=true, where
they fail. Nothing of the shared server's other databases is touched: the run's database is
dropped at the end.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

T = TypeVar("T")

HOST = "127.0.0.1"
PORT = 5432
ADMIN_URL = f"postgresql://postgres@{HOST}:{PORT}/postgres"


def reachable() -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, PORT), timeout=1):
        return True
    return False


def need_postgres() -> None:
    """Skip (fail under CI=true) unless the machine's PostgreSQL answers."""
    if reachable():
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"PostgreSQL is not running on {HOST}:{PORT}, and CI=true requires it")
    pytest.skip(f"PostgreSQL is not running on {HOST}:{PORT} (start it to run these)")


def in_thread(work: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
    """Run ``work(*args)`` to the end in an event loop of a thread of its own (a running
    event loop may be asking: fixtures of async tests)."""
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        return thread.submit(lambda: asyncio.run(work(*args))).result()


async def _statements(url: str, *statements: str) -> None:
    connection = await asyncpg.connect(url, timeout=10)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


def _admin(url: str, *statements: str) -> None:
    in_thread(_statements, url, *statements)


@contextlib.contextmanager
def _made(url: str, kind: str, name: str, drop_option: str) -> Iterator[None]:
    """``CREATE <kind> name`` on the server at ``url``; dropped (with ``drop_option``) after."""
    _admin(url, f'CREATE {kind} "{name}"')
    try:
        yield
    finally:
        _admin(url, f'DROP {kind} IF EXISTS "{name}" {drop_option}')


@contextlib.contextmanager
def run_database() -> Iterator[str]:
    """A database of this test run's own on the machine's server; its URL. Dropped after."""
    name = f"wsfanout_test_{uuid.uuid4().hex[:12]}"
    with _made(ADMIN_URL, "DATABASE", name, "WITH (FORCE)"):
        yield f"postgresql://postgres@{HOST}:{PORT}/{name}"


@contextlib.contextmanager
def schema(database_url: str) -> Iterator[str]:
    """A schema of one test's own in the run's database; the URL that uses it."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with _made(database_url, "SCHEMA", name, "CASCADE"):
        yield f"{database_url}?search_path={name}"


def _tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)
    return str(candidates[0]) if candidates else None


class Cluster:
    """A PostgreSQL server of a test's own: ``initdb`` into a temporary folder, ``pg_ctl``
    to start and stop it on a free port. As root, the server runs as the ``postgres`` user
    (PostgreSQL refuses to run as root)."""

    def __init__(self) -> None:
        initdb, pg_ctl = _tool("initdb"), _tool("pg_ctl")
        if initdb is None or pg_ctl is None:
            if os.environ.get("CI") == "true":
                pytest.fail("initdb/pg_ctl are not installed, and CI=true requires them")
            pytest.skip("initdb/pg_ctl are not installed (apt-get install postgresql)")
        self._initdb, self._pg_ctl = initdb, pg_ctl
        self.folder = Path(tempfile.mkdtemp(prefix="wsfanout-pg-"))
        self.data = self.folder / "data"
        with socket.socket() as probe:
            probe.bind((HOST, 0))
            self.port = probe.getsockname()[1]
        self.url = f"postgresql://postgres@{HOST}:{self.port}/postgres"
        self._as: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
            self._as = ["runuser", "-u", "postgres", "--"]
        self._run(self._initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "-N")

    def _run(self, *command: str) -> None:
        subprocess.run(
            [*self._as, *command],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=120,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses={HOST} -c fsync=off"
        self._run(
            self._pg_ctl,
            "-D",
            str(self.data),
            "-l",
            str(self.folder / "log"),
            "-o",
            options,
            "-w",
            "start",
        )

    def stop(self) -> None:
        """Stop at once (``-m fast``: clients are told the server is shutting down)."""
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run(self._pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop")

    def wait_stopped(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), 0.2):
                time.sleep(0.05)
                continue
            return

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
