"""End to end: real hypercorn and uvicorn on port 0, real sockets, the demo users."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import shutil
import signal
import time
from collections.abc import AsyncIterator, Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.conftest import DEMO_USERS
from tests.server import SERVERS, Client, RawClient, Server, http
from wsfanout import passwords
from wsfanout.cli import demo_password
from wsfanout.store import Store

USERS = list(DEMO_USERS)


@pytest.fixture(scope="module", params=SERVERS)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, demo_db: Path
) -> Iterator[Server]:
    """One server of each kind for the module, with the demo users plus 'mikey'."""
    data_dir = tmp_path_factory.mktemp("e2e")
    shutil.copy(demo_db, data_dir / "wsfanout.sqlite3")

    async def add_mikey() -> None:
        store = await Store.open(data_dir / "wsfanout.sqlite3")
        await store.add_user(
            "mikey", passwords.hash_password(demo_password("mikey")), first_name="Mikey"
        )
        await store.close()

    asyncio.run(add_mikey())
    env = {"WSFANOUT_RATE_LIMIT": "0", "WSFANOUT_OUTBOX_BYTES": "262144"}
    with Server(data_dir, env, server=request.param).running() as running:
        yield running
    log = running.log_path.read_text()
    assert "Traceback" not in log, log


@pytest.fixture
async def clients(server: Server) -> AsyncIterator[dict[str, Client]]:
    """The six demo users, logged in over HTTP and connected, welcomes consumed."""
    opened = {}
    for name in USERS:
        opened[name] = await Client.open(server.ws_url, server.login(name))
    for client in opened.values():
        assert (await client.next())["type"] == "welcome"
    yield opened
    for client in opened.values():
        await client.close()


async def test_fan_out_to_the_right_users(server: Server, clients: dict[str, Client]) -> None:
    """Broadcast reaches all six; Group girls exactly the girls; Direct Mike both of
    mike's tabs and not mikey."""
    tab2 = await Client.open(server.ws_url, server.login("mike"))
    mikey = await Client.open(server.ws_url, server.login("mikey"))
    await tab2.next(), await mikey.next()
    greg = clients["greg"]

    await greg.send({"type": "BroadCast", "text": "hello all"})
    for name, client in clients.items():
        event = await client.next_of("message")
        assert (event["kind"], event["from"], event["text"]) == (
            "broadcast",
            "greg",
            "hello all",
        ), name
    assert (await tab2.next_of("message"))["text"] == "hello all"
    assert (await mikey.next_of("message"))["text"] == "hello all"

    await greg.send({"type": "Group", "group": "girls", "text": "nails at 5"})
    for name in ("amanda", "lisa", "anny"):
        event = await clients[name].next_of("message")
        assert (event["kind"], event["group"], event["text"]) == ("group", "girls", "nails at 5")

    await greg.send({"type": "Direct", "user_name": "Mike", "text": "hi Mike"})
    for client in (clients["mike"], tab2):
        event = await client.next_of("message")
        assert (event["kind"], event["to"], event["text"]) == ("direct", "mike", "hi Mike")

    others = [c for n, c in clients.items() if n not in {"amanda", "lisa", "anny", "mike"}]
    for client in [*others, mikey]:
        assert await client.quiet() == []
    for client in (clients["mike"], tab2):
        assert await client.quiet(0.05) == []  # exactly once
    await tab2.close()
    await mikey.close()


async def test_refused_handshakes_get_403(server: Server) -> None:
    """Anonymous, tampered-cookie and foreign-Origin handshakes (another site, or this
    host under another scheme) are HTTP 403."""
    cookie = server.login("greg")
    tampered = cookie[:-6] + ("AAAAAA" if not cookie.endswith("AAAAAA") else "BBBBBB")
    attempts: list[dict[str, str]] = [
        {},
        {"cookie": tampered},
        {"cookie": "wsfanout_session=not-a-token"},
        {"cookie": cookie, "origin": "http://evil.example"},
        {"cookie": cookie, "origin": server.http_url.replace("http:", "https:")},
    ]
    for headers in attempts:
        with pytest.raises(InvalidStatus) as caught:
            async with connect(server.ws_url, additional_headers=headers):
                pass
        assert caught.value.response.status_code == 403, headers
    async with connect(
        server.ws_url, additional_headers={"cookie": cookie, "origin": server.http_url}
    ) as ws:
        assert "welcome" in str(await ws.recv())


async def test_unknown_websocket_path_is_refused(server: Server) -> None:
    """A websocket to a path that is not an endpoint is refused before accept."""
    with pytest.raises(InvalidStatus) as caught:
        async with connect(
            server.ws_url + "login", additional_headers={"cookie": server.login("greg")}
        ):
            pass
    assert caught.value.response.status_code == 404


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{oops", "bad_json"),
        ('{"type": "yell", "text": "x"}', "bad_message"),
        ('{"type": "group", "group": "chess", "text": "x"}', "unknown_group"),
        ('{"type": "direct", "user_name": "mik", "text": "x"}', "unknown_user"),
        ('{"type": "broadcast"}', "bad_message"),
    ],
)
async def test_bad_frames_get_errors_and_the_socket_lives(
    clients: dict[str, Client], frame: str, code: str
) -> None:
    """Each bad frame is an error frame to its sender; the same socket then still works."""
    greg, lisa = clients["greg"], clients["lisa"]
    await greg.conn.send(frame)
    error = await greg.next()
    assert error["type"] == "error" and error["code"] == code
    assert await lisa.quiet(0.1) == []
    await greg.send({"type": "broadcast", "text": "after " + code, "id": "ok"})
    assert (await greg.next_of("message"))["text"] == "after " + code
    assert await greg.next() == {"type": "ack", "id": "ok"}
    assert (await lisa.next_of("message"))["text"] == "after " + code


async def test_abrupt_disconnect_mid_stream(server: Server, clients: dict[str, Client]) -> None:
    """A client that resets its TCP connection mid-burst does not stop the next broadcast."""
    raw = RawClient(server.port, server.login("chuck"))
    greg = clients["greg"]
    for n in range(100):
        await greg.send({"type": "broadcast", "text": f"burst {n}"})
        if n == 50:
            raw.reset()
    await greg.send({"type": "broadcast", "text": "after the reset"})
    for name, client in clients.items():
        texts: list[str] = []
        while not texts or texts[-1] != "after the reset":
            texts.append((await client.next_of("message"))["text"])
        assert texts == [f"burst {n}" for n in range(100)] + ["after the reset"], name


async def test_client_that_never_reads_is_closed_1013(
    server: Server, clients: dict[str, Client]
) -> None:
    """A client that stops reading is closed with 1013; everyone else gets every message.

    The readers here share the test's one process with the sender: greg sends at most
    WINDOW messages ahead of what every reader has received, so a reader is never slow
    only because the test's loop was busy sending (uvicorn delivers fast enough for
    that to overflow a 256 KiB outbox)."""
    slow = RawClient(server.port, server.login("anny"), rcvbuf=4096)
    greg = clients["greg"]
    text = "x" * 16_000
    count = 600  # ~9.6 MB each: more than the socket buffers and the 256 KiB outbox hold
    window = 8  # messages in flight to each reader: 128 KB, half the outbox
    received = dict.fromkeys(clients, 0)
    try:
        for n in range(count):
            await greg.send({"type": "broadcast", "text": f"{n:04d}{text}"})
            if n % window < window - 1 and n < count - 1:
                continue
            for name, client in clients.items():
                while received[name] <= n:
                    event = await client.next_of("message", timeout=30)
                    assert event["text"][:4] == f"{received[name]:04d}", name
                    received[name] += 1
        status, health = http("GET", server.http_url + "/healthz")
        assert status == 200 and '"connections":6' in health["_body"]
        code, texts = await asyncio.to_thread(slow.read_until_close)
        assert code == 1013
        assert 0 < len(texts) < count
    finally:
        slow.close()
    log = server.log_path.read_text()
    assert "closing a slow consumer (anny)" in log


async def test_sigterm_closes_every_socket_with_1001(
    tmp_path: Path, demo_db: Path, server_kind: str
) -> None:
    """SIGTERM to the server: every socket gets 1001 promptly, and it exits cleanly."""
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    server = Server(tmp_path, server=server_kind)
    server.start()
    try:
        sockets = [await Client.open(server.ws_url, server.login(n)) for n in ("greg", "lisa")]
        for client in sockets:
            await client.next()
        started = time.monotonic()
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        for client in sockets:
            await asyncio.wait_for(client.reader, 10)
            assert client.conn.close_code == 1001
        assert time.monotonic() - started < 2.5  # inside hypercorn's 3 s graceful timeout
        assert server.proc.wait(15) in server.stopped_by_sigterm
    finally:
        server.stop()
    log = server.log_path.read_text()
    assert "closing every websocket with 1001" in log
    assert "Traceback" not in log, log


async def test_sigterm_under_wsfanout_serve_with_pings(
    tmp_path: Path, demo_db: Path, server_kind: str
) -> None:
    """`wsfanout serve` (pings every 20 s, 10 s graceful timeout): after the sockets were
    used, SIGTERM closes them with 1001 and the process exits within 5 s, with no traceback."""
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    server = Server(tmp_path, serve=True, server=server_kind)
    server.start()
    try:
        clients = [await Client.open(server.ws_url, server.login(n)) for n in ("greg", "lisa")]
        for client in clients:
            await client.next()
        await clients[0].send({"type": "broadcast", "text": "before the stop", "id": "b"})
        for client in clients:
            assert (await client.next_of("message"))["text"] == "before the stop"
        left = await Client.open(server.ws_url, server.login("anny"))  # one that leaves early
        await left.next()
        await left.close()
        assert server.proc is not None
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        for client in clients:
            await asyncio.wait_for(client.reader, 10)
            assert client.conn.close_code == 1001
        assert server.proc.wait(15) in server.stopped_by_sigterm
        assert time.monotonic() - started < 5
    finally:
        server.stop()
    log = server.log_path.read_text()
    assert "Traceback" not in log and "CancelledError" not in log, log


@pytest.mark.parametrize("size", [65_537, 200_000])
async def test_wsfanout_serve_explains_a_too_large_frame(
    tmp_path: Path, demo_db: Path, size: int, server_kind: str
) -> None:
    """Under `wsfanout serve`, a frame over the limit gets a too_large error frame, then 1009."""
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    with Server(tmp_path, serve=True, server=server_kind).running() as server:
        client = await Client.open(server.ws_url, server.login("mike"))
        await client.next()
        await client.conn.send("x" * size)
        error = await client.next_of("error")
        assert error["code"] == "too_large"
        await asyncio.wait_for(client.reader, 10)
        assert client.conn.close_code == 1009


async def _handshakes(url: str, cookies: list[str]) -> tuple[list[Any], list[int]]:
    """Open all at once; (the connections accepted, the HTTP statuses of those refused)."""

    async def one(cookie: str) -> Any:
        return await connect(url, additional_headers={"cookie": cookie}, open_timeout=30)

    results = await asyncio.gather(*(one(c) for c in cookies), return_exceptions=True)
    accepted = [r for r in results if not isinstance(r, BaseException)]
    refused = []
    for result in results:
        if isinstance(result, InvalidStatus):
            refused.append(result.response.status_code)
        elif isinstance(result, BaseException):
            raise result
    return accepted, refused


async def test_connection_limit_holds_under_concurrent_handshakes(
    tmp_path: Path, demo_db: Path, server_kind: str
) -> None:
    """150 handshakes at once against WSFANOUT_MAX_CONNECTIONS=50: exactly 50 get in."""
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    env = {"WSFANOUT_MAX_CONNECTIONS": "50", "WSFANOUT_MAX_CONNECTIONS_PER_USER": "1000"}
    with Server(tmp_path, env, server=server_kind).running() as server:
        cookies = [server.login(name) for name in USERS]
        accepted, refused = await _handshakes(server.ws_url, cookies * 25)
        try:
            assert len(accepted) == 50 and refused == [503] * 100
        finally:
            await asyncio.gather(*(conn.close() for conn in accepted))


async def test_one_user_cannot_take_every_connection(
    tmp_path: Path, demo_db: Path, server_kind: str
) -> None:
    """Past WSFANOUT_MAX_CONNECTIONS_PER_USER a user's next handshake is a 429 with a reason;
    others still get in, and a closed connection gives its place back."""
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    with Server(
        tmp_path, {"WSFANOUT_MAX_CONNECTIONS_PER_USER": "3"}, server=server_kind
    ).running() as server:
        greg = server.login("greg")
        accepted, refused = await _handshakes(server.ws_url, [greg] * 5)
        try:
            assert len(accepted) == 3 and refused == [429, 429]
            status, body = http("GET", server.http_url + "/healthz")
            assert status == 200 and '"connections":3' in body["_body"]
            lisa, _ = await _handshakes(server.ws_url, [server.login("lisa")])
            assert len(lisa) == 1
            await lisa[0].close()
            await accepted.pop().close()
            for _ in range(50):  # the seat comes back once the server has closed it
                again, _ = await _handshakes(server.ws_url, [greg])
                if again:
                    accepted += again
                    break
                await asyncio.sleep(0.05)
            assert len(accepted) == 3
        finally:
            await asyncio.gather(*(conn.close() for conn in accepted))


def login_from(server: Server, source: str, username: str, password: str) -> int:
    """POST /login from a given loopback address; the status."""
    connection = HTTPConnection("127.0.0.1", server.port, timeout=10, source_address=(source, 0))
    try:
        body = json.dumps({"username": username, "password": password})
        connection.request("POST", "/login", body, {"content-type": "application/json"})
        return connection.getresponse().status
    finally:
        connection.close()


def test_guessing_from_one_address_does_not_lock_the_owner_out(server: Server) -> None:
    """5 wrong passwords for lisa from 127.0.0.2: that address is throttled for lisa, while
    lisa from 127.0.0.3 logs in."""
    for _ in range(5):
        assert login_from(server, "127.0.0.2", "lisa", "wrong") == 401
    assert login_from(server, "127.0.0.2", "lisa", "Lisa-demo") == 429
    assert login_from(server, "127.0.0.3", "lisa", "Lisa-demo") == 200


def test_parallel_guesses_get_no_more_than_the_limit(server: Server) -> None:
    """100 logins for chuck at once from 127.0.0.4, the right password among them: at most
    5 are checked (counted before the password is), the rest get 429, the right one too."""
    passwords = ["wrong"] * 100
    passwords[50] = "Chuck-demo"
    with concurrent.futures.ThreadPoolExecutor(100) as pool:
        statuses = list(pool.map(lambda p: login_from(server, "127.0.0.4", "chuck", p), passwords))
    assert statuses.count(429) >= 95, statuses
    assert sum(s in (200, 401) for s in statuses) <= 5, statuses


async def test_a_listening_socket_is_closed_when_its_session_expires(
    tmp_path: Path, demo_db: Path, server_kind: str
) -> None:
    """A socket that never sends is told its session expired and closed with 1008 on time."""
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    with Server(
        tmp_path, {"WSFANOUT_SESSION_MAX_AGE": "2"}, server=server_kind
    ).running() as server:
        client = await Client.open(server.ws_url, server.login("chuck"))
        assert (await client.next())["type"] == "welcome"
        error = await client.next_of("error", timeout=5)
        assert error["code"] == "forbidden"
        await asyncio.wait_for(client.reader, 5)
        assert client.conn.close_code == 1008
