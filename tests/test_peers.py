"""servers/peers.py: what one address may hold before the app sees it, counted per process;
and the trickle attack of issue 24 against real hypercorn and uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import math
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect

from tests.server import ROOT, Server
from tests.test_servers import reach_warnings
from wsfanout.config import ConfigError, Settings
from wsfanout.servers import ServerReach, hypercorn_tcp  # the latter wraps hypercorn now
from wsfanout.servers.peers import Peer, PeerLimits, Peers, address_key

DESCRIPTORS = 4096  # the attacked server's limit (above its listen queue, as in production)
ATTACKERS = 5000  # trickling connections, from two addresses: more than the server's limit
ATTACK_SOURCES = ("127.0.0.2", "127.0.0.3")  # /healthz comes from 127.0.0.1
HEALTH_BOUND = 1.0  # seconds: the target for a /healthz during the attack


class Transport:
    """What a peer needs of an asyncio transport: to close it."""

    def __init__(self) -> None:
        self.closed = False

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def arrive(peers: Peers, host: str = "10.0.0.1") -> tuple[Peer | None, Transport]:
    transport = Transport()
    return peers.arrive((host, 5000), transport), transport


async def test_an_address_holds_at_most_its_waiting_connections() -> None:
    """Past the cap of waiting connections an address's next one is refused, unless the
    address has connections kept alive between two requests: the oldest is closed for it."""
    peers = Peers(PeerLimits(waiting=2))
    (first, first_transport), (second, _) = arrive(peers), arrive(peers)
    assert first is not None and second is not None
    assert arrive(peers)[0] is None  # both wait for their first head: refused
    assert arrive(peers, "10.0.0.2")[0] is not None  # another address: its own counts
    first.started()
    third, _ = arrive(peers)
    assert third is not None
    first.waiting()  # kept alive after its response: three wait now
    assert arrive(peers)[0] is None  # closing the one kept alive would not be enough
    assert not first_transport.closed
    second.started()
    fourth, _ = arrive(peers)
    assert fourth is not None and first_transport.closed  # the kept-alive one made room
    assert peers.counts(("10.0.0.1", 0)) == (3, 2)
    for peer in (first, second, third, fourth, fourth):  # left twice: counted once
        peer.left()
    assert peers.counts(("10.0.0.1", 0)) == (0, 0)
    assert len(peers) == 1  # 10.0.0.1 is forgotten; 10.0.0.2 still holds one
    assert (peers.refused, peers.closed) == (2, 1)


async def test_an_address_holds_at_most_its_connections() -> None:
    """With a cap on all connections, connections whose head came count too."""
    peers = Peers(PeerLimits(waiting=0, connections=2))
    held = [arrive(peers)[0] for _ in range(2)]
    for peer in held:
        assert peer is not None
        peer.started()
    assert arrive(peers)[0] is None
    assert held[0] is not None
    held[0].left()
    assert arrive(peers)[0] is not None


async def test_a_connection_waits_until_its_request_body_is_whole() -> None:
    """A whole head whose body is still due: the connection still waits (its address's next
    one is refused, and it is not the one closed to make room), until its body is whole or
    the body timeout closes it."""
    peers = Peers(PeerLimits(waiting=2, body_timeout=0.05))
    (first, first_transport), (second, second_transport) = arrive(peers), arrive(peers)
    assert first is not None and second is not None
    first.reading()
    second.reading()
    assert arrive(peers)[0] is None  # both still wait, neither is idle
    assert not first_transport.closed and not second_transport.closed
    first.started()  # its body came whole
    first.waiting()  # kept alive after its answer: the one closed to make room
    assert arrive(peers)[0] is not None and first_transport.closed
    await asyncio.sleep(0.2)
    assert second_transport.closed  # its body never came whole
    assert (peers.refused, peers.closed, peers.late) == (1, 1, 1)


@pytest.mark.parametrize(
    ("peername", "key"),
    [
        (("203.0.113.7", 5000), "203.0.113.7"),
        (("2001:db8:1:2:aaaa::1", 5000, 0, 0), "2001:db8:1:2::/64"),
        (("2001:db8:1:2:bbbb::9", 5000, 0, 0), "2001:db8:1:2::/64"),
        (("::ffff:203.0.113.7", 5000, 0, 0), "203.0.113.7"),
        (("fe80::1%eth0", 5000, 0, 2), "fe80::/64"),
        ("/run/wsfanout.sock", None),
        (None, None),
    ],
)
def test_addresses_are_counted_by_ipv4_address_or_ipv6_64(peername: object, key: object) -> None:
    """IPv4 by address, IPv6 by /64 (one subscriber's block), a unix socket not at all."""
    assert address_key(peername) == key


async def test_a_unix_socket_is_never_refused() -> None:
    """Behind a proxy on a unix socket there is no address to count by."""
    peers = Peers(PeerLimits(waiting=1, connections=1))
    assert all(peers.arrive("", Transport()) is not None for _ in range(5))
    assert len(peers) == 0


async def test_refusals_are_logged_at_once_then_at_most_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The first refusal is one warning naming the address and the settings; the next
    ones wait for the minute's end, counted."""
    peers = Peers(PeerLimits(waiting=1))
    assert arrive(peers)[0] is not None
    assert arrive(peers)[0] is None
    await asyncio.sleep(0.01)
    for _ in range(9):
        assert arrive(peers)[0] is None
    await asyncio.sleep(0.01)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "wsfanout.servers"]
    assert line.startswith("refused 1 connection over the per-address caps")
    assert "10.0.0.1" in line and "WSFANOUT_MAX_WAITING_PER_ADDRESS" in line
    assert peers.refused == 10


def test_the_settings_are_read() -> None:
    """WSFANOUT_HEAD_TIMEOUT and the two caps: defaults, values, and 0 for no cap."""
    defaults = Settings.from_env({})
    assert (defaults.head_timeout, defaults.max_waiting_per_address) == (5, 256)
    assert defaults.max_connections_per_address == 0
    settings = Settings.from_env(
        {
            "WSFANOUT_HEAD_TIMEOUT": "2.5",
            "WSFANOUT_MAX_WAITING_PER_ADDRESS": "0",
            "WSFANOUT_MAX_CONNECTIONS_PER_ADDRESS": "1000",
        }
    )
    assert settings.head_timeout == 2.5
    assert (settings.max_waiting_per_address, settings.max_connections_per_address) == (0, 1000)
    with pytest.raises(ConfigError, match="WSFANOUT_HEAD_TIMEOUT"):
        Settings.from_env({"WSFANOUT_HEAD_TIMEOUT": "0"})


def test_hypercorn_connections_can_be_counted_in_the_installed_release() -> None:
    """The wrap of hypercorn's TCPServer.run is in place, and its connections' idle task
    is what the count stands in for."""
    assert hypercorn_tcp.check() == ""


def test_a_changed_hypercorn_connection_warns_that_addresses_are_not_counted(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """hypercorn's TCPServer no longer keeps an idle task: one warning says what is lost."""
    from hypercorn.asyncio import tcp_server

    def changed(self: object, *args: object) -> None:
        return None

    monkeypatch.setattr(tcp_server.TCPServer, "__init__", changed)
    reach = ServerReach(compression=False, on_stopping=_nothing, frame_limit=65536)
    reach.start()
    (warning,) = reach_warnings(caplog)
    assert "connections are not counted per address" in warning


async def _nothing() -> None:
    return None


@pytest.fixture
def data_dir(tmp_path: Path, demo_db: Path) -> Path:
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    return tmp_path


class Attack:
    """``tests/trickle.py`` in a process of its own; its last line of counts."""

    def __init__(self, port: int, count: int, sources: tuple[str, ...], *, body: bool) -> None:
        form = ["--body"] if body else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.trickle", *form, str(port), str(count), *sources],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.last = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.last = line.strip()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._reader.join(5)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@contextlib.contextmanager
def trickling(
    port: int, count: int, sources: tuple[str, ...], *, body: bool = False
) -> Iterator[Attack]:
    attack = Attack(port, count, sources, body=body)
    try:
        yield attack
    finally:
        attack.stop()


def health_time(port: int, timeout: float = 10) -> tuple[float, float]:
    """Seconds a GET /healthz from 127.0.0.1 takes to be answered 200 (infinite if it is
    refused, reset, or not answered within ``timeout``), and of them to connect."""
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.connect()
        connected = time.monotonic() - started
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        response.read()
        assert response.status == 200, response.status
    except OSError:
        return math.inf, math.inf
    finally:
        connection.close()
    return time.monotonic() - started, connected


@pytest.mark.parametrize("form", ["head", "body"])
def test_healthz_answers_within_a_second_while_thousands_trickle_request_heads(
    data_dir: Path, server_kind: str, form: str
) -> None:
    """5,000 connections from two addresses each send a byte of a request head every 3 s
    (or a whole POST /login head, then a byte of its body every 3 s) and reconnect at once
    when ended (up to 1,000 a second in all), against a server with 4,096 descriptors:
    /healthz from a third address answers every time within 1 s, for 6 s (more than a head
    timeout), and a websocket opens. Before, neither got in until the head timeout freed
    descriptors (the issue measured 9 s under uvicorn; 4.7 to 13.3 s under hypercorn); a
    trickled body was not counted at all (uvicorn held 10,018 descriptors of one address)."""
    # wsfanout serve: under hypercorn's asyncio worker each connection refused costs several
    # trips through the event loop, and a flood of them (the refused reconnecting at once)
    # delayed everyone else by seconds; serve runs its uvloop worker, which does not.
    server = Server(data_dir, server=server_kind, descriptors=DESCRIPTORS, serve=True)
    body = form == "body"
    with server.running(), trickling(server.port, ATTACKERS, ATTACK_SOURCES, body=body) as attack:
        cookie = server.login("greg")
        time.sleep(2)  # the attack's connections are made, the descriptors taken
        times, connects = [], []
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            answer, connect = health_time(server.port)
            times.append(answer)
            connects.append(connect)
            time.sleep(0.1)
        welcome = asyncio.run(first_event(server.ws_url, cookie))
        under_attack = attack.last
    answered = [t for t in times if t < math.inf]
    print(
        f"figure healthz under the {form} trickle attack ({server_kind}): {len(answered)} of "
        f"{len(times)} answered, median {statistics.median(times):.3f} s, max "
        f"{max(answered, default=math.inf):.3f} s; attacker {under_attack}"
    )
    slow = [(t, c) for t, c in zip(times, connects, strict=True) if t >= HEALTH_BOUND]
    assert not slow, f"(seconds, of them to connect): {slow}"
    assert welcome["type"] == "welcome"
    log = server.log_path.read_text()
    assert "Traceback" not in log, log[-3000:]
    assert re.search(rf"wsfanout ready under {server_kind} \S+ \(uvloop loop\)", log), log[-3000:]


async def first_event(url: str, cookie: str) -> dict[str, Any]:
    """Open a websocket (within 10 s); its first event."""
    async with connect(url, additional_headers={"cookie": cookie}, open_timeout=10) as ws:
        event: dict[str, Any] = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
        return event


HALF_HEAD = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


def half_head(port: int, source: str) -> socket.socket:
    """A connection from ``source`` that sends half a request head and waits."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    sock.sendall(HALF_HEAD)
    return sock


def refused(port: int, source: str, wait: float = 1.0) -> bool:
    """Whether the server resets a new connection from ``source`` at once (False: it is
    still open after ``wait`` seconds)."""
    try:
        sock = socket.create_connection(
            ("127.0.0.1", port), timeout=wait, source_address=(source, 0)
        )
    except ConnectionError:
        return True
    with sock:
        try:
            return sock.recv(1) == b""
        except ConnectionError:
            return True
        except TimeoutError:
            return False


def eventually(check: Callable[[], bool], timeout: float = 10) -> bool:
    """Whether ``check()`` is true within ``timeout`` seconds (the server sees a close a
    moment after the client makes it)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def health_from(port: int, source: str) -> http.client.HTTPConnection:
    """A kept-alive connection from ``source`` that got a 200 from /healthz."""
    connection = http.client.HTTPConnection(
        "127.0.0.1", port, timeout=5, source_address=(source, 0)
    )
    try:
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        response.read()
    except OSError:
        connection.close()
        raise
    assert response.status == 200
    return connection


def answered(port: int, source: str, timeout: float = 10) -> http.client.HTTPConnection:
    """``health_from``, tried again while the server refuses (it sees a close a moment after
    the client makes it)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return health_from(port, source)
        except ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_an_address_keeps_at_most_its_waiting_connections(data_dir: Path, server_kind: str) -> None:
    """WSFANOUT_MAX_WAITING_PER_ADDRESS=2: two half-sent heads from one address are held,
    its third connection is reset at once, other addresses are served; a closed one frees
    its place; a connection kept alive after its request counts too, but is the one closed
    to make room for a new connection."""
    env = {"WSFANOUT_MAX_WAITING_PER_ADDRESS": "2", "WSFANOUT_HEAD_TIMEOUT": "60"}
    with Server(data_dir, env, server=server_kind).running() as server:
        port = server.port
        held = [half_head(port, "127.0.0.2"), half_head(port, "127.0.0.2")]
        try:
            assert eventually(lambda: refused(port, "127.0.0.2"))
            health_from(port, "127.0.0.3").close()
            held.pop(0).close()
            kept = answered(port, "127.0.0.2")  # it waits for its next request now
            try:
                held.append(half_head(port, "127.0.0.2"))
                assert kept.sock is not None
                assert kept.sock.recv(1) == b""  # closed by the server, to make room
            finally:
                kept.close()
            assert refused(port, "127.0.0.2")
        finally:
            for sock in held:
                sock.close()
    log = server.log_path.read_text()
    assert "refused 1 connection over the per-address caps (the last from 127.0.0.2" in log


async def test_an_address_keeps_at_most_its_connections(data_dir: Path, server_kind: str) -> None:
    """WSFANOUT_MAX_CONNECTIONS_PER_ADDRESS=3: with three websockets open from one address
    its next connection is reset at once; once one of them closes, it is accepted."""
    env = {"WSFANOUT_MAX_CONNECTIONS_PER_ADDRESS": "3"}
    with Server(data_dir, env, server=server_kind).running() as server:
        cookie = server.login("greg")
        sockets = [
            await connect(server.ws_url, additional_headers={"cookie": cookie}, local_addr=source)
            for source in [("127.0.0.4", 0)] * 3
        ]
        try:
            for ws in sockets:
                assert "welcome" in str(await ws.recv())
            assert await asyncio.to_thread(refused, server.port, "127.0.0.4")
            assert not await asyncio.to_thread(refused, server.port, "127.0.0.1")
            await sockets.pop().close()
            assert await asyncio.to_thread(
                eventually, lambda: not refused(server.port, "127.0.0.4")
            )
        finally:
            for ws in sockets:
                await ws.close()


def half_body(port: int, source: str) -> socket.socket:
    """A connection from ``source`` that sends a whole POST /login head, waits for the
    server's 100 Continue (its head is read: hypercorn says so at once, uvicorn once the app
    reads the body), sends one byte of its body, and waits."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    sock.sendall(login_head(100, expect=True))
    assert sock.recv(4096).startswith(b"HTTP/1.1 100 ")
    sock.sendall(b"{")
    return sock


def login_head(
    length: int, method: bytes = b"POST", path: bytes = b"/login", *, expect: bool = False
) -> bytes:
    return (
        b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n%s\r\n"
        % (method, path, length, b"Expect: 100-continue\r\n" if expect else b"")
    )


def test_an_address_keeps_at_most_its_waiting_connections_bodies_too(
    data_dir: Path, server_kind: str
) -> None:
    """WSFANOUT_MAX_WAITING_PER_ADDRESS=2: two POST /login whose heads came whole but whose
    bodies have not still wait: the address's third connection is reset at once, another
    address is served; once one body is whole (and answered), the address gets in again.
    Before, a connection stopped waiting with its head: one address held thousands."""
    env = {"WSFANOUT_MAX_WAITING_PER_ADDRESS": "2"}
    with Server(data_dir, env, server=server_kind).running() as server:
        port = server.port
        held = [half_body(port, "127.0.0.2"), half_body(port, "127.0.0.2")]
        try:
            assert refused(port, "127.0.0.2")
            health_from(port, "127.0.0.3").close()
            held[0].sendall(b'"username": "greg", "password": "wrong"}'.ljust(99))
            assert held[0].recv(4096).startswith(b"HTTP/1.1 ")  # answered: it waits no more
            assert eventually(lambda: not refused(port, "127.0.0.2"))
        finally:
            for sock in held:
                sock.close()


@pytest.mark.parametrize(
    ("head", "status"),
    [(login_head(1000), b"408"), (login_head(1000, b"GET", b"/healthz"), b"200")],
    ids=["login-read-by-the-app", "healthz-not-read"],
)
def test_a_request_body_gets_the_body_timeout(
    data_dir: Path, server_kind: str, head: bytes, status: bytes
) -> None:
    """A request whose body trickles, a byte every half second, is answered (POST /login:
    408 once the app's 10 s for a body are over; GET /healthz, which reads no body, at once)
    and closed within 30 s. Before, uvicorn went on reading the body after its answer for as
    long as it trickled (its keep-alive timer stops at each byte)."""
    server = Server(data_dir, server=server_kind)
    with server.running(), socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head)
        sock.settimeout(0.5)
        answer, closed = b"", False
        deadline = time.monotonic() + 30
        while not closed and time.monotonic() < deadline:
            try:
                sock.sendall(b" ")
                data = sock.recv(4096)
            except TimeoutError:
                continue
            except ConnectionError:
                closed = True
            else:
                answer += data
                closed = not data
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:100]
    assert closed


def test_a_request_head_gets_the_head_timeout(data_dir: Path, server_kind: str) -> None:
    """WSFANOUT_HEAD_TIMEOUT=1: a connection that sends half a request head is closed
    within 3 s (hypercorn's own timeout is 5 s, uvicorn had none but wsfanout's 10 s)."""
    env = {"WSFANOUT_HEAD_TIMEOUT": "1"}
    server = Server(data_dir, env, server=server_kind)
    with server.running(), half_head(server.port, "127.0.0.1") as sock:
        sock.settimeout(10)
        started = time.monotonic()
        with contextlib.suppress(ConnectionError):
            while sock.recv(4096):
                pass  # an error status may come before the close
        assert time.monotonic() - started < 3
