"""examples/publish_amqp.py and examples/mint_token.py, run as a user runs them, against a
real node (and the real RabbitMQ on 127.0.0.1:5672, with a queue of the test's own)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import pytest

from tests import docs
from tests.server import ROOT, Client, Server, http

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
JWT_SECRET = "examples-test-jwt-secret-0123456789"
EXAMPLES = ROOT / "examples"


def example(name: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python examples/<name> args...`` from a clone, with these variables."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("WSFANOUT_")}
    return subprocess.run(
        [sys.executable, f"examples/{name}", *args],
        cwd=ROOT,
        env={**inherited, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def amqp_queue() -> Iterator[str]:
    """A queue name of the test's own, deleted afterwards. Skipped without RabbitMQ, except
    under CI=true, which must have it."""
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=1).close()
    except OSError:
        if os.environ.get("CI") == "true":
            pytest.fail("RabbitMQ is not running on 127.0.0.1:5672, and CI=true requires it")
        pytest.skip("RabbitMQ is not running on 127.0.0.1:5672 (start rabbitmq-server)")
    queue = f"wsfanout-test-{uuid.uuid4().hex[:10]}"
    yield queue

    async def delete() -> None:
        async with await aio_pika.connect(AMQP_URL) as connection:
            channel = await connection.channel()
            await channel.queue_delete(queue)

    asyncio.run(delete())


async def waiting(queue: str) -> int:
    """How many messages the queue holds (it must exist: a passive declaration)."""
    async with await aio_pika.connect(AMQP_URL) as connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        count = declared.declaration_result.message_count
        assert count is not None
        return count


def acked(server: Server) -> float:
    status, headers = http("GET", server.http_url + "/metrics")
    assert status == 200
    for line in headers["_body"].splitlines():
        if line.startswith('wsfanout_amqp_messages_total{outcome="acked"}'):
            return float(line.split()[-1])
    return 0.0


async def test_the_rabbitmq_publisher_before_and_after_a_node_starts(
    tmp_path: Path, demo_db: Path, amqp_queue: str
) -> None:
    """Run before any node: the message waits in the queue the example declared; a node
    started next declares the same queue without conflict and takes it. Run again with a
    user connected: the user sees the message. The publishing page quotes it whole."""
    quoted = docs.block(
        "docs/publishing.md", "test_the_rabbitmq_publisher_before_and_after_a_node_starts"
    )
    assert quoted == (EXAMPLES / "publish_amqp.py").read_text()
    env = {"WSFANOUT_AMQP_URL": AMQP_URL, "WSFANOUT_AMQP_QUEUE": amqp_queue}
    first = example("publish_amqp.py", "sent before any node", **env)
    assert first.returncode == 0, first.stderr
    assert first.stdout == f"published to {amqp_queue!r}\n"
    assert await waiting(amqp_queue) == 1  # kept for the node, not vanished

    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    with Server(tmp_path, env).running() as server:
        deadline = time.monotonic() + 30
        while acked(server) < 1:  # the node declared the queue as it was, and consumed
            assert time.monotonic() < deadline, server.log_path.read_text()
            await asyncio.sleep(0.1)
        assert await waiting(amqp_queue) == 0
        greg = await Client.open(server.ws_url, await asyncio.to_thread(server.login, "greg"))
        try:
            await greg.next_of("welcome")
            again = await asyncio.to_thread(example, "publish_amqp.py", "deploy finished", **env)
            assert again.returncode == 0, again.stderr
            message = await greg.next_of("message", timeout=30)
            assert (message["text"], message["from"]) == ("deploy finished", "ci")
        finally:
            await greg.close()
        log = server.log_path.read_text()
    assert "PRECONDITION_FAILED" not in log and "Traceback" not in log, log


async def test_a_minted_token_connects_to_a_node(tmp_path: Path) -> None:
    """The token examples/mint_token.py prints (the secret from WSFANOUT_JWT_SECRET) is
    taken by a node with that secret: the socket is the token's user, in its groups. The
    tokens page quotes it whole."""
    quoted = docs.block("docs/embedding.md", "test_a_minted_token_connects_to_a_node")
    assert quoted == (EXAMPLES / "mint_token.py").read_text()
    minted = example("mint_token.py", "nina", "girls", "chess", WSFANOUT_JWT_SECRET=JWT_SECRET)
    assert minted.returncode == 0, minted.stderr
    token = minted.stdout.strip()
    assert token.count(".") == 2 and "\n" not in token
    with Server(tmp_path, {"WSFANOUT_JWT_SECRET": JWT_SECRET}).running() as server:
        nina = await Client.open(server.ws_url + "?token=" + token, cookie="")
        try:
            welcome = await nina.next_of("welcome")
            assert (welcome["user"], welcome["groups"]) == ("nina", ["chess", "girls"])
        finally:
            await nina.close()


def test_the_token_example_says_what_it_needs() -> None:
    """Without the secret in the environment it stops with the variable's name; without a
    username, with its usage."""
    unset = example("mint_token.py", "nina")
    assert unset.returncode == 1 and "KeyError: 'WSFANOUT_JWT_SECRET'" in unset.stderr
    usage = example("mint_token.py", WSFANOUT_JWT_SECRET=JWT_SECRET)
    assert (usage.returncode, usage.stderr) == (1, "usage: mint_token.py USERNAME [GROUP ...]\n")
