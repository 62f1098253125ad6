"""PostgreSQL: an asyncpg pool that connects lazily, statements prepared per connection."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, Final

from ..config import redact
from .base import Database, DatabaseError, Executor, Row, SchemaError

CONNECT_TIMEOUT: Final = 5.0  # seconds to connect (a server that is down answers at once)
COMMAND_TIMEOUT: Final = 10.0  # seconds for one statement
ACQUIRE_TIMEOUT: Final = 10.0  # seconds to wait for a free pooled connection
IDLE_LIFETIME: Final = 300.0  # seconds a pooled connection may idle before it is closed
_MIGRATION_LOCK: Final = 0x77736661  # pg_advisory_xact_lock key ("wsfa")


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
