"""servers: the reaches into hypercorn and uvicorn, checked against the installed releases
and real servers; ``wsfanout serve --server``.

If a hypercorn or uvicorn upgrade moves what ``servers/`` reaches for, the tests here
(and the end-to-end ones, which run under both) fail: the start-up check finds the
problem, a deflate offer is accepted again, or SIGTERM no longer closes sockets with 1001.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest
from hypercorn.protocol import ws_stream
from websockets.asyncio.client import connect
from wsproto.events import Ping, TextMessage

from tests import asgi, docs
from tests.conftest import login
from tests.server import ROOT, WSFANOUT, Client, RawClient, Server, http, wsfanout
from wsfanout import Settings, create_app
from wsfanout.cli.command import GIT_URL
from wsfanout.servers import ACCEPT_KEY, ServerReach
from wsfanout.servers import hypercorn as hypercorn_adapter  # wraps hypercorn's classes now

DEFLATE_OFFER = "permessage-deflate; client_max_window_bits"


async def _nothing() -> None:
    return None


def reach_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "wsfanout.servers" and r.levelno >= logging.WARNING
    ]


@pytest.mark.parametrize("compression", [False, True])
def test_every_reach_works_with_the_installed_hypercorn(
    compression: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The start-up check finds both reaches in this hypercorn and warns about nothing."""
    reach = ServerReach(compression=compression, on_stopping=_nothing, frame_limit=65536)
    reach.start()
    assert (reach.can_decline, reach.can_watch, reach.can_stop_pings) == (True, True, True)
    assert (reach.can_bound, reach.can_abort) == (True, True)
    accept = reach.accept_message()
    assert accept == {"type": "websocket.accept", ACCEPT_KEY: accept[ACCEPT_KEY]}
    assert isinstance(accept[ACCEPT_KEY], hypercorn_adapter.HypercornAdapter)
    assert reach_warnings(caplog) == []


def test_a_changed_message_buffer_warns_and_leaves_frames_to_hypercorn(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """hypercorn's WebsocketBuffer changed: one warning names the loss; the rest works."""
    monkeypatch.delattr(ws_stream.WebsocketBuffer, "to_message")
    reach = ServerReach(compression=False, on_stopping=_nothing, frame_limit=65536)
    reach.start()
    assert not reach.can_bound
    assert (reach.can_decline, reach.can_watch, reach.can_abort) == (True, True, True)
    (warning,) = reach_warnings(caplog)
    assert "frames over the limit get hypercorn's bare 1009" in warning


def test_an_abort_that_cannot_reach_the_socket_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stream whose connection is not where it was: abort says no, and warns once."""
    reach = ServerReach(compression=False, on_stopping=_nothing, frame_limit=65536)
    reach.start()
    assert reach.abort(None) is False
    assert reach_warnings(caplog) == []
    assert reach.abort(object()) is False
    assert reach.abort(object()) is False
    (warning,) = reach_warnings(caplog)
    assert "(abort)" in warning
    assert not reach.can_abort


def test_a_changed_handshake_warns_once_and_keeps_the_stop_signal(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A hypercorn whose Handshake changed: one warning naming what is lost; the rest works."""

    def changed(self: object, *args: object) -> None:
        raise TypeError("accept() takes 4 positional arguments")

    monkeypatch.setattr(ws_stream.Handshake, "accept", changed)
    reach = ServerReach(compression=False, on_stopping=_nothing)
    reach.start()
    assert (reach.can_decline, reach.can_watch, reach.can_stop_pings) == (False, True, True)
    (warning,) = reach_warnings(caplog)
    assert "cannot decline permessage-deflate" in warning and "TypeError" in warning


def test_compression_on_does_not_warn_about_declining(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With compression on, a handshake that cannot decline is nothing to warn about."""
    monkeypatch.setattr(ws_stream.Handshake, "accept", None)
    reach = ServerReach(compression=True, on_stopping=_nothing)
    reach.start()
    assert not reach.can_decline and reach_warnings(caplog) == []


async def test_a_hypercorn_without_the_accept_hook_still_serves(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """WSStream._accept gone: one warning names both losses; the app still serves sockets."""
    monkeypatch.delattr(ws_stream.WSStream, "_accept")
    app = create_app(settings)
    await app.startup()
    try:
        (warning,) = reach_warnings(caplog)
        assert "cannot decline permessage-deflate" in warning
        assert "cannot see hypercorn start stopping" in warning
        assert "cannot end hypercorn's pings" in warning
        cookie = await login(app, "greg")
        async with asgi.WebSocket(app, headers={"cookie": cookie}) as ws:
            assert (await ws.receive())["type"] == "welcome"
    finally:
        await app.shutdown()


def test_a_hypercorn_without_the_ping_loop_warns_about_pings_only(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """WSStream._send_pings gone: one warning about pings; deflate and the stop signal work."""
    monkeypatch.delattr(ws_stream.WSStream, "_send_pings")
    reach = ServerReach(compression=False, on_stopping=_nothing)
    reach.start()
    assert (reach.can_decline, reach.can_watch, reach.can_stop_pings) == (True, True, False)
    (warning,) = reach_warnings(caplog)
    assert "cannot end hypercorn's pings" in warning and "deflate" not in warning


@pytest.fixture
def uvicorn_server(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A uvicorn Server (not started) holding SIGTERM, as it does while it serves; configured
    as `wsfanout serve` configures it, or with uvicorn's defaults (param "defaults")."""
    import uvicorn

    from wsfanout.servers.uvicorn import DrainingServer, HeadTimedH11Protocol
    from wsfanout.servers.uvicorn_sansio import ExplainingSansIOProtocol

    kind = getattr(request, "param", "")
    if kind == "defaults":
        config = uvicorn.Config("wsfanout:app")
    elif kind == "serve":  # as `wsfanout serve` builds it: its classes, passed in
        config = uvicorn.Config(
            "wsfanout:app", ws=ExplainingSansIOProtocol, http=HeadTimedH11Protocol
        )
        config.proxy_headers = False
    else:
        config = uvicorn.Config(
            "wsfanout:app", ws="websockets-sansio", http="h11", proxy_headers=False
        )
    config.load()
    server = DrainingServer(config) if kind == "serve" else uvicorn.Server(config)
    previous = signal.signal(signal.SIGTERM, server.handle_exit)
    try:
        yield server
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("compression", [False, True])
def test_every_reach_works_with_the_installed_uvicorn(
    uvicorn_server: Any, compression: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Under uvicorn the reach writes its settings into uvicorn's config, wraps its shutdown
    once however many apps start, and warns about nothing."""
    for _ in range(2):
        reach = ServerReach(compression=compression, on_stopping=_nothing, frame_limit=4096)
        reach.start()
    assert uvicorn_server.config.ws_per_message_deflate is compression
    assert uvicorn_server.config.ws_max_size == 4096
    assert (reach.can_decline, reach.can_watch, reach.can_bound, reach.can_abort) == (
        True,
        True,
        True,
        True,
    )
    assert reach.name.startswith("uvicorn ") and reach.deflate == (
        "accepted" if compression else "declined"
    )
    assert uvicorn_server.shutdown.__name__ == "draining"
    assert uvicorn_server.config.http_protocol_class.__name__ == "HeadTimedH11Protocol"
    assert reach_warnings(caplog) == []


@pytest.mark.parametrize("uvicorn_server", ["serve"], indirect=True)
def test_wsfanout_serve_configures_uvicorn_and_patches_nothing(
    uvicorn_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Under the server `wsfanout serve` builds (its classes passed to uvicorn's Config and
    a DrainingServer), every reach works and nothing of uvicorn's is replaced at start."""
    from wsfanout.servers.uvicorn import HeadTimedH11Protocol
    from wsfanout.servers.uvicorn_sansio import ExplainingSansIOProtocol

    reach = ServerReach(compression=False, on_stopping=_nothing, frame_limit=4096)
    reach.start()
    assert (reach.can_decline, reach.can_watch, reach.can_bound, reach.can_abort) == (
        True,
        True,
        True,
        True,
    )
    assert "shutdown" not in vars(uvicorn_server)  # its own method drains, not a wrapper
    assert len(uvicorn_server.drains) == 1
    assert uvicorn_server.config.http_protocol_class is HeadTimedH11Protocol
    assert uvicorn_server.config.ws_protocol_class is ExplainingSansIOProtocol
    assert reach_warnings(caplog) == []


@pytest.mark.parametrize("uvicorn_server", ["defaults"], indirect=True)
def test_uvicorn_defaults_get_warnings(
    uvicorn_server: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Plain `uvicorn wsfanout:app` (proxy headers from 127.0.0.1; httptools where it is
    installed, as it is not here: uvicorn's module of it stands in): a warning for each,
    naming the flag that avoids it."""
    import types

    httptools = type("HttpToolsProtocol", (), {})
    module = types.SimpleNamespace(HttpToolsProtocol=httptools)
    monkeypatch.setitem(sys.modules, "uvicorn.protocols.http.httptools_impl", module)
    uvicorn_server.config.http_protocol_class = httptools
    reach = ServerReach(compression=False, on_stopping=_nothing, frame_limit=4096)
    reach.start()
    warnings = reach_warnings(caplog)
    assert any("--http h11" in w for w in warnings), warnings
    assert any("--no-proxy-headers" in w for w in warnings), warnings


def test_a_changed_uvicorn_protocol_warns_and_leaves_frames_to_uvicorn(
    uvicorn_server: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """uvicorn's protocol lost a method the reach wraps: one warning names the loss; the
    drain still works; connections are left to uvicorn (no handle for abort)."""
    from uvicorn.protocols.websockets import websockets_sansio_impl

    monkeypatch.delattr(websockets_sansio_impl.WebSocketsSansIOProtocol, "handle_cont")
    reach = ServerReach(compression=False, on_stopping=_nothing, frame_limit=4096)
    reach.start()
    assert reach.can_watch and not reach.can_bound and not reach.can_abort
    (warning,) = reach_warnings(caplog)
    assert "WebSocketsSansIOProtocol changed" in warning
    cls = websockets_sansio_impl.WebSocketsSansIOProtocol
    protocol = cls.__new__(cls)
    assert reach.accepted({"type": "websocket.accept"}, protocol.receive) is None


def test_a_uvicorn_connection_missing_its_state_warns_once_per_reach(
    uvicorn_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A protocol object without the state the reach uses: no handle, one warning per
    reach, and later connections are left to uvicorn."""
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    reach = ServerReach(compression=False, on_stopping=_nothing, frame_limit=4096)
    reach.start()
    protocol = WebSocketsSansIOProtocol.__new__(WebSocketsSansIOProtocol)  # no state at all
    for _ in range(2):
        assert reach.accepted({"type": "websocket.accept"}, protocol.receive) is None
    warnings = reach_warnings(caplog)
    assert len(warnings) == 2 and all("reach into uvicorn" in w for w in warnings), warnings


def test_under_another_server_nothing_is_reached(caplog: pytest.LogCaptureFixture) -> None:
    """uvicorn imported but not serving (no SIGTERM handler of its own): not taken for it."""
    import uvicorn.server  # noqa: F401

    reach = ServerReach(compression=False, on_stopping=_nothing)
    reach.start()
    assert not reach.name.startswith("uvicorn")


def test_wsfanout_serve_still_pings(tmp_path: Path, demo_db: Path, server_kind: str) -> None:
    """Under `wsfanout serve --ping-interval 0.2`, a connection gets a ping every interval."""
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    args = ("--ping-interval", "0.2")
    with Server(tmp_path, serve=True, args=args, server=server_kind).running() as server:
        client = RawClient(server.port, server.login("chuck"))
        try:
            started = time.monotonic()
            pings = client.count_pings(3)
            elapsed = time.monotonic() - started
        finally:
            client.close()
    assert pings == 3 and 0.2 < elapsed < 5


def deflate_answer(server: Server, path: str, cookie: str) -> tuple[str | None, str | None]:
    """Connect as a browser does (offering deflate); (what was offered, what was answered)."""

    async def handshake() -> tuple[str | None, str | None]:
        async with connect(server.ws_url + path, additional_headers={"cookie": cookie}) as conn:
            assert conn.request is not None and conn.response is not None
            await conn.recv()  # the welcome arrives, compressed or not
            return (
                conn.request.headers.get("Sec-WebSocket-Extensions"),
                conn.response.headers.get("Sec-WebSocket-Extensions"),
            )

    return asyncio.run(handshake())


@pytest.mark.parametrize(("setting", "answered"), [("", None), ("off", None), ("on", "deflate")])
def test_the_server_declines_deflate_unless_compression_is_on(
    tmp_path: Path, demo_db: Path, setting: str, answered: str | None, server_kind: str
) -> None:
    """Under plain hypercorn or uvicorn (which accepts deflate unless told) a deflate offer
    gets no extension by default, and deflate when on."""
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    env = {"WSFANOUT_COMPRESSION": setting} if setting else {}
    args = ("--ws-per-message-deflate", "true") if server_kind == "uvicorn" else ()
    with Server(tmp_path, env, server=server_kind, args=args).running() as server:
        offered, answer = deflate_answer(server, "", server.login("greg"))
    assert offered is not None and "permessage-deflate" in offered
    if answered is None:
        assert answer is None
    else:
        assert answer is not None and "permessage-deflate" in answer
    assert "not a release wsfanout was tested with" not in server.log_path.read_text()


def test_mounted_in_starlette_declines_deflate(
    tmp_path: Path, demo_db: Path, server_kind: str
) -> None:
    """Mounted at /chat in Starlette (which wraps ``send``), a deflate offer is still declined."""
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    mounted = Server(
        tmp_path, app="tests.mounted:app", health_path="/chat/healthz", server=server_kind
    )
    with mounted.running() as server:
        status, headers = http(
            "POST",
            server.http_url + "/chat/login",
            {"username": "lisa", "password": "Lisa-demo"},
        )
        assert status == 200
        offered, answer = deflate_answer(server, "chat/", headers["set-cookie"].split(";")[0])
    assert offered is not None and "permessage-deflate" in offered
    assert answer is None


async def test_mounted_in_starlette_closes_1001_on_sigterm(
    tmp_path: Path, demo_db: Path, server_kind: str
) -> None:
    """SIGTERM to the server of the Starlette mount: sockets get 1001 before the timeout."""
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    server = Server(
        tmp_path, app="tests.mounted:app", health_path="/chat/healthz", server=server_kind
    )
    server.start()
    try:
        status, headers = http(
            "POST",
            server.http_url + "/chat/login",
            {"username": "anny", "password": "Anny-demo"},
        )
        assert status == 200
        client = await Client.open(server.ws_url + "chat/", headers["set-cookie"].split(";")[0])
        assert (await client.next())["type"] == "welcome"
        assert server.proc is not None
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(client.reader, 10)
        assert client.conn.close_code == 1001
        assert time.monotonic() - started < 2.5  # hypercorn's own graceful timeout is 3 s
        assert server.proc.wait(15) in server.stopped_by_sigterm
    finally:
        server.stop()


async def test_wsfanout_serve_uvicorn_workers_drain_on_sigterm(
    tmp_path: Path, demo_db: Path
) -> None:
    """`wsfanout serve --server uvicorn --workers 2`: each worker gets wsfanout's protocol
    classes through its config and drains on SIGTERM (uvicorn's Multiprocess builds a plain
    Server per worker), with no warning about a reach."""
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    server = Server(tmp_path, serve=True, server="uvicorn", workers=2)
    server.start()
    try:
        client = await Client.open(server.ws_url, server.login("anny"))
        assert (await client.next())["type"] == "welcome"
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(client.reader, 10)
        assert client.conn.close_code == 1001
        assert server.proc.wait(15) in server.stopped_by_sigterm
    finally:
        server.stop()
    log = server.log_path.read_text()
    assert "not a release wsfanout was tested with" not in log, log
    assert "not websockets-sansio" not in log and "Traceback" not in log, log


def raw_handshake(port: int, cookie: str, extensions: str) -> str:
    """Send a websocket upgrade with these extension offers; the response head, lower-cased."""
    request = (
        "GET / HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Extensions: {extensions}\r\nCookie: {cookie}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
    return head.partition(b"\r\n\r\n")[0].decode("latin-1").lower()


@pytest.mark.parametrize(
    ("offer", "under_uvicorn"),
    [
        ("permessage-deflate; client_max_window_bits=foo", "declined"),
        ('permessage-deflate; client_max_window_bits="15"', "deflate"),  # quoted 15 is 15
        ("permessage-deflate; server_max_window_bits=", "400"),
    ],
)
def test_compression_on_declines_an_offer_it_cannot_parse(
    tmp_path: Path, demo_db: Path, offer: str, under_uvicorn: str, server_kind: str
) -> None:
    """With compression on, a malformed deflate offer is declined (hypercorn), or answered
    as uvicorn's websockets reads it (a 400, or deflate), not a dropped connection."""
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    with Server(tmp_path, {"WSFANOUT_COMPRESSION": "on"}, server=server_kind).running() as server:
        head = raw_handshake(server.port, server.login("greg"), offer)
        good = raw_handshake(server.port, server.login("greg"), "permessage-deflate")
    answer = "declined" if server_kind == "hypercorn" else under_uvicorn  # websockets decides
    if answer == "400":
        assert head.startswith("http/1.1 400"), head
    else:
        assert head.startswith("http/1.1 101"), head
        assert ("sec-websocket-extensions: permessage-deflate" in head) == (answer == "deflate")
    assert "sec-websocket-extensions: permessage-deflate" in good
    assert "Traceback" not in server.log_path.read_text()


@pytest.mark.parametrize(
    ("installed", "hint"),
    [
        ("editable", f"pip install -e '{ROOT}[uvicorn]'"),
        (
            "wheel",
            "pip install -e '.[uvicorn]' in a clone of wsfanout, or "
            f"pip install 'wsfanout[uvicorn] @ git+{GIT_URL}'",
        ),
    ],
)
def test_without_uvicorn_serve_says_what_to_install(
    tmp_path: Path, installed: str, hint: str
) -> None:
    """`--server uvicorn` (here from WSFANOUT_SERVER) where uvicorn cannot be imported:
    one line naming how to add the extra (wsfanout is on no index: into the clone it was
    installed from, else from a clone or the git URL), before anything is opened."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "uvicorn.py").write_text("raise ImportError(\"No module named 'uvicorn'\")\n")
    if installed == "wheel":  # found before the editable install's metadata; no direct_url
        info = shim / "wsfanout-0.1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.4\nName: wsfanout\nVersion: 0.1.0\n")
    result = wsfanout(tmp_path, "serve", WSFANOUT_SERVER="uvicorn", PYTHONPATH=f"{shim}:{ROOT}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "wsfanout: error: --server uvicorn needs uvicorn and websockets (No module named "
        f"'uvicorn'): {hint}"
    ]
    assert not (tmp_path / "wsfanout.sqlite3").exists()


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("--server", "gunicorn"), "--server 'gunicorn' (or $WSFANOUT_SERVER): expected one of"),
        (("--proxy-headers",), "--proxy-headers needs --server uvicorn"),
    ],
)
def test_serve_refuses_what_it_cannot_do(tmp_path: Path, args: tuple[str, ...], error: str) -> None:
    """An unknown server, or proxy headers under hypercorn: one line, exit 1."""
    result = wsfanout(tmp_path, "serve", *args)
    assert result.returncode == 1
    assert result.stderr.startswith(f"wsfanout: error: {error}"), result.stderr
    assert "Traceback" not in result.stderr


def wrong_logins(server: Server, forwarded_for: list[str]) -> list[int]:
    """A wrong password for greg from 127.0.0.1 (the proxy uvicorn trusts by default), once
    with each X-Forwarded-For; the statuses."""
    statuses = []
    for address in forwarded_for:
        connection = HTTPConnection(
            "127.0.0.1", server.port, timeout=10, source_address=("127.0.0.1", 0)
        )
        try:
            body = json.dumps({"username": "greg", "password": "wrong"})
            headers = {"content-type": "application/json", "x-forwarded-for": address}
            connection.request("POST", "/login", body, headers)
            statuses.append(connection.getresponse().status)
        finally:
            connection.close()
    return statuses


@pytest.mark.parametrize("trusted", [False, True], ids=["default", "proxy-headers"])
def test_uvicorn_takes_forwarded_addresses_only_when_asked(
    tmp_path: Path, demo_db: Path, trusted: bool
) -> None:
    """Under `wsfanout serve --server uvicorn`, X-Forwarded-For is ignored: a client cannot
    escape the login throttle by naming a new address each time. With --proxy-headers
    (trusting the sender), each named address is counted apart."""
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    args = ("--proxy-headers",) if trusted else ()
    with Server(tmp_path, serve=True, server="uvicorn", args=args).running() as server:
        statuses = wrong_logins(server, [f"203.0.113.{n}" for n in range(1, 8)])
    assert statuses == ([401] * 7 if trusted else [401] * 5 + [429] * 2)


def test_the_docs_give_plain_uvicorn_the_flags_serve_passes(tmp_path: Path) -> None:
    """docs/operating/servers.md's `uvicorn wsfanout:app` command sets what `wsfanout serve --server
    uvicorn` does (as uvicorn's own command line reads it), deflate off first; and it serves
    (on a port of the test's own) until /healthz answers."""
    import argparse
    import importlib

    from wsfanout.cli.serve import PING_INTERVAL, uvicorn_options

    command = importlib.import_module("uvicorn.main").main  # `uvicorn.main` is a function

    page = "docs/operating/servers.md"
    block = docs.block(page, "test_the_docs_give_plain_uvicorn_the_flags_serve_passes")
    (line,) = docs.commands(block)
    assert line.startswith("uvicorn wsfanout:app ")
    flags = line.split()[2:]
    assert flags[:2] == ["--ws-per-message-deflate", "false"]
    read = command.make_context("uvicorn", [*flags, "wsfanout:app"]).params
    args = argparse.Namespace(
        ping_interval=PING_INTERVAL,
        proxy_headers=False,
        forwarded_allow_ips="127.0.0.1",
        workers=1,
        access_log=False,
    )
    passed = uvicorn_options(Settings(), args)
    left_to_uvicorn = {"loop", "workers", "access_log", "log_level", "forwarded_allow_ips"}
    for name, value in passed.items():
        if name not in left_to_uvicorn:
            assert read[name] == value, name
    port = docs.free_port()
    served = docs.substituted(
        block, {"uvicorn wsfanout:app": f"uvicorn wsfanout:app --port {port}"}
    )
    assert json.loads(docs.run_shell(served, tmp_path).healthz[0])["status"] == "ok"


@pytest.mark.parametrize("uvicorn_server", ["plain", "serve"], indirect=True)
async def test_every_app_in_one_uvicorn_server_is_drained(uvicorn_server: Any) -> None:
    """Two apps started in one uvicorn server (two mounts): its shutdown drains both, then
    runs uvicorn's own; under plain uvicorn (a wrapped shutdown) and `wsfanout serve`'s."""
    import types

    drained = []

    def stopping(name: str) -> Any:
        async def on_stopping() -> None:
            drained.append(name)

        return on_stopping

    for name in ("first", "second"):
        ServerReach(compression=False, on_stopping=stopping(name), frame_limit=4096).start()
    uvicorn_server.servers = []

    async def lifespan_shutdown() -> None:
        drained.append("uvicorn")

    uvicorn_server.lifespan = types.SimpleNamespace(shutdown=lifespan_shutdown)
    await uvicorn_server.shutdown()
    assert drained == ["first", "second", "uvicorn"]


def unix_health(path: Path) -> int:
    """GET /healthz over a unix socket; the status (0: nothing listens)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(path))
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return int(sock.recv(4096).split()[1])
    except OSError:
        return 0


def test_uvicorn_serves_on_a_unix_socket_again_after_a_stop(tmp_path: Path, demo_db: Path) -> None:
    """`--bind unix:PATH` under uvicorn: serves, stops on SIGTERM with 0 and removes the
    socket; a stale socket file left by a killed run does not stop the next start."""
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    path = tmp_path / "wsfanout.sock"
    command = [str(WSFANOUT), "serve", "--server", "uvicorn"]
    env = {**os.environ, "WSFANOUT_DATA_DIR": str(tmp_path), "WSFANOUT_SECRET_KEY": "k" * 32}
    for stop in (signal.SIGKILL, signal.SIGTERM):  # a killed run leaves its socket file
        proc = subprocess.Popen([*command, "--bind", f"unix:{path}"], env=env, cwd=tmp_path)
        try:
            deadline = time.monotonic() + 30
            while unix_health(path) != 200:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        finally:
            proc.send_signal(stop)
            code = proc.wait(15)
        assert code == (0 if stop == signal.SIGTERM else -signal.SIGKILL)
    assert not path.exists()


def test_the_first_ping_comes_an_interval_after_accept(
    tmp_path: Path, demo_db: Path, server_kind: str
) -> None:
    """Under `wsfanout serve`, a connection's first ping comes an interval after accept, not at
    once (hypercorn pinged at accept: Autobahn's fuzzing client, writing its first frame in
    pieces, answered in the middle of it and broke its own frame, case 6.4.3)."""
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    args = ("--ping-interval", "30")
    with Server(tmp_path, serve=True, args=args, server=server_kind).running() as server:
        client = RawClient(server.port, server.login("chuck"))
        try:
            frame = b'{"type": "broadcast", "id": "p", "text": "hi"}'
            client.sock.sendall(client.ws.send(TextMessage(frame.decode())))
            events = client._events_until(
                lambda e: isinstance(e, TextMessage) and '"ack"' in e.data
            )
        finally:
            client.close()
    assert isinstance(events[-1], TextMessage), events  # the ack came
    assert not [e for e in events if isinstance(e, Ping)], events
