"""The two databases the store runs on, behind one small interface, with their schemas.

Theory of operation. ``store.py`` writes each statement once, with ``?`` placeholders, in
the SQL that SQLite and PostgreSQL both speak (``lower()`` for case-insensitive names,
``ON CONFLICT DO NOTHING``, ``RETURNING``); PostgreSQL gets the placeholders numbered
(``$1``, ``$2``…) and keeps each statement prepared on each pooled connection. What they
do not share is here: how to connect, how a write transaction is made safe, the DDL.

- **SQLite** (the default): one aiosqlite connection (its own thread, never the event
  loop's) in WAL mode. Writes take an ``asyncio.Lock`` and ``BEGIN IMMEDIATE``.
- **PostgreSQL** (``postgresql://…``): an asyncpg pool. A transaction holds one pooled
  connection. The pool connects lazily, so a server that is down at start, or restarts
  while serving, costs the requests of that moment a ``DatabaseError`` (503) and nothing
  else: the next request gets a fresh connection.

Schema versions. ``wsfanout_schema`` holds the version. On start, in one transaction (which
PostgreSQL also guards with an advisory lock, for nodes starting together), the steps of
``MIGRATIONS`` past the database's version run; a database newer than this code is refused
(``SchemaError``). SQLite files made before versions existed hold version 1's tables with no
version: they are taken as version 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any, Final

import aiosqlite

from .config import redact

log = logging.getLogger(__name__)

Row = tuple[Any, ...]

# Each version's steps: (SQLite statements, PostgreSQL statements).
MIGRATIONS: Final[tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]] = (
    (  # 1: users, groups, memberships, sessions
        (
            "CREATE TABLE users (id INTEGER PRIMARY KEY,"
            " username TEXT NOT NULL UNIQUE COLLATE NOCASE,"
            " first_name TEXT NOT NULL DEFAULT '', password_hash TEXT NOT NULL,"
            " created_at REAL NOT NULL)",
            "CREATE INDEX users_first_name ON users (first_name COLLATE NOCASE)",
            "CREATE TABLE groups (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE)",
            "CREATE TABLE user_groups ("
            " user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,"
            " group_id INTEGER NOT NULL REFERENCES groups (id) ON DELETE CASCADE,"
            " PRIMARY KEY (user_id, group_id)) WITHOUT ROWID",
            "CREATE TABLE sessions (id TEXT PRIMARY KEY,"
            " user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,"
            " created_at REAL NOT NULL) WITHOUT ROWID",
            "CREATE INDEX sessions_user ON sessions (user_id, created_at)",
        ),
        (
            # COLLATE "C": names sort and compare by code point, as in SQLite.
            "CREATE TABLE users (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            ' username TEXT COLLATE "C" NOT NULL,'
            " first_name TEXT COLLATE \"C\" NOT NULL DEFAULT '', password_hash TEXT NOT NULL,"
            " created_at DOUBLE PRECISION NOT NULL)",
            "CREATE UNIQUE INDEX users_username ON users (lower(username))",
            "CREATE TABLE groups (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            ' name TEXT COLLATE "C" NOT NULL UNIQUE)',
            "CREATE TABLE user_groups ("
            " user_id BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,"
            " group_id BIGINT NOT NULL REFERENCES groups (id) ON DELETE CASCADE,"
            " PRIMARY KEY (user_id, group_id))",
            'CREATE TABLE sessions (id TEXT COLLATE "C" PRIMARY KEY,'
            " user_id BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,"
            " created_at DOUBLE PRECISION NOT NULL)",
            "CREATE INDEX sessions_user ON sessions (user_id, created_at)",
        ),
    ),
    (  # 2: names looked up through lower(); the login throttle's failures
        (
            "CREATE INDEX users_username_lower ON users (lower(username))",
            "DROP INDEX users_first_name",
            "CREATE INDEX users_first_name_lower ON users (lower(first_name))",
            "CREATE INDEX user_groups_group ON user_groups (group_id)",
            "CREATE TABLE login_failures (key TEXT NOT NULL, at REAL NOT NULL,"
            " attempt TEXT NOT NULL)",
            "CREATE INDEX login_failures_key ON login_failures (key, at)",
            "CREATE INDEX login_failures_at ON login_failures (at)",
        ),
        (
            "CREATE INDEX users_first_name_lower ON users (lower(first_name))",
            "CREATE INDEX user_groups_group ON user_groups (group_id)",
            'CREATE TABLE login_failures (key TEXT COLLATE "C" NOT NULL,'
            " at DOUBLE PRECISION NOT NULL, attempt TEXT NOT NULL)",
            "CREATE INDEX login_failures_key ON login_failures (key, at)",
            "CREATE INDEX login_failures_at ON login_failures (at)",
        ),
    ),
)
VERSION: Final = len(MIGRATIONS)  # the schema this code speaks
SCHEMA_TABLE: Final = "wsfanout_schema"
OUR_TABLES: Final = frozenset({"users", "groups", "user_groups", "sessions", "login_failures"})

# PostgreSQL
CONNECT_TIMEOUT: Final = 5.0  # seconds to connect (a server that is down answers at once)
COMMAND_TIMEOUT: Final = 10.0  # seconds for one statement
ACQUIRE_TIMEOUT: Final = 10.0  # seconds to wait for a free pooled connection
IDLE_LIFETIME: Final = 300.0  # seconds a pooled connection may idle before it is closed
RETRY_MIN: Final = 0.5  # seconds between attempts to reach a server that was down at start
RETRY_MAX: Final = 10.0
_MIGRATION_LOCK: Final = 0x77736661  # pg_advisory_xact_lock key ("wsfa")


class DatabaseError(Exception):
    """The database cannot answer now: unreachable, restarting, locked, full. Worth
    trying again later; the message says which database and why."""


class SchemaError(Exception):
    """This code cannot use the database's schema (newer than it, or not wsfanout's)."""


def is_postgres_url(where: str | Path) -> bool:
    return isinstance(where, str) and where.split("://", 1)[0].lower() in {
        "postgresql",
        "postgres",
    }


class Executor:
    """What a transaction and the database both answer: statements with ``?`` placeholders."""

    async def fetch(self, sql: str, *args: object) -> list[Row]:
        raise NotImplementedError

    async def fetchone(self, sql: str, *args: object) -> Row | None:
        rows = await self.fetch(sql, *args)
        return rows[0] if rows else None

    async def execute(self, sql: str, *args: object) -> int:
        """Run a statement; how many rows it changed."""
        raise NotImplementedError

    async def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        raise NotImplementedError

    async def serialize(self, names: list[str]) -> None:
        """Within a write transaction: wait for the other writers that serialize on any of
        these names, until this transaction ends (SQLite's writers are one at a time
        already)."""


class Database(Executor):
    """One database: ``kind`` ("SQLite", "PostgreSQL") and ``where`` (a path, or the URL
    without its password) name it in messages."""

    kind: str
    where: str

    def transaction(
        self, *, slow: bool = False
    ) -> contextlib.AbstractAsyncContextManager[Executor]:
        """One write transaction: committed at the end, rolled back on any exception.
        A ``slow`` one (a migration: DDL on big tables) has no statement timeout."""
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def ping(self) -> None:
        """Raises DatabaseError unless the database answers."""
        await self.fetch("SELECT 1")

    async def version(self, on: Executor | None = None) -> int:
        """The schema version the database holds (0: none yet), read ``on`` a transaction.

        Raises:
            SchemaError: the database holds tables that are not wsfanout's.
            DatabaseError
        """
        on = on or self
        tables = await self._tables(on)
        if SCHEMA_TABLE in tables:
            row = await on.fetchone("SELECT version FROM wsfanout_schema")
            return int(row[0]) if row else 0
        if "users" in tables and self.kind == "SQLite":
            return 1  # made before schema versions
        if foreign := tables & OUR_TABLES:
            raise SchemaError(
                f"{self.kind} {self.where} holds tables that are not wsfanout's "
                f"({', '.join(sorted(foreign))}): use an empty database, or a schema of its "
                "own (?search_path=…)"
            )
        return 0

    async def migrate(self) -> int:
        """Bring the schema to VERSION; the version found before.

        Raises:
            SchemaError: the database is newer than this code, or not wsfanout's.
            DatabaseError
        """
        async with self.transaction(slow=True) as tx:
            await self._lock_migrations(tx)
            found = await self.version(tx)
            if found > VERSION:
                raise SchemaError(
                    f"{self.kind} {self.where} has schema version {found}, newer than this "
                    f"wsfanout knows ({VERSION}): upgrade wsfanout, or use another database"
                )
            if found == VERSION:
                return found
            if SCHEMA_TABLE not in await self._tables(tx):  # new, or from before versions
                await tx.execute("CREATE TABLE wsfanout_schema (version INTEGER NOT NULL)")
                await tx.execute("INSERT INTO wsfanout_schema (version) VALUES (?)", found)
            column = 0 if self.kind == "SQLite" else 1
            for version in range(found + 1, VERSION + 1):
                for statement in MIGRATIONS[version - 1][column]:
                    await tx.execute(statement)
                await tx.execute("UPDATE wsfanout_schema SET version = ?", version)
        if found:
            log.info(
                "upgraded the schema of %s %s from %d to %d", self.kind, self.where, found, VERSION
            )
        return found

    async def _tables(self, on: Executor) -> set[str]:
        raise NotImplementedError

    async def _lock_migrations(self, tx: Executor) -> None:
        """Within the migration's transaction: one node migrates at a time."""


class Unready(Database):
    """Stands in for a database that cannot be used yet: every statement raises why."""

    def __init__(self, database: Database, reason: str) -> None:
        self.kind = database.kind
        self.where = database.where
        self.reason = reason

    async def fetch(self, sql: str, *args: object) -> list[Row]:
        raise DatabaseError(self.reason)

    async def execute(self, sql: str, *args: object) -> int:
        raise DatabaseError(self.reason)

    async def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        raise DatabaseError(self.reason)

    def transaction(
        self, *, slow: bool = False
    ) -> contextlib.AbstractAsyncContextManager[Executor]:
        raise DatabaseError(self.reason)

    async def close(self) -> None:
        pass


# SQLite


class SQLiteDatabase(Database):
    kind = "SQLite"

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self.path = path
        self.where = str(path)
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> SQLiteDatabase:
        """Open (creating the file and its folder if needed).

        Raises:
            DatabaseError: the folder or file cannot be created or read.
        """
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            pending = aiosqlite.connect(path, timeout=10)
            # Mounted in an app that never sends lifespan shutdown, nobody closes the
            # store; a non-daemon worker thread would then keep the process alive on
            # exit. Committed data is safe either way (SQLite is crash-safe).
            thread = getattr(pending, "_thread", None)
            if thread is not None:
                thread.daemon = True
            db = await pending
        except (OSError, sqlite3.Error) as exc:
            raise DatabaseError(f"cannot open database {str(path)!r}: {exc}") from exc
        try:
            await db.execute("PRAGMA busy_timeout = 10000")
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as exc:
            await db.close()
            raise DatabaseError(f"cannot use database {str(path)!r}: {exc}") from exc
        return cls(db, path)

    async def close(self) -> None:
        await self._db.close()

    @contextlib.contextmanager
    def _failing(self) -> Any:
        try:
            yield
        except sqlite3.Error as exc:
            raise DatabaseError(f"SQLite {self.where}: {exc}") from exc

    async def fetch(self, sql: str, *args: object) -> list[Row]:
        with self._failing():
            async with self._db.execute(sql, args) as cursor:
                return [tuple(row) for row in await cursor.fetchall()]

    async def execute(self, sql: str, *args: object) -> int:
        with self._failing():
            cursor = await self._db.execute(sql, args)
            count = cursor.rowcount
            await cursor.close()
            return count

    async def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        with self._failing():
            await self._db.executemany(sql, rows)

    @contextlib.asynccontextmanager
    async def transaction(self, *, slow: bool = False) -> AsyncIterator[Executor]:
        """One write transaction at a time on the shared connection.

        Python's sqlite3 opens transactions by itself and leaves a failed one open, and
        every request shares this connection: without the lock, one request's rollback
        undoes another's half-done change, and a transaction left open holds the
        database's write lock (every other process then fails with "database is locked")
        and pins an old snapshot. So: one writer at a time, ``BEGIN IMMEDIATE`` (waits up
        to the busy timeout for other processes' writers, rather than failing later),
        commit, or roll back whatever raised.
        """
        async with self._write_lock:
            db = self._db
            try:  # a BEGIN cancelled while it waits still runs: the rollback goes after it
                with self._failing():
                    if db.in_transaction:  # cannot happen, unless a cancelled rollback left one
                        await db.rollback()
                    await db.execute("BEGIN IMMEDIATE")
                yield self
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    await db.rollback()
                raise
            with self._failing():
                await db.commit()

    async def _tables(self, on: Executor) -> set[str]:
        rows = await on.fetch("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {str(row[0]) for row in rows}


# PostgreSQL

_PLACEHOLDER: Final = re.compile(r"\?")


def numbered(sql: str) -> str:
    """``?`` placeholders as PostgreSQL's ``$1``, ``$2``… (no statement of ours has a
    ``?`` inside a string)."""
    counter = itertools.count(1)
    return _PLACEHOLDER.sub(lambda _: f"${next(counter)}", sql)


class _PostgresConnection(Executor):
    """Statements on one pooled connection (a transaction's)."""

    def __init__(
        self, owner: PostgresDatabase, connection: Any, timeout: float | None = COMMAND_TIMEOUT
    ) -> None:
        self._owner = owner
        self._connection = connection
        self._timeout = timeout

    async def fetch(self, sql: str, *args: object) -> list[Row]:
        with self._owner.failing():
            rows = await self._connection.fetch(
                self._owner.sql(sql), *_text(args), timeout=self._timeout
            )
        return [tuple(row) for row in rows]

    async def execute(self, sql: str, *args: object) -> int:
        with self._owner.failing():
            status = await self._connection.execute(
                self._owner.sql(sql), *_text(args), timeout=self._timeout
            )
        return _count(status)

    async def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        with self._owner.failing():
            await self._connection.executemany(
                self._owner.sql(sql), [_text(row) for row in rows], timeout=self._timeout
            )

    async def serialize(self, names: list[str]) -> None:
        # In one order (the array's): no two transactions wait on each other.
        await self.execute(
            "SELECT count(pg_advisory_xact_lock(hashtext(n))) FROM unnest(?::text[]) n",
            sorted(set(names)),
        )


class PostgresDatabase(Database):
    kind = "PostgreSQL"

    def __init__(self, url: str, pool_size: int) -> None:
        self.url = url
        self.where = redact(url)
        self._pool_size = pool_size
        self._pool: Any = None
        self._sql: dict[str, str] = {}

    @classmethod
    async def open(cls, url: str, pool_size: int = 10) -> PostgresDatabase:
        """A pool that connects when first asked (so this does not fail when the server
        is down; the first statement does).

        Raises:
            DatabaseError: the URL cannot be used.
        """
        import asyncpg  # only when PostgreSQL is configured

        database = cls(url, pool_size)
        with database.failing():
            database._pool = await asyncpg.create_pool(
                url,
                min_size=0,
                max_size=pool_size,
                timeout=CONNECT_TIMEOUT,
                command_timeout=COMMAND_TIMEOUT,
                max_inactive_connection_lifetime=IDLE_LIFETIME,
                reset=_keep_session,
            )
        return database

    async def close(self) -> None:
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.close(), COMMAND_TIMEOUT)

    def sql(self, statement: str) -> str:
        found = self._sql.get(statement)
        if found is None:
            found = self._sql[statement] = numbered(statement)
        return found

    @contextlib.contextmanager
    def failing(self) -> Any:
        import asyncpg

        try:
            yield
        except (
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
            asyncpg.exceptions.InternalClientError,
            OSError,
            TimeoutError,
            ValueError,  # the URL, checked only at the first connect
        ) as exc:
            detail = str(exc) or type(exc).__name__
            raise DatabaseError(f"PostgreSQL {self.where}: {detail}") from exc

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        with self.failing():
            connection = await self._pool.acquire(timeout=ACQUIRE_TIMEOUT)
        try:
            yield connection
        finally:
            with contextlib.suppress(Exception):
                await self._pool.release(connection)

    async def fetch(self, sql: str, *args: object) -> list[Row]:
        async with self._connection() as connection:
            return await _PostgresConnection(self, connection).fetch(sql, *args)

    async def execute(self, sql: str, *args: object) -> int:
        async with self._connection() as connection:
            return await _PostgresConnection(self, connection).execute(sql, *args)

    async def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        async with self._connection() as connection:
            await _PostgresConnection(self, connection).executemany(sql, rows)

    @contextlib.asynccontextmanager
    async def transaction(self, *, slow: bool = False) -> AsyncIterator[Executor]:
        async with self._connection() as connection:
            with self.failing():
                transaction = connection.transaction()
                await transaction.start()
            try:
                yield _PostgresConnection(self, connection, None if slow else COMMAND_TIMEOUT)
            except BaseException:
                with contextlib.suppress(Exception):
                    await transaction.rollback()
                raise
            with self.failing():
                await transaction.commit()

    async def _tables(self, on: Executor) -> set[str]:
        row = await on.fetchone("SELECT current_schema()::text, current_setting('search_path')")
        if row is None or row[0] is None:
            path = row[1] if row else "?"
            raise SchemaError(
                f"{self.kind} {self.where}: no schema of the search_path ({path}) exists: "
                "create it (CREATE SCHEMA …), or fix the URL"
            )
        rows = await on.fetch(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = current_schema()"
        )
        return {str(row[0]) for row in rows}

    async def _lock_migrations(self, tx: Executor) -> None:
        await tx.execute("SELECT pg_advisory_xact_lock(?)", _MIGRATION_LOCK)


async def _keep_session(connection: Any) -> None:
    """What a connection needs before it goes back to the pool: nothing more than asyncpg
    does anyway (rolling back a transaction left open). Our statements leave no session
    state (no SET, LISTEN or session-level locks), and asyncpg's default reset query
    would cost a round trip after every statement."""


def _text(args: Sequence[object]) -> Sequence[object]:
    """The arguments, with NUL characters (which PostgreSQL's text cannot hold) as U+FFFD.
    No name the store keeps has one (they are checked on the way in), so a lookup with one
    finds nothing, as on SQLite, instead of failing."""
    cleaned = [_no_nul(arg) for arg in args]
    return args if cleaned == list(args) else cleaned


def _no_nul(arg: object) -> object:
    if isinstance(arg, str):
        return arg.replace("\x00", "\ufffd") if "\x00" in arg else arg
    if isinstance(arg, list):
        return [_no_nul(item) for item in arg]
    return arg


def _count(status: str) -> int:
    """Rows changed, from a command status such as ``DELETE 3`` or ``INSERT 0 1``."""
    last = status.rpartition(" ")[2]
    return int(last) if last.isdigit() else 0


async def open_database(where: Path | str, pool_size: int = 10) -> Database:
    """A SQLite file (a path), or PostgreSQL (a ``postgresql://`` URL).

    Raises:
        DatabaseError
    """
    if is_postgres_url(where):
        return await PostgresDatabase.open(str(where), pool_size)
    return await SQLiteDatabase.open(Path(where))
