"""Hostile clients against real hypercorn and uvicorn: memory stays bounded, connections
do not linger.

Each test measures the server's resident memory (its processes' VmRSS) while it is
attacked and after, and the TCP connections it still holds on its port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import shutil
import signal
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
import uuid
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import orjson
import pytest
from wsproto.events import CloseConnection, TextMessage

from tests.server import Client, RawClient, Server, delete_redis_keys, queue_messages
from wsfanout.servers.resets import UNSENT_MAX

MIB = 1 << 20
STALLED = 50  # clients that never read
BOUND = 32 * MIB  # what an attack may add to the server's memory, at its peak and after
ENV = {"WSFANOUT_CLOSE_TIMEOUT": "1", "WSFANOUT_RATE_LIMIT": "0"}


def frame_header(length: int, *, opcode: int = 0x1, rsv1: bool = False) -> bytes:
    """A client frame's header (FIN set, masked with a zero key: the payload goes as is)."""
    first = 0x80 | (0x40 if rsv1 else 0) | opcode
    if length < 126:
        head = bytes([first, 0x80 | length])
    elif length < 1 << 16:
        head = bytes([first, 0x80 | 126]) + struct.pack("!H", length)
    else:
        head = bytes([first, 0x80 | 127]) + struct.pack("!Q", length)
    return head + b"\0\0\0\0"


@dataclass
class Attack:
    """What one raw client saw while it sent, and the server's memory meanwhile."""

    start: int  # server RSS before, bytes
    peak: int = 0
    after: int = 0
    sent: int = 0
    close_code: int | None = None
    texts: list[str] = field(default_factory=list)
    ended: bool = False  # the server ended the TCP connection (EOF or reset)
    send_error: OSError | None = None


def attack(server: Server, raw: RawClient, data: Iterable[bytes], timeout: float = 30) -> Attack:
    """Send ``data`` from ``raw`` while reading what the server answers, until the server
    ends the connection (or ``timeout``); sample the server's memory all along."""
    result = Attack(start=server.rss())
    result.peak = result.start

    def send() -> None:
        try:
            for chunk in data:
                raw.sock.sendall(chunk)
                result.sent += len(chunk)
        except OSError as exc:
            result.send_error = exc

    def read() -> None:
        partial = ""
        try:
            while True:
                received = raw.sock.recv(65536)
                raw.ws.receive_data(received or None)
                for event in raw.ws.events():
                    if isinstance(event, TextMessage):
                        partial += event.data
                        if event.message_finished:
                            result.texts.append(partial)
                            partial = ""
                    elif isinstance(event, CloseConnection) and result.close_code is None:
                        result.close_code = event.code
                if not received:
                    break
        except OSError:
            pass  # reset
        result.ended = True

    raw.sock.settimeout(timeout)
    threads = [threading.Thread(target=send), threading.Thread(target=read)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        result.peak = max(result.peak, server.rss())
        time.sleep(0.01)
    for thread in threads:
        thread.join(5)
    time.sleep(0.5)
    result.after = server.rss()
    return result


def server_sockets(server: Server) -> list[tuple[str, int]]:
    """The server's TCP connections on its port (not listening): (state, bytes queued in
    the kernel for the client), from /proc/net/tcp (states in hex, as there)."""
    port = f"{server.port:04X}"
    sockets = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(":" + port) and fields[3] != "0A":
            sockets.append((fields[3], int(fields[4].split(":")[0], 16)))
    return sockets


def connections_fall_to(server: Server, count: int, timeout: float) -> bool:
    """Wait until the server holds at most ``count`` TCP connections on its port."""
    deadline = time.monotonic() + timeout
    while server.established() > count:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def http(url: str) -> str:
    """GET a URL; its body."""
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310
        return str(response.read().decode())


def http_bytes(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, object]:
    """POST raw JSON; (status, the decoded answer)."""
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)  # noqa: S310
    request.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, orjson.loads(err.read())


def report(name: str, **figures: float) -> None:
    """One line of figures for the README (seen with ``pytest -s``)."""
    print(f"figure {name}: " + ", ".join(f"{k}={v:.1f}" for k, v in figures.items()))


def errors(texts: list[str]) -> list[str]:
    return [e["code"] for t in texts if (e := orjson.loads(t))["type"] == "error"]


@pytest.fixture
def data_dir(tmp_path: Path, demo_db: Path) -> Path:
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    return tmp_path


@pytest.mark.parametrize("serve", [False, True], ids=["plain", "wsfanout-serve"])
def test_a_frame_declaring_a_tebibyte_is_refused_without_buffering(
    data_dir: Path, serve: bool, server_kind: str
) -> None:
    """One frame declares 1 TiB and 200 MB of it are streamed: the client gets too_large
    and 1009 at once, the server never holds more than the limit, and it resets the
    connection once the client has not answered the close in time."""
    with Server(data_dir, ENV, serve=serve, server=server_kind).running() as server:
        raw = RawClient(server.port, server.login("mike"))
        chunk = b"a" * MIB
        result = attack(server, raw, [frame_header(1 << 40), *([chunk] * 200)])
        raw.close()
        report(
            f"1 TiB frame ({'wsfanout serve' if serve else 'plain'} {server_kind})",
            peak_mib=(result.peak - result.start) / MIB,
            after_mib=(result.after - result.start) / MIB,
            sent_mib=result.sent / MIB,
        )
        assert result.peak - result.start < BOUND, result
        assert result.after - result.start < BOUND, result
        assert result.ended, "the server kept the connection"
        assert result.close_code == 1009
        assert errors(result.texts) == ["too_large"]
        # Checked at once, the server's end was still listed once on a busy machine (the
        # same run passed alone): wait for it to go, as the other tests here do.
        assert connections_fall_to(server, 0, timeout=5), server_sockets(server)
        log = server.log_path.read_text()
    if server_kind == "hypercorn":  # uvicorn ends the TCP connection with its close itself
        assert "it did not answer the close" in log
    assert "Traceback" not in log, log


def deflate_bomb(inflated: int) -> bytes:
    """A permessage-deflate payload that inflates to ``inflated`` bytes of 'a'."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts = [compressor.compress(b"a" * MIB) for _ in range(inflated // MIB)]
    parts.append(compressor.flush(zlib.Z_SYNC_FLUSH))
    payload = b"".join(parts)
    assert payload.endswith(b"\x00\x00\xff\xff")
    return payload[:-4]


def test_a_deflate_bomb_inflates_no_further_than_the_limit(
    data_dir: Path, server_kind: str
) -> None:
    """Compression on: 0.5 MB that inflates to 0.5 GB gets too_large and 1009; the server
    inflates no more than the frame limit, and its memory stays where it was."""
    env = {**ENV, "WSFANOUT_COMPRESSION": "on"}
    with Server(data_dir, env, server=server_kind).running() as server:
        raw = RawClient(server.port, server.login("mike"), deflate=True)
        payload = deflate_bomb(512 * MIB)
        assert len(payload) < MIB
        result = attack(server, raw, [frame_header(len(payload), rsv1=True), payload])
        raw.close()
        report(
            "deflate bomb",
            peak_mib=(result.peak - result.start) / MIB,
            after_mib=(result.after - result.start) / MIB,
            sent_mib=result.sent / MIB,
        )
        assert result.send_error is None  # all of it went out
        assert result.peak - result.start < BOUND, result
        assert result.after - result.start < BOUND, result
        assert result.ended
        assert result.close_code == 1009
        assert errors(result.texts) == ["too_large"]
        log = server.log_path.read_text()
    assert "Traceback" not in log, log


async def test_compressed_messages_within_the_limit_still_arrive(
    data_dir: Path, server_kind: str
) -> None:
    """Bounding inflation keeps its state across messages (context takeover): messages
    just under the limit, one after another, are published; one just over is too_large."""
    env = {**ENV, "WSFANOUT_COMPRESSION": "on"}
    with Server(data_dir, env, server=server_kind).running() as server:
        mike = await Client.open(server.ws_url, server.login("mike"))
        assert (await mike.next())["type"] == "welcome"
        assert mike.conn.response is not None
        assert "permessage-deflate" in mike.conn.response.headers["sec-websocket-extensions"]
        for n in range(3):
            text = f"{n}" * 65_000
            await mike.send({"type": "broadcast", "text": text, "id": f"m{n}"})
            assert (await mike.next_of("message"))["text"] == text
            assert (await mike.next_of("ack"))["id"] == f"m{n}"
        await mike.conn.send("a" * 65_537)
        assert (await mike.next_of("error"))["code"] == "too_large"
        await asyncio.wait_for(mike.reader, 10)
        assert mike.conn.close_code == 1009


def fragments(count: int, size: int) -> Iterator[bytes]:
    """One text message in ``count`` fragments of ``size`` bytes (never finished)."""
    body = b"a" * size
    for n in range(count):
        opcode = 0x1 if n == 0 else 0x0
        head = frame_header(size, opcode=opcode)
        yield bytes([head[0] & 0x7F]) + head[1:] + body  # FIN clear: more fragments follow


@pytest.mark.parametrize(
    ("count", "size"), [(2000, 64 * 1024), (50_000, 0)], ids=["64KiB-fragments", "empty-fragments"]
)
def test_a_message_in_endless_fragments_is_refused_too(
    data_dir: Path, count: int, size: int, server_kind: str
) -> None:
    """Fragments add up: past the limit (or past 4096 of them, empty ones included) the
    message is refused the same way, and the connection does not hang (it used to, under
    `wsfanout serve`, past 4x the limit)."""
    with Server(data_dir, ENV, serve=True, server=server_kind).running() as server:
        raw = RawClient(server.port, server.login("mike"))
        result = attack(server, raw, fragments(count, size))
        raw.close()
        report(f"{count} fragments of {size} B", peak_mib=(result.peak - result.start) / MIB)
        assert result.peak - result.start < BOUND, result
        assert result.ended
        assert result.close_code == 1009
        assert errors(result.texts) == ["too_large"]


async def test_clients_that_never_read_do_not_keep_their_connections(
    data_dir: Path, server_kind: str
) -> None:
    """50 clients that never read are closed with 1013 during a burst; then their TCP
    connections are reset (not left holding megabytes in the kernel), the server's memory
    stays within the bound, and the one client that reads gets everything."""
    env = ENV  # the default bounds: 1 MiB outboxes, 64 KiB batches
    with Server(data_dir, env, serve=True, server=server_kind).running() as server:
        greg = await Client.open(server.ws_url, server.login("greg"))
        assert (await greg.next())["type"] == "welcome"
        cookie = server.login("anny")  # a login costs 16 MiB for a moment (scrypt)
        start = server.rss()
        stalled = [RawClient(server.port, cookie, rcvbuf=4096) for _ in range(STALLED)]
        # Exactly these connections: one more was listed once in a full run on a busy
        # machine (passing alone); give the kernel's table a moment, and name what is there.
        deadline = time.monotonic() + 5
        while server.established() != STALLED + 1:
            assert time.monotonic() < deadline, server_sockets(server)
            await asyncio.sleep(0.05)
        peak = start
        done = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, server.rss())
                await asyncio.sleep(0.01)

        sampler = asyncio.create_task(sample())
        text, count = "x" * 16_000, 600  # 9.6 MB each: far more than 256 KiB + socket buffers
        try:
            for n in range(count):
                await greg.send({"type": "broadcast", "text": f"{n:04d}{text}"})
            for n in range(count):
                assert (await greg.next_of("message", timeout=30))["text"][:4] == f"{n:04d}"
            assert await asyncio.to_thread(connections_fall_to, server, 1, 10), (
                "closed clients kept their TCP connections"
            )
        finally:
            done.set()
            await sampler
            for raw in stalled:
                raw.close()
        await greg.close()
        await asyncio.sleep(0.5)
        after = server.rss()
        report(
            f"{STALLED} never-reading",
            peak_mib=(peak - start) / MIB,
            after_mib=(after - start) / MIB,
        )
        assert peak - start < BOUND, (peak - start) / MIB
        assert after - start < BOUND
        log = server.log_path.read_text()
    assert log.count("closing a slow consumer (anny)") == 50
    assert log.count("it did not answer the close") == 50
    assert "Traceback" not in log, log


def need(port: int, name: str) -> None:
    """Skip when a shared service is not running, except under CI=true (then fail)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return
    except OSError:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is not running on 127.0.0.1:{port}, and CI=true requires it")
        pytest.skip(f"{name} is not running on 127.0.0.1:{port}")


KEY = "hardening-key"
BATCH = [{"type": "broadcast", "text": f"{n:04d}" + "x" * 4000} for n in range(1000)]  # 4 MB


async def publish_by_amqp(url: str, queue: str, body: bytes) -> None:
    connection = await aio_pika.connect_robust(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.default_exchange.publish(aio_pika.Message(body), routing_key=queue)


@pytest.mark.parametrize("source", ["api", "amqp", "api-redis"])
async def test_a_batch_larger_than_an_outbox_reaches_every_reader(
    tmp_path: Path, demo_db: Path, source: str
) -> None:
    """A 4 MB batch, 256 KiB outboxes: ten clients that read get all of it, whole and in
    order; the one that never reads is closed with 1013 after the pace timeout; the
    publisher hears back (202, or its ack) once all is handed over. With Redis, the batch
    goes in through one node and the node the clients are on paces it."""
    amqp_url = "amqp://guest:guest@127.0.0.1:5672/"
    queue = f"wsfanout-test-{uuid.uuid4().hex[:10]}"
    env = {
        **ENV,
        "WSFANOUT_OUTBOX_BYTES": str(256 * 1024),
        "WSFANOUT_PACE_TIMEOUT": "1",
        "WSFANOUT_API_KEYS": KEY,
        # The stalled client reads its close only once every reader has the batch, which
        # can take more than a second on a loaded machine: it must not be reset before.
        "WSFANOUT_CLOSE_TIMEOUT": "10",
    }
    if source == "amqp":
        need(5672, "RabbitMQ")
        env |= {"WSFANOUT_AMQP_URL": amqp_url, "WSFANOUT_AMQP_QUEUE": queue}
    if source == "api-redis":
        need(6379, "Redis")
        env |= {
            "WSFANOUT_REDIS_URL": "redis://127.0.0.1:6379/0",
            "WSFANOUT_REDIS_PREFIX": f"wsfanout-test-{uuid.uuid4().hex[:10]}:",
        }
    servers = []
    for name in ("a", "b") if source == "api-redis" else ("a",):
        (tmp_path / name).mkdir()
        shutil.copy(demo_db, tmp_path / name / "wsfanout.sqlite3")
        servers.append(Server(tmp_path / name, env))
    for server in servers:
        server.start()
    try:
        entry, home = servers[0], servers[-1]  # published into, and where the clients are
        names = ["greg", "mike", "chuck", "lisa", "anny", "mikey"]
        readers = [await Client.open(home.ws_url, home.login(names[n % 5])) for n in range(10)]
        for reader in readers:
            assert (await reader.next())["type"] == "welcome"
        stalled = RawClient(home.port, home.login("greg"), rcvbuf=4096)
        body = orjson.dumps(BATCH)
        if source == "amqp":
            await publish_by_amqp(amqp_url, queue, body)
        else:
            status, answer = await asyncio.to_thread(
                http_bytes,
                entry.http_url + "/api/publish",
                body,
                {"authorization": f"Bearer {KEY}"},
            )
            assert (status, answer) == (202, {"accepted": 1000})
        for number, reader in enumerate(readers):
            for n in range(1000):
                event = await reader.next_of("message", timeout=30)
                assert event["text"] == BATCH[n]["text"], (number, n)
            assert reader.conn.close_code is None
        code, _ = await asyncio.to_thread(stalled.read_until_close)
        assert code == 1013
        stalled.close()
        for reader in readers:
            await reader.close()
        if source == "amqp":
            # acked once, not requeued
            assert await queue_messages(amqp_url, queue, delete=True) == 0
        logs = "".join(server.log_path.read_text() for server in servers)
    finally:
        for server in servers:
            server.stop()
        if "WSFANOUT_REDIS_PREFIX" in env:
            delete_redis_keys(env["WSFANOUT_REDIS_PREFIX"])
    assert logs.count("closing a slow consumer") == 1
    assert "Traceback" not in logs, logs


def test_data_before_the_handshake_answer_leaves_no_ghost_connection(
    data_dir: Path, server_kind: str
) -> None:
    """A client that sends a frame in the same write as its upgrade request, then leaves:
    hypercorn answers 400 and ends the stream without telling the app. The connection must
    not stay counted (it used to hold its seat forever: 100 of them locked the user out)."""
    env = {**ENV, "WSFANOUT_MAX_CONNECTIONS_PER_USER": "3"}
    with Server(data_dir, env, server=server_kind).running() as server:
        cookie = server.login("greg")
        early = frame_header(5) + b"hello"
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                request = (
                    f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                    "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                    f"Cookie: {cookie}\r\n\r\n"
                )
                sock.sendall(request.encode() + early)
                sock.recv(4096)
        assert connections_fall_to(server, 0, 5)
        deadline = time.monotonic() + 5
        while '"connections":0' not in http(server.http_url + "/healthz"):
            assert time.monotonic() < deadline, "the ghosts are still counted"
            time.sleep(0.05)
        raw = RawClient(server.port, cookie)  # their seats came back: greg gets in
        raw.close()


async def test_a_client_that_stops_reading_in_a_quiet_room_is_closed_too(
    data_dir: Path, server_kind: str
) -> None:
    """Clients that stop reading while little is sent never overflow their outbox, but the
    server's sends to them block: after WSFANOUT_SEND_TIMEOUT they are closed with 1013
    and reset (they used to hold ~2.8 MB each, ESTABLISHED, for as long as they liked)."""
    env = {**ENV, "WSFANOUT_SEND_TIMEOUT": "1", "WSFANOUT_OUTBOX_BYTES": str(16 * MIB)}
    with Server(data_dir, env, server=server_kind).running() as server:
        greg = await Client.open(server.ws_url, server.login("greg"))
        assert (await greg.next())["type"] == "welcome"
        cookie = server.login("lisa")
        stalled = [RawClient(server.port, cookie, rcvbuf=4096) for _ in range(5)]
        text = "x" * 16_000
        for n in range(500):  # 8 MB in all: under the outbox, over the socket buffers
            await greg.send({"type": "direct", "user_name": "lisa", "text": f"{n}{text}"})
        try:
            assert await asyncio.to_thread(connections_fall_to, server, 1, 15), (
                "stalled clients kept their connections"
            )
        finally:
            for raw in stalled:
                raw.close()
            await greg.close()
        log = server.log_path.read_text()
    assert log.count("closing a slow consumer (lisa): a send blocked for 1 s") == 5
    assert "Traceback" not in log, log


def test_half_sent_request_heads_do_not_hold_connections(data_dir: Path, server_kind: str) -> None:
    """200 connections each send half a request head and wait: the server closes them all
    (uvicorn would wait forever; wsfanout gives a head WSFANOUT_HEAD_TIMEOUT, 5 s)."""
    with Server(data_dir, ENV, serve=True, server=server_kind).running() as server:
        half = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nX-Slow: "
        socks = []
        try:
            for _ in range(200):
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
                sock.sendall(half)
                socks.append(sock)
            closed: set[socket.socket] = set()
            deadline = time.monotonic() + 20
            while len(closed) < len(socks) and time.monotonic() < deadline:
                waiting = [sock for sock in socks if sock not in closed]
                readable, _, _ = select.select(waiting, [], [], 1)
                for sock in readable:
                    with contextlib.suppress(OSError):  # a reset is a close too
                        if sock.recv(4096):
                            continue  # an answer (an error status) before the close
                    closed.add(sock)
            assert len(closed) == len(socks)
        finally:
            for sock in socks:
                sock.close()
        assert http(server.http_url + "/healthz")  # and it still serves


def test_a_client_that_pings_but_never_reads_is_reset(data_dir: Path, server_kind: str) -> None:
    """A logged-in client floods pings and reads nothing: the pongs it leaves unread do not
    grow the server (uvicorn writes each regardless); its connection ends."""
    with Server(data_dir, ENV, serve=True, server=server_kind).running() as server:
        raw = RawClient(server.port, server.login("mike"), rcvbuf=4096)
        ping = bytes([0x89, 0x80 | 125]) + b"\0\0\0\0" + b"p" * 125
        start = peak = server.rss()
        deadline = time.monotonic() + 15
        ended = False
        raw.sock.settimeout(1)
        try:
            while time.monotonic() < deadline:
                raw.sock.sendall(ping * 512)
                peak = max(peak, server.rss())
        except OSError:
            ended = True  # reset, or the server stopped reading: the send timed out
        finally:
            raw.close()
        report(f"ping flood ({server_kind})", peak_mib=(peak - start) / MIB)
        assert peak - start < BOUND
        assert ended
        assert connections_fall_to(server, 0, timeout=10)


STUCK_ENV = {**ENV, "WSFANOUT_OUTBOX_BYTES": str(16 * MIB)}  # not closed as slow: stuck


async def stuck_behind_a_burst(server: Server) -> tuple[list[RawClient], Client]:
    """10 clients that never read, then a 4 MB burst (more than the kernel holds for them,
    so their sends block), read whole by one client; (the stuck ones, the reader)."""
    stuck = [RawClient(server.port, server.login("anny"), rcvbuf=4096) for _ in range(10)]
    reader = await Client.open(server.ws_url, server.login("greg"))
    await reader.next()
    for n in range(250):
        await reader.send({"type": "broadcast", "text": f"{n:03d}" + "x" * 16_000})
    for n in range(250):
        assert (await reader.next_of("message", timeout=30))["text"][:3] == f"{n:03d}"
    return stuck, reader


@pytest.mark.parametrize(
    ("kind", "serve", "bound"),
    [
        ("hypercorn", False, 3 + 2),  # hypercorn's graceful timeout (3 s), and a margin
        ("hypercorn", True, 10 + 2),  # wsfanout serve's (10 s)
        ("uvicorn", True, 5 + 1 + 2),  # the drain (5 s at most), the stragglers' second
    ],
    ids=["hypercorn", "serve-hypercorn", "serve-uvicorn"],
)
async def test_sigterm_with_clients_that_do_not_read_ends_in_time(
    data_dir: Path, kind: str, serve: bool, bound: float
) -> None:
    """SIGTERM while 10 clients never read a 4 MB burst (their sends blocked): a reading
    client gets 1001, the stuck ones are reset, and the server exits before it would cancel
    them (hypercorn's graceful timeout: a traceback each) or within its drain's 5 s and a
    little (uvicorn alone would wait for them to read)."""
    with Server(data_dir, STUCK_ENV, serve=serve, server=kind).running() as server:
        stuck, reader = await stuck_behind_a_burst(server)
        assert server.proc is not None
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(reader.reader, 10)
        assert reader.conn.close_code == 1001
        assert server.proc.wait(bound) in server.stopped_by_sigterm
        elapsed = time.monotonic() - started
        for client in stuck:
            client.close()
    report(f"SIGTERM with stuck clients ({kind}{', serve' if serve else ''})", seconds=elapsed)
    log = server.log_path.read_text()
    assert "Traceback" not in log, log
    if kind == "hypercorn":  # uvicorn's adapter resets them itself, with no log line
        assert log.count("reset the connection of anny") == len(stuck), log


async def test_uvicorn_resets_a_refused_client_that_does_not_read(data_dir: Path) -> None:
    """10 clients leave a 4 MB burst unread, then each sends the header of a frame over the
    limit: uvicorn refuses it and closes at once, and the TCP connections are reset, so the
    megabytes queued for them are dropped (not held by the kernel until they read). Under
    hypercorn the app closes such a client itself: its blocked send is reset after
    WSFANOUT_SEND_TIMEOUT."""
    with Server(data_dir, STUCK_ENV, serve=True, server="uvicorn").running() as server:
        stuck, reader = await stuck_behind_a_burst(server)
        try:
            # The reader has the whole burst, but how much of it sits in each stuck client's
            # socket yet follows TCP's timing (the kernel grows a send buffer as ACKs and
            # window probes come back, and the writer follows it): in a quiet run one stuck
            # client was 250 KB behind the others. The server resets a refused client only
            # past UNSENT_MAX unread (less is closed gracefully, and is then held until the
            # client reads): refuse them once all ten are past it.
            deadline = time.monotonic() + 10
            while sum(queued > UNSENT_MAX for _, queued in server_sockets(server)) < 10:
                assert time.monotonic() < deadline, server_sockets(server)
                await asyncio.sleep(0.05)
            for client in stuck:
                client.sock.sendall(frame_header(1 << 30))
            assert connections_fall_to(server, 1, timeout=10), server_sockets(server)
        finally:
            for client in stuck:
                client.close()
            await reader.close()
    assert "Traceback" not in server.log_path.read_text()
