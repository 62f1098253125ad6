"""Shared fixtures: a demo database made once, fresh settings and a started app per test."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests import asgi
from wsfanout import App, Settings, create_app
from wsfanout.cli import DEMO_GROUPS, create_demo
from wsfanout.store import Store

SECRET = "test-secret-key"
# The demo users (username -> group), as `wsfanout demo` creates them.
DEMO_USERS = {first.lower(): group for group, members in DEMO_GROUPS.items() for first in members}


@pytest.fixture(scope="session")
def demo_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A database holding the demo users, hashed once for the whole run."""
    path = tmp_path_factory.mktemp("demo") / "demo.sqlite3"

    async def build() -> None:
        store = await Store.open(path)
        try:
            await create_demo(store)
        finally:
            await store.close()

    asyncio.run(build())
    return path


@pytest.fixture
def settings(tmp_path: Path, demo_db: Path) -> Settings:
    """Settings for one test: its own copy of the demo database and a fixed key. No
    online / offline events: tests that read events in order expect only their own
    (tests of presence turn them on)."""
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    return Settings(data_dir=tmp_path, secret_keys=(SECRET,), presence_events_max=0)


@contextlib.asynccontextmanager
async def started(settings: Settings, **changes: Any) -> AsyncIterator[App]:
    """An app with these settings changed, started, and shut down afterwards."""
    application = create_app(dataclasses.replace(settings, **changes))
    await application.startup()
    try:
        yield application
    finally:
        await application.shutdown()


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[App]:
    application = create_app(settings)
    await application.startup()
    yield application
    await application.shutdown()


async def login(
    app: App,
    username: str,
    password: str | None = None,
    client: tuple[str, int] = ("127.0.0.1", 40000),
) -> str:
    """Log in through the app; returns the ``Cookie`` header value."""
    response = await asgi.request(
        app,
        "POST",
        "/login",
        json={"username": username, "password": password or username.capitalize()},
        client=client,
    )
    assert response.status == 200, response.body
    cookie = response.cookie
    assert cookie is not None
    return cookie
