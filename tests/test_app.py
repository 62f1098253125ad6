"""app: lifespan, lazy start-up, mounting under a root path, the module-level app."""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests import asgi
from tests.conftest import login
from tests.server import Client, Server, http
from wsfanout import Settings, create_app


async def test_lifespan_starts_and_stops(settings: Settings) -> None:
    """lifespan.startup opens the store; shutdown closes it."""
    app = create_app(settings)
    inbox = asyncio.Queue[dict[str, Any]]()
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    task = asyncio.create_task(app({"type": "lifespan"}, inbox.get, send))
    await inbox.put({"type": "lifespan.startup"})
    await inbox.put({"type": "lifespan.shutdown"})
    await asyncio.wait_for(task, 5)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"database": Path("file") / "db"}, "cannot open database"),
        ({"jwt_secret": "short"}, "HS256 needs at least 32"),
        ({"jwt_public_key": "/nonexistent.pem"}, "WSFANOUT_JWT_PUBLIC_KEY"),
    ],
)
async def test_lifespan_reports_a_failed_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, changes: dict[str, Any], reason: str
) -> None:
    """A database that cannot be opened, or a token key that cannot be used, fails
    startup with the reason, in one log line (no traceback)."""
    (tmp_path / "file").write_text("")
    if "database" in changes:
        changes = {"database": tmp_path / changes["database"]}
    app = create_app(Settings(data_dir=tmp_path, secret_keys=("k",), **changes))
    inbox = asyncio.Queue[dict[str, Any]]()
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    await inbox.put({"type": "lifespan.startup"})
    await asyncio.wait_for(app({"type": "lifespan"}, inbox.get, send), 5)
    assert sent[0]["type"] == "lifespan.startup.failed"
    assert reason in sent[0]["message"]
    assert not [record for record in caplog.records if record.exc_info]


async def test_lazy_start_happens_once(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Without lifespan, concurrent first requests start the app exactly once."""
    caplog.set_level(logging.INFO, logger="wsfanout")
    app = create_app(settings)
    responses = await asyncio.gather(*(asgi.request(app, "GET", "/healthz") for _ in range(20)))
    assert {r.status for r in responses} == {200}
    assert (await asgi.request(app, "GET", "/healthz")).status == 200
    starts = [r for r in caplog.records if r.getMessage().startswith("wsfanout ready")]
    assert len(starts) == 1
    await app.shutdown()


async def test_mounted_under_a_root_path(settings: Settings) -> None:
    """Under root_path /chat: redirects, cookie path and the socket all use the prefix."""
    app = create_app(settings)
    root = "/chat"
    bare = await asgi.request(app, "GET", "", root_path=root)
    assert bare.status == 303 and bare.header("location") == "/chat/"
    anonymous = await asgi.request(app, "GET", "/", root_path=root)
    assert anonymous.header("location") == "login"  # relative: /chat/login
    response = await asgi.request(
        app,
        "POST",
        "/login",
        json={"username": "greg", "password": "Greg-demo"},
        root_path=root,
    )
    assert "Path=/chat/;" in (response.header("set-cookie") or "")
    cookie = response.cookie
    assert cookie is not None
    async with asgi.WebSocket(app, headers={"cookie": cookie}, root_path=root) as ws:
        assert (await ws.receive())["type"] == "welcome"
    await app.shutdown()


async def test_internal_errors_are_json_500(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception in a handler becomes a JSON 500, never a traceback to the client."""
    app = create_app(settings)
    await app.startup()
    cookie = await login(app, "greg")

    async def broken(prefix: str, limit: int) -> None:
        raise RuntimeError("secret internals")

    assert app.service is not None
    monkeypatch.setattr(app.service.store, "directory", broken)
    response = await asgi.request(app, "GET", "/api/directory", headers={"cookie": cookie})
    assert response.status == 500
    assert response.json() == {"error": "Internal server error"}
    await app.shutdown()


def test_hypercorn_serves_from_an_empty_directory(tmp_path: Path) -> None:
    """`hypercorn wsfanout:app` with no variables set serves from an empty directory."""
    with Server(tmp_path, bare=True).running() as server:
        status, headers = http("GET", server.http_url + "/login")
        assert status == 200 and "<form" in headers["_body"]
        assert (tmp_path / "data" / "wsfanout.sqlite3").exists()
        assert (tmp_path / "data" / "secret_key").exists()
    assert "WSFANOUT_SECRET_KEY is not set" in server.log_path.read_text()


async def test_mounted_in_starlette_over_real_hypercorn(tmp_path: Path, demo_db: Path) -> None:
    """Mounted at /chat in Starlette (no lifespan forwarded): login, cookie path and socket work."""
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    with Server(tmp_path, app="tests.mounted:app", health_path="/chat/healthz").running() as server:
        status, headers = http("GET", server.http_url + "/chat/")
        assert status == 200 and "<form" in headers["_body"]  # redirected to /chat/login
        status, headers = http(
            "POST",
            server.http_url + "/chat/login",
            {"username": "greg", "password": "Greg-demo"},
        )
        assert status == 200 and "Path=/chat/;" in headers["set-cookie"]
        cookie = headers["set-cookie"].split(";")[0]
        client = await Client.open(server.ws_url + "chat/", cookie)
        assert (await client.next())["user"] == "greg"
        await client.send({"type": "direct", "user_name": "greg", "text": "to myself"})
        assert (await client.next_of("message"))["text"] == "to myself"
        await client.close()
        with pytest.raises(InvalidStatus):
            await connect(server.ws_url, additional_headers={"cookie": cookie})


def test_hypercorn_refuses_to_start_with_a_bad_setting(tmp_path: Path) -> None:
    """A bad WSFANOUT_* value stops `hypercorn wsfanout:app` at start-up, saying which."""
    server = Server(tmp_path, env={"WSFANOUT_OUTBOX_BYTES": "lots"})
    with pytest.raises(RuntimeError, match="server exited"):
        server.start(timeout=30)
    log = server.log_path.read_text()
    assert "cannot start: WSFANOUT_OUTBOX_BYTES='lots': expected a whole number" in log


@pytest.mark.parametrize(("workers", "warned"), [(1, False), (2, True)])
def test_islands_warning_counts_only_workers(
    tmp_path: Path, demo_db: Path, workers: int, warned: bool
) -> None:
    """Without Redis, several workers are warned about; one worker (whatever helper processes
    multiprocessing starts beside it) is not."""
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    with Server(tmp_path, workers=workers).running() as server:
        for _ in range(4):  # reach every worker
            assert http("GET", server.http_url + "/healthz")[0] == 200
    log = server.log_path.read_text()
    assert ("worker processes and no WSFANOUT_REDIS_URL" in log) is warned, log
