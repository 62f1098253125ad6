"""SQLite: one aiosqlite connection (its own thread) in WAL mode; one writer at a time."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from .base import Database, DatabaseError, Executor, Row


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
        # One trip to aiosqlite's thread (a cursor's execute, fetchall and close were three,
        # each a wake-up of that thread and of the event loop: a tenth of a handshake's CPU)
        with self._failing():
            return [tuple(row) for row in await self._db.execute_fetchall(sql, args)]

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
