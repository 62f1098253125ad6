"""Shared fixtures: a demo database made once, fresh settings and a started app per test."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests import asgi, postgres
from wsfanout import App, Settings, create_app
from wsfanout.cli import DEMO_GROUPS, create_demo, demo_password
from wsfanout.store import Store

if TYPE_CHECKING:
    from tests.server import RedisServer

SECRET = "test-secret-key"
# The demo users (username -> group), as `wsfanout demo` creates them.
DEMO_USERS = {first.lower(): group for group, members in DEMO_GROUPS.items() for first in members}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests first, the longest first (``slow(seconds)``), each followed by a quick one.

    `just test` spreads the suite over several workers (pytest-xdist), which take tests in
    this order, one at a time (``--maxschedchunk 1``): a long test taken last would keep
    every other worker waiting for it. A worker is always handed the test after the one it
    starts (xdist keeps one queued), so a quick test between two slow ones keeps the next
    slow one free for an idle worker rather than queued behind its neighbour."""

    def seconds(item: pytest.Item) -> float:
        marker = item.get_closest_marker("slow")
        return float(marker.args[0]) if marker is not None and marker.args else 0.0

    slow = sorted(
        (item for item in items if item.get_closest_marker("slow") is not None),
        key=seconds,
        reverse=True,
    )
    quick = [item for item in items if item.get_closest_marker("slow") is None]
    between = quick[: len(slow)]
    items[:] = [
        *(item for pair in zip(slow, between, strict=False) for item in pair),
        *slow[len(between) :],
        *quick[len(between) :],
    ]


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


@pytest.fixture(params=["hypercorn", "uvicorn"])
def server_kind(request: pytest.FixtureRequest) -> str:
    """Which ASGI server a real-server test runs under: each test runs under both."""
    return str(request.param)


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix of this test's own in the Redis at 127.0.0.1:6379; its keys are deleted
    afterwards. Skipped without Redis, except under CI=true, which must have it."""
    from tests.server import delete_redis_keys, need_redis

    need_redis()
    prefix = f"wsfanout-test-{uuid.uuid4().hex[:10]}:"
    yield prefix
    delete_redis_keys(prefix)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own on a free port, to stop and start at will. Skipped
    when redis-server is not installed, except under CI=true, which must have it."""
    from tests.server import RedisServer

    if shutil.which("redis-server") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is not installed, and CI=true requires it")
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A PostgreSQL database of this run's own (dropped at the end); its URL."""
    postgres.need_postgres()
    with postgres.run_database() as url:
        yield url


@pytest.fixture
def pg_url(pg_database: str) -> Iterator[str]:
    """A schema of this test's own in the run's PostgreSQL database; the URL using it."""
    with postgres.schema(pg_database) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """Where a test's store lives, once for each backend: a SQLite file, a PostgreSQL URL."""
    if request.param == "sqlite":
        return tmp_path / "sub" / "db.sqlite3"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def settings(tmp_path: Path, demo_db: Path) -> Settings:
    """Settings for one test: its own copy of the demo database and a fixed key. No
    online / offline events: tests that read events in order expect only their own
    (tests of presence turn them on)."""
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    return Settings(data_dir=tmp_path, secret_keys=(SECRET,), presence_events_max=0)


@pytest.fixture(params=["sqlite", "postgresql"])
def settings_on_each_backend(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    """``settings``, once on the demo SQLite file and once with the same users, groups and
    password hashes in PostgreSQL (a schema of the test's own). A module whose every test
    should hold on both overrides ``settings`` with this."""
    if request.param == "sqlite":
        return settings
    url = str(request.getfixturevalue("pg_url"))
    postgres.in_thread(copy_store, settings.database_path, url)
    return dataclasses.replace(settings, database_url=url)


async def copy_store(source: Path, target: str) -> None:
    """The users (with their password hashes) and groups of one store, added to another."""
    old, new = await Store.open(source), await Store.open(target)
    try:
        for name, _ in await old.list_groups():
            await new.add_group(name)
        for username, _ in await old.list_users("", 10_000):
            user = await old.user_by_name(username)
            assert user is not None
            groups = tuple(await old.groups_of(user.id))
            await new.add_user(
                username, user.password_hash, first_name=user.first_name, groups=groups
            )
    finally:
        await old.close()
        await new.close()


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
        json={"username": username, "password": password or demo_password(username)},
        client=client,
    )
    assert response.status == 200, response.body
    cookie = response.cookie
    assert cookie is not None
    return cookie
