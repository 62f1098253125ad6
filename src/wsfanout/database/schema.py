"""The schema: each version's DDL, for SQLite and for PostgreSQL (``Database.migrate`` runs
the steps past a database's version)."""

from __future__ import annotations

from typing import Final

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
