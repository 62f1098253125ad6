"""The interface both databases answer (``Executor``, ``Database``), their errors, and the
schema upgrade they share (``Database.migrate``)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final

from .schema import MIGRATIONS, OUR_TABLES, SCHEMA_TABLE, VERSION

log = logging.getLogger(__name__)

Row = tuple[Any, ...]

RETRY_MIN: Final = 0.5  # seconds between attempts to reach a database that was down at start
RETRY_MAX: Final = 10.0


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
