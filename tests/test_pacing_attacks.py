"""Never-reading users against backends' batches, on real servers (issue 24): one node under
hypercorn and uvicorn, and two nodes sharing a Redis of the test's own whose pub/sub output
buffer limit is small, so that a node that stops reading its subscription is dropped at once.

The attack, scaled down: a backend posts 4 MB batches (1,000 x 4,000 characters) back to
back while six users each keep one websocket that never reads (a 4 KiB receive buffer),
opening a new one whenever the server resets the old, and an honest client reads everything,
resuming (``?resume=``) if it is ever closed. What must hold: no batch held up for more than
a couple of seconds, every acknowledged message reaches the honest client or is reported
lost to it (``recovered: false``), it is never closed with 1012, and the node's subscription
to Redis is never dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import statistics
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.server import RawClient, RedisServer, Server, wsfanout

KEY = "pacing-attack-key"
ATTACKERS = ("greg", "chuck", "mike", "amanda", "lisa", "anny")  # six users, one socket each
HONEST = "reader"
RETURNS = 2  # times each of the six is reset and comes back while the backend publishes
LONGEST = 30.0  # seconds the backend publishes at most, waiting for that
BATCH = orjson.dumps([{"type": "broadcast", "text": "x" * 4000} for _ in range(1000)])
ENV = {
    "WSFANOUT_API_KEYS": KEY,
    "WSFANOUT_OUTBOX_BYTES": str(64 * 1024),
    "WSFANOUT_CLOSE_TIMEOUT": "1",  # never-reading sockets are reset (and reopened) sooner
}
# A subscriber holding 32 MB unread, or 16 MB for 5 s, is dropped (Redis's default: 32 MB,
# or 8 MB for 60 s): soon enough for a test of seconds, with room for a loaded machine.
PUBSUB_LIMIT = "pubsub 32mb 16mb 5"
STALL_BOUND = 4.0  # seconds one batch may take: the issue saw 5-10 s stalls (2.6 s seen on a
# loaded 2-core machine without any stall: the bound is for the failure, not for speed)
WAIT = 60.0  # seconds the honest client may take to get everything on a loaded machine


TCP_ESTABLISHED = 1  # tcpi_state in the kernel's TCP_INFO


class NeverReader:
    """A user who keeps one websocket that never reads open, and opens a new one as soon as
    the server resets the old (nothing is ever read)."""

    def __init__(self, port: int, cookie: str) -> None:
        self.port = port
        self.cookie = cookie
        self.opened = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                raw = RawClient(self.port, self.cookie, rcvbuf=4096)
            except (OSError, RuntimeError):
                self._stop.wait(0.05)  # refused or reset during the handshake: try again
                continue
            self.opened += 1
            try:
                # Peeking would only show the unread data: the kernel's state says when the
                # server has reset the connection (or ended it).
                while not self._stop.wait(0.02):
                    info = raw.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
                    if info[0] != TCP_ESTABLISHED:
                        break
            except OSError:
                pass
            finally:
                raw.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


@dataclass
class Honest:
    """A client that reads everything everyone is sent and, closed, reconnects with
    ``?resume=``: which offsets of everyone's stream it got, and which it was told it lost."""

    url: str
    cookie: str
    epoch: str = ""
    last: int = 0  # the last offset of everyone's stream it got, or was told it lost
    base: int = 0  # where the stream stood when it first connected
    top: int = 0  # where it stood at the last welcome
    received: int = 0
    reported_lost: int = 0
    closes: list[int | None] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # offsets out of order, if any
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        while True:
            url = self.url
            if self.epoch:
                where = {"all": {"epoch": self.epoch, "offset": self.last}}
                url += "?resume=" + urllib.parse.quote(orjson.dumps(where).decode())
            try:
                async with connect(
                    url, additional_headers={"cookie": self.cookie}, max_size=None
                ) as conn:
                    async for frame in conn:
                        data = orjson.loads(frame)
                        for event in data if isinstance(data, list) else [data]:
                            self._take(event)
            except ConnectionClosed as closed:
                self.closes.append(closed.rcvd.code if closed.rcvd else None)
            except OSError:
                self.closes.append(None)
            await asyncio.sleep(0.2)

    def _take(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind == "welcome":
            where = event["streams"]["all"]
            if not self.epoch:
                self.epoch, self.last = where["epoch"], where["offset"]
                self.base = self.last
                self.ready.set()
            self.top = where["offset"]
        elif kind == "resumed" and "all" in event.get("lost", ()):
            self.reported_lost += self.top - self.last
            self.last = self.top
        elif kind == "message" and event["stream"] == "all":
            if event["offset"] != self.last + 1:
                self.errors.append(f"offset {event['offset']} after {self.last}")
            self.last = event["offset"]
            self.received += 1


@dataclass
class Published:
    """The backend's side: each batch's answer and how long it took."""

    statuses: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    retry_after: list[str | None] = field(default_factory=list)

    @property
    def acknowledged(self) -> int:
        return 1000 * self.statuses.count(202)


def publish_batches(url: str, done: Callable[[], bool]) -> Published:
    """POST 4 MB batches back to back until ``done()`` (or LONGEST seconds), timing each."""
    published = Published()
    end = time.monotonic() + LONGEST
    while not done() and time.monotonic() < end:
        request = urllib.request.Request(  # noqa: S310
            url + "/api/publish",
            data=BATCH,
            method="POST",
            headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"},
        )
        started = time.monotonic()
        try:
            with urllib.request.urlopen(request, timeout=120) as response:  # noqa: S310
                response.read()
                status, retry = response.status, None
        except urllib.error.HTTPError as err:
            err.read()
            status, retry = err.code, err.headers.get("retry-after")
        published.seconds.append(time.monotonic() - started)
        published.statuses.append(status)
        published.retry_after.append(retry)
    return published


def add_honest_user(data_dir: Path) -> None:
    added = wsfanout(data_dir, "user", "add", HONEST, "--password", "Reader-password")
    assert added.returncode == 0, added.stderr


@contextlib.contextmanager
def attackers(server: Server) -> Iterator[list[NeverReader]]:
    """Six users, each keeping a never-reading socket open on ``server``."""
    readers = [NeverReader(server.port, server.login(name)) for name in ATTACKERS]
    try:
        deadline = time.monotonic() + 10
        while not all(reader.opened for reader in readers):
            assert time.monotonic() < deadline, "the never-reading sockets did not open"
            time.sleep(0.02)
        yield readers
    finally:
        for reader in readers:
            reader.stop()


async def attack(entry: Server, home: Server) -> tuple[Published, Honest, int]:
    """Publish into ``entry`` while the honest client and the six never-reading users are
    on ``home``; (the backend's answers, the honest client, sockets the six opened)."""
    honest = Honest(home.ws_url, home.login(HONEST, "Reader-password"))
    reading = asyncio.create_task(honest.run())
    try:
        await asyncio.wait_for(honest.ready.wait(), 10)
        with attackers(home) as six:
            published = await asyncio.to_thread(
                publish_batches,
                entry.http_url,
                lambda: all(reader.opened > RETURNS for reader in six),
            )
            async with asyncio.timeout(WAIT):
                while honest.last - honest.base < published.acknowledged:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            opened = sum(reader.opened for reader in six)
    finally:
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
    print(
        f"figure pacing attack: {published.statuses.count(202)} batches taken, "
        f"{published.statuses.count(503)} refused, seconds p50 "
        f"{statistics.median(published.seconds):.2f} max {max(published.seconds):.2f}, "
        f"honest got {honest.received} of {published.acknowledged} "
        f"(reported lost {honest.reported_lost}), closes {honest.closes}, "
        f"never-reading sockets opened {opened}"
    )
    return published, honest, opened


def check(published: Published, honest: Honest, opened: int) -> None:
    assert max(published.seconds) <= STALL_BOUND, published.seconds
    assert opened > len(ATTACKERS) * RETURNS, "the six were not reset and back often enough"
    assert all(status in (202, 503) for status in published.statuses), published.statuses
    assert all(
        retry is not None
        for status, retry in zip(published.statuses, published.retry_after, strict=True)
        if status == 503
    ), published
    assert published.acknowledged > 0
    assert 1012 not in honest.closes, honest.closes
    assert honest.errors == []
    # Every acknowledged message reached the honest client, or it was told it lost it.
    assert honest.received + honest.reported_lost == published.acknowledged, honest


@pytest.fixture
def data_dir(tmp_path: Path, demo_db: Path) -> Path:
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    add_honest_user(tmp_path)
    return tmp_path


@pytest.mark.slow(8)
async def test_never_reading_users_do_not_stall_a_nodes_backends(
    data_dir: Path, server_kind: str
) -> None:
    """One node: six users reopening never-reading sockets hold no batch up for more than
    a couple of seconds (they held each up 5-10 s), and the honest client gets everything."""
    with Server(data_dir, ENV, server=server_kind).running() as server:
        published, honest, opened = await attack(server, server)
        log = server.log_path.read_text()
    check(published, honest, opened)
    assert "Traceback" not in log, log


@pytest.mark.slow(23)
async def test_never_reading_users_do_not_get_a_nodes_redis_subscription_dropped(
    tmp_path: Path, demo_db: Path
) -> None:
    """Two nodes on a Redis that drops a subscriber holding 32 MB unread: the backend posts
    into one, the honest client and the six are on the other. That node keeps reading its
    subscription (it was dropped, and everyone on it closed with 1012), the honest client
    gets everything or is told what it lost, and no batch is held up."""
    redis_server = RedisServer(tmp_path)
    redis_server.start()
    try:
        client = redis.Redis.from_url(redis_server.url)
        client.config_set("client-output-buffer-limit", PUBSUB_LIMIT)
        client.close()
        env = {
            **ENV,
            "WSFANOUT_REDIS_URL": redis_server.url,
            "WSFANOUT_REDIS_PREFIX": f"wsfanout-test-{uuid.uuid4().hex[:10]}:",
        }
        servers = []
        for name in ("entry", "home"):
            (tmp_path / name).mkdir()
            shutil.copy(demo_db, tmp_path / name / "wsfanout.sqlite3")
            add_honest_user(tmp_path / name)
            servers.append(Server(tmp_path / name, env))
        entry, home = servers
        with entry.running(), home.running():
            published, honest, opened = await attack(entry, home)
            logs = entry.log_path.read_text() + home.log_path.read_text()
    finally:
        redis_server.stop()
    assert "backplane unavailable" not in logs, logs
    check(published, honest, opened)
    assert "Traceback" not in logs, logs
