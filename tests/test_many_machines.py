"""Many machines: nodes with data directories of their own sharing users, sessions, throttle
counts and fan-out through PostgreSQL and Redis; and a PostgreSQL that is down at start or
restarts while serving (a cluster of the test's own, never the machine's shared one).

Real hypercorn processes, the real ``wsfanout`` command, the machine's Redis (a prefix of the
test's own) and PostgreSQL (a schema of the test's own), as two machines would use them.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus

from tests import postgres
from tests.server import Client, Server, http, wsfanout

WSFANOUT = Path(sys.executable).parent / "wsfanout"
REDIS_URL = "redis://127.0.0.1:6379/0"
API_KEY = "many-machines-key"


def login(server: Server, username: str, password: str) -> tuple[int, dict[str, str]]:
    return http("POST", server.http_url + "/login", {"username": username, "password": password})


def wait_health(server: Server, want: int, timeout: float = 30) -> dict[str, object]:
    """Poll /healthz until it answers ``want``; its body."""
    deadline = time.monotonic() + timeout
    while True:
        status, headers = http("GET", server.http_url + "/healthz")
        body: dict[str, object] = json.loads(headers["_body"])
        if status == want:
            return body
        assert time.monotonic() < deadline, (status, body)
        time.sleep(0.1)


@pytest.fixture
def cluster() -> Iterator[postgres.Cluster]:
    """A PostgreSQL server of this test's own, initialized but not started."""
    own = postgres.Cluster()
    try:
        yield own
    finally:
        own.remove()


@pytest.mark.slow(11)
async def test_two_machines_share_users_sessions_throttle_and_messages(
    tmp_path: Path, pg_url: str, redis_prefix: str
) -> None:
    """Two nodes, each with a data directory of its own, one PostgreSQL and one Redis: a
    user added by the CLI on one machine logs in on the other; a cookie from one node works
    on the other; messages cross; failed logins count across both; no SQLite file is
    written anywhere."""
    shared = {
        "WSFANOUT_DATABASE_URL": pg_url,
        "WSFANOUT_REDIS_URL": REDIS_URL,
        "WSFANOUT_REDIS_PREFIX": redis_prefix,
    }
    machine_a, machine_b = tmp_path / "a", tmp_path / "b"
    for folder in (machine_a, machine_b):
        folder.mkdir()
    assert wsfanout(machine_a, "group", "add", "chess", **shared).returncode == 0
    added = wsfanout(
        machine_a, "user", "add", "bob", "--password", "password-1", "--group", "chess", **shared
    )
    assert added.returncode == 0, added.stderr
    added = wsfanout(
        machine_a, "user", "add", "eve", "--password", "password-2", "--group", "chess", **shared
    )
    assert added.returncode == 0, added.stderr
    status = wsfanout(machine_b, "db", "status", **shared)
    assert status.returncode == 0, status.stderr
    assert "PostgreSQL" in status.stdout and "2 users, 1 groups" in status.stdout

    with (
        Server(machine_a, shared).running() as a,
        Server(machine_b, shared).running() as b,
    ):
        cookie = b.login("bob", "password-1")  # created on machine A, logs in on B
        eve = a.login("eve", "password-2")
        bob_on_a = await Client.open(a.ws_url, cookie)  # B's cookie, A's socket
        eve_on_b = await Client.open(b.ws_url, eve)
        try:
            assert (await bob_on_a.next_of("welcome"))["user"] == "bob"
            await eve_on_b.next_of("welcome")
            await bob_on_a.send({"type": "group", "group": "chess", "text": "from A"})
            got = await eve_on_b.next_of("message")
            assert (got["text"], got["from"]) == ("from A", "bob")
        finally:
            await bob_on_a.close()
            await eve_on_b.close()

        # The throttle: 5 failures per name and address, wherever they land.
        for node in (a, b, a, b, a):
            assert login(node, "bob", "wrong")[0] == 401
        for node in (b, a):
            refused, headers = login(node, "bob", "password-1")
            assert refused == 429, headers["_body"]
    written = await asyncio.to_thread(lambda: [p.name for p in tmp_path.rglob("*.sqlite3*")])
    assert written == []


@pytest.mark.slow(15)
async def test_postgres_down_at_start_then_restarted_while_serving(
    tmp_path: Path, cluster: postgres.Cluster
) -> None:
    """The database down at start: the CLI says so in one line and exits 1; the service
    starts anyway, /healthz fails, and it reaches the database by itself once it is up.
    The database restarted while serving: logins and new handshakes get 503 meanwhile, the
    open sockets stay open and keep receiving, and all recovers without a restart."""
    env = {"WSFANOUT_DATABASE_URL": cluster.url, "WSFANOUT_API_KEYS": API_KEY}
    refused = wsfanout(tmp_path, "user", "add", "bob", "--password", "password-1", **env)
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and f"127.0.0.1:{cluster.port}" in refused.stderr

    with Server(tmp_path, env, health_path="/login").running() as node:
        body = wait_health(node, 503)
        assert str(body["checks"]).count("failing") == 1, body
        cluster.start()
        wait_health(node, 200)
        for user in ("bob", "eve"):
            made = wsfanout(tmp_path, "user", "add", user, "--password", "password-1", **env)
            assert made.returncode == 0, made.stderr
        bob = node.login("bob", "password-1")
        eve = node.login("eve", "password-1")  # not used yet: no handshake has cached its session
        listener = await Client.open(node.ws_url, bob)
        try:
            await listener.next_of("welcome")
            cluster.stop()
            cluster.wait_stopped()
            assert login(node, "bob", "password-1")[0] == 503
            with pytest.raises(InvalidStatus) as caught:
                await Client.open(node.ws_url, eve)
            assert caught.value.response.status_code == 503
            body = wait_health(node, 503)
            published, _ = http(
                "POST",
                node.http_url + "/api/publish",
                {"type": "broadcast", "text": "still here"},
                {"authorization": f"Bearer {API_KEY}"},
            )
            assert published == 202
            assert (await listener.next_of("message"))["text"] == "still here"

            cluster.start()
            wait_health(node, 200)
            assert login(node, "bob", "password-1")[0] == 200
            second = await Client.open(node.ws_url, eve)
            try:
                assert (await second.next_of("welcome"))["user"] == "eve"
            finally:
                await second.close()
            await listener.send({"type": "broadcast", "text": "after"})
            assert (await listener.next_of("message"))["text"] == "after"
        finally:
            await listener.close()
    log = await asyncio.to_thread(node.log_path.read_text)
    assert "Traceback" not in log, log
