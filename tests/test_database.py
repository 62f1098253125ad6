"""database: schema versions and upgrades on both backends, and what a failing one says."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import asyncpg
import pytest

from wsfanout.database import VERSION, numbered
from wsfanout.store import DatabaseError, Store, StoreError
from wsfanout.throttle import DatabaseCounts

# The schema as wsfanout wrote it before it had versions (SQLite only).
UNVERSIONED = """
CREATE TABLE users (id INTEGER PRIMARY KEY, username TEXT NOT NULL UNIQUE COLLATE NOCASE,
    first_name TEXT NOT NULL DEFAULT '', password_hash TEXT NOT NULL, created_at REAL NOT NULL);
CREATE INDEX users_first_name ON users (first_name COLLATE NOCASE);
CREATE TABLE groups (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE user_groups (
    user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    group_id INTEGER NOT NULL REFERENCES groups (id) ON DELETE CASCADE,
    PRIMARY KEY (user_id, group_id)) WITHOUT ROWID;
CREATE TABLE sessions (id TEXT PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX sessions_user ON sessions (user_id, created_at);
INSERT INTO users VALUES (1, 'Greg', 'Greg', 'h', 0);
INSERT INTO groups VALUES (1, 'boys');
INSERT INTO user_groups VALUES (1, 1);
INSERT INTO sessions VALUES ('s1', 1, 1e12);
"""


async def execute(database: Path | str, statement: str) -> None:
    """Run one statement on the database directly, as another tool would."""
    if isinstance(database, Path):
        with contextlib.closing(sqlite3.connect(database)) as db:
            db.executescript(statement)
        return
    connection = await asyncpg.connect(database)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


async def test_a_new_database_gets_the_current_version(database: Path | str) -> None:
    """The first open creates the schema at this code's version; the next changes nothing."""
    store = await Store.open(database)
    try:
        assert await store.version() == VERSION
        await store.add_group("boys")
    finally:
        await store.close()
    again = await Store.open(database)
    try:
        assert await again.version() == VERSION
        assert await again.list_groups() == [("boys", 0)]
    finally:
        await again.close()


async def test_a_database_from_before_versions_is_upgraded(tmp_path: Path) -> None:
    """A SQLite file written before schema versions is taken as version 1 and upgraded in
    place: its users, groups and sessions are all still there, and the new tables work."""
    path = tmp_path / "old.sqlite3"
    await execute(path, UNVERSIONED)
    store = await Store.open(path)
    try:
        assert await store.version() == VERSION
        user = await store.user_by_name("greg")
        assert user is not None and user.username == "Greg"
        assert await store.groups_of(user.id) == ["boys"]
        assert await store.session_user("s1") == user.id
        assert await store.resolve_user("GREG") == "Greg"
        assert await DatabaseCounts(store).count_failure({"k": 1}, 60, 100.0, "a") == 0
    finally:
        await store.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT version FROM wsfanout_schema").fetchall() == [(VERSION,)]


async def test_a_newer_database_is_refused(database: Path | str) -> None:
    """A database whose schema is newer than the code stops the open with one clear
    message, and is left as it was."""
    store = await Store.open(database)
    await store.close()
    await execute(database, "UPDATE wsfanout_schema SET version = version + 1")
    with pytest.raises(StoreError, match=f"schema version {VERSION + 1}, newer than"):
        await Store.open(database)
    look = await Store.open(database, migrate=False)
    try:
        assert await look.version() == VERSION + 1
    finally:
        await look.close()


@pytest.mark.parametrize("table", ["users", "sessions", "groups"])
async def test_someone_elses_tables_are_refused(pg_url: str, table: str) -> None:
    """A PostgreSQL schema that already has a table of ours, made by another application,
    is not taken over (nor half migrated), and the message names it."""
    await execute(pg_url, f"CREATE TABLE {table} (id int, email text)")
    with pytest.raises(StoreError, match=f"holds tables that are not wsfanout's \\({table}\\)"):
        await Store.open(pg_url)


async def test_a_search_path_naming_no_schema_says_so(pg_url: str) -> None:
    """A URL whose search_path names a schema that does not exist is one clear error."""
    url = pg_url.rpartition("?")[0] + "?search_path=nosuchschema"
    with pytest.raises(StoreError, match=r"no schema of the search_path \(nosuchschema\)"):
        await Store.open(url)


async def test_nodes_starting_together_upgrade_once(pg_url: str) -> None:
    """Several nodes opening a new PostgreSQL database at once: one creates the schema,
    the others wait for it and find it done."""
    stores = await asyncio.gather(*(Store.open(pg_url) for _ in range(4)))
    try:
        assert [await store.version() for store in stores] == [VERSION] * 4
    finally:
        for store in stores:
            await store.close()


async def test_an_unreachable_server_is_one_clear_error() -> None:
    """Nothing listening: the open fails at once, naming the server, without the password."""
    url = "postgresql://postgres:secret@127.0.0.1:9/nowhere"
    with pytest.raises(StoreError, match="PostgreSQL postgresql://postgres:\\*\\*\\*@") as caught:
        await asyncio.wait_for(Store.open(url), 10)
    assert "secret" not in str(caught.value)


async def test_while_unreachable_every_call_says_why() -> None:
    """Opened with ``keep_trying`` while the server cannot be reached, the store opens, and
    every call, read or write, raises why (its recovery: test_many_machines.py)."""
    store = await Store.open("postgresql://postgres@127.0.0.1:9/wsfanout", keep_trying=True)
    assert not store.ready
    try:
        for call in (store.ping(), store.user_by_name("greg"), store.add_group("chess")):
            with pytest.raises(DatabaseError, match=r"127\.0\.0\.1:9"):
                await call
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT 1", "SELECT 1"),
        ("a = ? AND b IN (?,?)", "a = $1 AND b IN ($2,$3)"),
    ],
)
def test_placeholders_are_numbered(sql: str, expected: str) -> None:
    """PostgreSQL gets $1, $2… where the store writes ?."""
    assert numbered(sql) == expected
