"""The two databases the store runs on, behind one small interface, with their schemas.

Theory of operation. The store (``store/sql.py``) writes each statement once, with ``?``
placeholders, in the SQL that SQLite and PostgreSQL both speak (``lower()`` for
case-insensitive names, ``ON CONFLICT DO NOTHING``, ``RETURNING``); PostgreSQL gets the
placeholders numbered (``$1``, ``$2``…) and keeps each statement prepared on each pooled
connection. What they do not share is apart: how to connect and how a write transaction is
made safe (``sqlite.py``, ``postgres.py``), and the DDL (``schema.py``). ``base.py`` holds the
interface both answer and the schema upgrade they share.

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

from pathlib import Path

from .base import (
    RETRY_MAX,
    RETRY_MIN,
    Database,
    DatabaseError,
    Executor,
    Row,
    SchemaError,
    Unready,
    is_postgres_url,
)
from .postgres import PostgresDatabase, numbered
from .schema import MIGRATIONS, OUR_TABLES, SCHEMA_TABLE, VERSION
from .sqlite import SQLiteDatabase

__all__ = [
    "MIGRATIONS",
    "OUR_TABLES",
    "RETRY_MAX",
    "RETRY_MIN",
    "SCHEMA_TABLE",
    "VERSION",
    "Database",
    "DatabaseError",
    "Executor",
    "PostgresDatabase",
    "Row",
    "SQLiteDatabase",
    "SchemaError",
    "Unready",
    "is_postgres_url",
    "numbered",
    "open_database",
]


async def open_database(where: Path | str, pool_size: int = 10) -> Database:
    """A SQLite file (a path), or PostgreSQL (a ``postgresql://`` URL).

    Raises:
        DatabaseError
    """
    if is_postgres_url(where):
        return await PostgresDatabase.open(str(where), pool_size)
    return await SQLiteDatabase.open(Path(where))
