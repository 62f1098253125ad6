"""service: what a node says as it starts, in its log, under a real server."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tests.server import RedisServer, Server, http

NO_USERS = "no users yet: run `wsfanout demo` or `wsfanout user add`"


@pytest.mark.parametrize(
    ("demo", "env", "said"),
    [
        (False, {}, 1),
        (True, {}, 0),
        (False, {"WSFANOUT_JWT_SECRET": "s" * 32}, 0),  # users may come with tokens
    ],
)
def test_a_store_without_users_says_how_to_make_some(
    tmp_path: Path, demo_db: Path, demo: bool, env: dict[str, str], said: int
) -> None:
    """A node whose store has no users says once how to create some, unless tokens make
    the store's users optional; a store with users says nothing of it."""
    if demo:
        shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    with Server(tmp_path, env).running() as server:
        log = server.log_path.read_text()
    assert log.count(NO_USERS) == said, log


def test_a_node_started_without_redis_says_it_is_degraded_until_redis_is_back(
    tmp_path: Path, demo_db: Path
) -> None:
    """Redis not running at start: the node starts (it must outlive Redis restarts), its
    ready line says what is degraded, logins answer 503; once a redis-server listens on
    that port the node says once that it is back, and logins work."""
    if shutil.which("redis-server") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is not installed, and CI=true requires it")
        pytest.skip("redis-server is not installed")
    redis = RedisServer(tmp_path)  # its port is free: nothing listens there yet
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    env = {"WSFANOUT_REDIS_URL": redis.url, "WSFANOUT_REDIS_PREFIX": "wsfanout-test-degraded:"}
    try:
        with Server(tmp_path, env, health_path="/login").running() as server:
            ready = [line for line in log_lines(server) if "wsfanout ready" in line]
            assert len(ready) == 1
            assert (
                f"(degraded: Redis at {redis.url} unreachable: " in ready[0]
                and "logins and publishing answer 503 until it is back)" in ready[0]
            ), ready
            assert login_status(server) == 503
            redis.start()
            back = "backplane connected again: logins and publishing work"
            deadline = time.monotonic() + 30  # the reconnect backoff grows to 5 s
            while not any(back in line for line in log_lines(server)):
                assert time.monotonic() < deadline, server.log_path.read_text()
                time.sleep(0.1)
            assert login_status(server) == 200
            assert sum(back in line for line in log_lines(server)) == 1
    finally:
        redis.stop()


def log_lines(server: Server) -> list[str]:
    return server.log_path.read_text().splitlines()


def login_status(server: Server) -> int:
    status, _ = http(
        "POST", server.http_url + "/login", {"username": "greg", "password": "Greg-demo"}
    )
    return status
