"""Users, groups, memberships and sessions in SQLite, through aiosqlite (never on the loop
thread).

A session is a row: a login creates one and its id goes into the cookie; it is valid while
the row is there. Revoking deletes rows (one at logout; all of a user's on a password change,
an operator's disconnect, or with the user). Lookups are cached for a few seconds; a
revocation made through this store forgets its cached answers at once, and one made by
another node is forgotten when its word arrives (``forget_sessions``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Generic, TypeVar

import aiosqlite

K = TypeVar("K")
V = TypeVar("V")

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY,
    username TEXT NOT NULL UNIQUE COLLATE NOCASE,
    first_name TEXT NOT NULL DEFAULT '',
    password_hash TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS users_first_name ON users (first_name COLLATE NOCASE);
CREATE TABLE IF NOT EXISTS groups (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS user_groups (
    user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    group_id INTEGER NOT NULL REFERENCES groups (id) ON DELETE CASCADE,
    PRIMARY KEY (user_id, group_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sessions_user ON sessions (user_id, created_at);
"""

_USER_COLUMNS: Final = "SELECT id, username, first_name, password_hash FROM users"
_USER_BY_NAME: Final = _USER_COLUMNS + " WHERE username = ?"
_USER_BY_ID: Final = _USER_COLUMNS + " WHERE id = ?"

_ADD_GROUP: Final = "INSERT INTO groups (name) VALUES (?)"
USERNAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}")
GROUP_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_FIRST_NAME: Final = 100
SESSIONS_PER_USER: Final = 1000  # live sessions kept per user; the oldest go first
NO_SESSION: Final = 0  # a cached "no such session" (user ids start at 1)


class StoreError(Exception):
    """A change the store refuses; the message is fit to show a user."""


class DuplicateError(StoreError):
    def __init__(self, what: str, name: str) -> None:
        super().__init__(f"a {what} named {name!r} already exists")


class UnknownGroupError(StoreError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no group named {name!r}")
        self.name = name


class UnknownUserError(StoreError):
    def __init__(self, name: str, matches: int = 0) -> None:
        if matches > 1:
            detail = f"{name!r} is the first name of {matches} users: use a username"
        else:
            detail = f"no user named {name!r}"
        super().__init__(detail)
        self.name = name


class InvalidNameError(StoreError):
    def __init__(self, what: str, name: str, rule: str) -> None:
        super().__init__(f"invalid {what} {name!r}: {rule}")


@dataclass(frozen=True, slots=True)
class User:
    id: int
    username: str
    first_name: str
    password_hash: str


_GROUP_SIZES: Final = (
    "SELECT g.name, count(ug.user_id) FROM groups g "
    "LEFT JOIN user_groups ug ON ug.group_id = g.id WHERE g.name IN ({marks}) GROUP BY g.name"
)
_SHARING: Final = (
    "SELECT DISTINCT u.username, u.first_name FROM users u "
    "JOIN user_groups ug ON ug.user_id = u.id JOIN groups g ON g.id = ug.group_id "
    "WHERE g.name IN ({marks}) AND (u.username LIKE ? ESCAPE '\\' "
    "OR u.first_name LIKE ? ESCAPE '\\') ORDER BY u.username LIMIT ?"
)
CACHE_SECONDS: Final = 10.0
CACHE_ENTRIES: Final = 100_000


class _Cache(Generic[K, V]):
    """Positive answers for a few seconds, so hot paths skip the database.

    Changes made elsewhere (another process's CLI) show after at most ``ttl``. An answer
    read from the database before a ``drop`` or ``clear`` (the change it may predate) is
    not kept: ``put`` takes the ``generation`` seen before the read.
    """

    def __init__(self, ttl: float = CACHE_SECONDS, max_entries: int = CACHE_ENTRIES) -> None:
        self._ttl = ttl
        self._max = max_entries
        self._data: dict[K, tuple[float, V]] = {}
        self.generation = 0  # how many drops and clears so far

    def get(self, key: K) -> V | None:
        found = self._data.get(key)
        if found is None:
            return None
        if found[0] < time.monotonic():
            del self._data[key]
            return None
        return found[1]

    def put(self, key: K, value: V, generation: int) -> V:
        """Keep an answer read since ``generation``, unless the cache was changed since."""
        if generation != self.generation:
            return value
        if len(self._data) >= self._max:
            self._data.clear()
        self._data[key] = (time.monotonic() + self._ttl, value)
        return value

    def drop(self, key: K) -> None:
        self.generation += 1
        self._data.pop(key, None)

    def clear(self) -> None:
        self.generation += 1
        self._data.clear()


class Store:
    """One aiosqlite connection to the service's database (WAL mode)."""

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self.path = path
        self._identities: _Cache[int, tuple[User, list[str]]] = _Cache()
        self._groups: _Cache[str, bool] = _Cache()
        self._names: _Cache[str, str] = _Cache()
        self._sizes: _Cache[str, int] = _Cache()
        self._sessions: _Cache[str, int] = _Cache()  # session id -> user id, or NO_SESSION
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> Store:
        """Open (creating the file, its folder and the schema if needed).

        Raises:
            StoreError: the folder or file cannot be created or read.
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
            raise StoreError(f"cannot open database {str(path)!r}: {exc}") from exc
        try:
            await db.execute("PRAGMA busy_timeout = 10000")
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA foreign_keys = ON")
            await db.executescript(SCHEMA)
            await db.commit()
        except sqlite3.Error as exc:
            await db.close()
            raise StoreError(f"cannot use database {str(path)!r}: {exc}") from exc
        return cls(db, path)

    async def close(self) -> None:
        await self._db.close()

    async def ping(self) -> None:
        """Raises sqlite3.Error if the database cannot answer."""
        async with self._db.execute("SELECT 1") as cursor:
            await cursor.fetchone()

    # Reads

    async def user_by_name(self, username: str) -> User | None:
        return await self._one_user(_USER_BY_NAME, username)

    async def user_by_id(self, user_id: int) -> User | None:
        return await self._one_user(_USER_BY_ID, user_id)

    async def _one_user(self, sql: str, value: object) -> User | None:
        async with self._db.execute(sql, (value,)) as cursor:
            row = await cursor.fetchone()
        return User(*row) if row else None

    async def identity(self, user_id: int) -> tuple[User, list[str]] | None:
        """A user and their groups, cached for a few seconds (for handshakes)."""
        cached = self._identities.get(user_id)
        if cached is not None:
            return cached
        since = self._identities.generation
        user = await self.user_by_id(user_id)
        if user is None:
            return None
        return self._identities.put(user_id, (user, await self.groups_of(user_id)), since)

    async def groups_of(self, user_id: int) -> list[str]:
        sql = (
            "SELECT g.name FROM groups g JOIN user_groups ug ON ug.group_id = g.id "
            "WHERE ug.user_id = ? ORDER BY g.name"
        )
        async with self._db.execute(sql, (user_id,)) as cursor:
            return [row[0] for row in await cursor.fetchall()]

    async def group_sizes(self, names: list[str]) -> dict[str, int]:
        """How many members each of these groups has, cached for a few seconds."""
        sizes = {}
        missing = []
        for name in names:
            cached = self._sizes.get(name)
            if cached is None:
                missing.append(name)
            else:
                sizes[name] = cached
        if missing:
            since = self._sizes.generation
            marks = ",".join("?" * len(missing))
            sql = _GROUP_SIZES.format(marks=marks)  # only placeholders are formatted in
            async with self._db.execute(sql, missing) as cursor:
                for name, count in await cursor.fetchall():
                    sizes[name] = self._sizes.put(name, int(count), since)
        return sizes

    async def group_exists(self, name: str) -> bool:
        """Whether a group exists; a yes is cached for a few seconds."""
        if self._groups.get(name):
            return True
        since = self._groups.generation
        async with self._db.execute("SELECT 1 FROM groups WHERE name = ?", (name,)) as cursor:
            found = await cursor.fetchone() is not None
        return self._groups.put(name, True, since) if found else False

    async def resolve_user(self, name: str) -> str:
        """The username meant by ``name``: an exact username, else the one user with
        that first name; both case-insensitive, never a prefix or substring.

        Raises:
            UnknownUserError: nobody, or several users, go by that name.
        """
        key = name.lower()
        cached = self._names.get(key)
        if cached is not None:
            return cached
        since = self._names.generation
        user = await self.user_by_name(name)
        if user is not None:
            return self._names.put(key, user.username, since)
        sql = "SELECT username FROM users WHERE first_name = ? COLLATE NOCASE LIMIT 2"
        async with self._db.execute(sql, (name,)) as cursor:
            rows = list(await cursor.fetchall())
        if len(rows) != 1:
            raise UnknownUserError(name, len(rows))
        return self._names.put(key, str(rows[0][0]), since)

    async def directory(self, prefix: str, limit: int) -> tuple[list[str], list[tuple[str, str]]]:
        """Group names and (username, first name) pairs starting with ``prefix``."""
        pattern = _like_prefix(prefix)
        async with self._db.execute(
            "SELECT name FROM groups WHERE name LIKE ? ESCAPE '\\' ORDER BY name LIMIT ?",
            (pattern, limit),
        ) as cursor:
            groups = [row[0] for row in await cursor.fetchall()]
        async with self._db.execute(
            "SELECT username, first_name FROM users WHERE username LIKE ? ESCAPE '\\' "
            "OR first_name LIKE ? ESCAPE '\\' ORDER BY username LIMIT ?",
            (pattern, pattern, limit),
        ) as cursor:
            users = [(row[0], row[1]) for row in await cursor.fetchall()]
        return groups, users

    async def session_user(self, session_id: str) -> int | None:
        """The user id of a live session, or None (revoked, expired and pruned, unknown).

        Both answers are cached for a few seconds; a revocation made through this store
        (or told with ``forget_sessions``) is seen at once.
        """
        cached = self._sessions.get(session_id)
        if cached is not None:
            return cached or None
        since = self._sessions.generation
        async with self._db.execute(
            "SELECT user_id FROM sessions WHERE id = ?", (session_id,)
        ) as cursor:
            row = await cursor.fetchone()
        found = int(row[0]) if row else NO_SESSION
        return self._sessions.put(session_id, found, since) or None

    async def list_users(self, prefix: str, limit: int) -> list[tuple[str, str]]:
        """(username, first name) of the users whose username starts with ``prefix``."""
        async with self._db.execute(
            "SELECT username, first_name FROM users WHERE username LIKE ? ESCAPE '\\' "
            "ORDER BY username LIMIT ?",
            (_like_prefix(prefix), limit),
        ) as cursor:
            return [(row[0], row[1]) for row in await cursor.fetchall()]

    async def list_groups(self) -> list[tuple[str, int]]:
        """Every group's name and member count, by name."""
        async with self._db.execute(
            "SELECT g.name, count(ug.user_id) FROM groups g "
            "LEFT JOIN user_groups ug ON ug.group_id = g.id GROUP BY g.id ORDER BY g.name"
        ) as cursor:
            return [(row[0], int(row[1])) for row in await cursor.fetchall()]

    async def users_sharing_groups(
        self, groups: list[str], prefix: str, limit: int
    ) -> list[tuple[str, str]]:
        """(username, first name) of the members of any of these groups, by username."""
        if not groups:
            return []
        marks = ",".join("?" * len(groups))
        sql = _SHARING.format(marks=marks)  # only placeholders are formatted in
        pattern = _like_prefix(prefix)
        async with self._db.execute(sql, (*groups, pattern, pattern, limit)) as cursor:
            return [(row[0], row[1]) for row in await cursor.fetchall()]

    # Writes: each in one transaction of its own (``_writing``)

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction at a time on the shared connection.

        Python's sqlite3 opens transactions by itself and leaves a failed one open, and
        every request shares this connection: without this, one request's rollback undoes
        another's half-done change, and a transaction left open holds the database's write
        lock (every other process then fails with "database is locked") and pins an old
        snapshot. So: one writer at a time, ``BEGIN IMMEDIATE`` (waits up to the busy
        timeout for other processes' writers, rather than failing later), commit, or roll
        back whatever raised. The caches are forgotten afterwards.
        """
        async with self._write_lock:
            db = self._db
            if db.in_transaction:  # cannot happen, unless a cancelled rollback left one
                await db.rollback()
            await db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    await db.rollback()
                raise
            await db.commit()

    async def add_group(self, name: str, *, exist_ok: bool = False) -> None:
        """Raises: InvalidNameError, DuplicateError (unless ``exist_ok``)."""
        if not GROUP_RE.fullmatch(name):
            raise InvalidNameError("group name", name, "letters, digits, '_', '.', '-'; 1-64")
        sql = "INSERT OR IGNORE INTO groups (name) VALUES (?)" if exist_ok else _ADD_GROUP
        try:
            async with self._writing() as db:
                await db.execute(sql, (name,))
        except sqlite3.IntegrityError:
            raise DuplicateError("group", name) from None
        self.forget()

    async def add_user(
        self,
        username: str,
        password_hash: str,
        *,
        first_name: str = "",
        groups: tuple[str, ...] = (),
    ) -> int:
        """Create a user in the given (existing) groups, all or nothing.

        Raises:
            InvalidNameError, DuplicateError, UnknownGroupError
        """
        if not USERNAME_RE.fullmatch(username):
            raise InvalidNameError(
                "username", username, "letters, digits, '_', '.', '@', '+', '-'; 1-64"
            )
        first_name = first_name.strip()
        if len(first_name) > MAX_FIRST_NAME or not first_name.isprintable():
            raise InvalidNameError("first name", first_name, "printable, at most 100 characters")
        try:
            async with self._writing() as db:
                group_ids = [await self._group_id(name) for name in groups]
                cursor = await db.execute(
                    "INSERT INTO users (username, first_name, password_hash, created_at) "
                    "VALUES (?, ?, ?, ?)",
                    (username, first_name, password_hash, time.time()),
                )
                user_id = cursor.lastrowid
                assert user_id is not None
                await db.executemany(
                    "INSERT OR IGNORE INTO user_groups (user_id, group_id) VALUES (?, ?)",
                    [(user_id, gid) for gid in group_ids],
                )
        except sqlite3.IntegrityError:
            raise DuplicateError("user", username) from None
        self.forget()
        return user_id

    async def _group_id(self, name: str) -> int:
        async with self._db.execute("SELECT id FROM groups WHERE name = ?", (name,)) as cursor:
            row = await cursor.fetchone()
        if row is None:
            raise UnknownGroupError(name)
        return int(row[0])

    async def create_session(self, user_id: int, max_age: float) -> str:
        """A new session of this user; their sessions older than ``max_age`` seconds are
        dropped (``trim_sessions`` drops those past SESSIONS_PER_USER).

        Returns:
            The session's id (random, for the cookie).

        Raises:
            UnknownUserError: the user was deleted meanwhile.
        """
        session_id = secrets.token_urlsafe(18)
        now = time.time()
        try:
            async with self._writing() as db:
                await db.execute(
                    "DELETE FROM sessions WHERE user_id = ? AND created_at < ?",
                    (user_id, now - max_age),
                )
                await db.execute(
                    "INSERT INTO sessions (id, user_id, created_at) VALUES (?, ?, ?)",
                    (session_id, user_id, now),
                )
        except sqlite3.IntegrityError:
            raise UnknownUserError(f"#{user_id}") from None
        return session_id

    async def trim_sessions(self, user_id: int) -> list[str]:
        """Drop this user's sessions but the newest SESSIONS_PER_USER; the ids dropped
        (their open connections are the caller's to close)."""
        async with (
            self._writing() as db,
            db.execute(
                "DELETE FROM sessions WHERE user_id = ? AND id NOT IN "
                "(SELECT id FROM sessions WHERE user_id = ? ORDER BY created_at DESC LIMIT ?) "
                "RETURNING id",
                (user_id, user_id, SESSIONS_PER_USER),
            ) as cursor,
        ):
            dropped = [str(row[0]) for row in await cursor.fetchall()]
        for session_id in dropped:
            self.forget_sessions(session_id)
        return dropped

    async def prune_sessions(self, max_age: float) -> int:
        """Drop every session older than ``max_age`` seconds; how many went."""
        async with self._writing() as db:
            cursor = await db.execute(
                "DELETE FROM sessions WHERE created_at < ?", (time.time() - max_age,)
            )
        return cursor.rowcount

    async def revoke_session(self, session_id: str) -> None:
        """End one session (a logout)."""
        async with self._writing() as db:
            await db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
        self.forget_sessions(session_id)

    async def revoke_user_sessions(self, username: str) -> User:
        """End every session of a user.

        Raises:
            UnknownUserError
        """
        async with self._writing() as db:
            user = await self._user(username)
            await db.execute("DELETE FROM sessions WHERE user_id = ?", (user.id,))
        self.forget_sessions()
        return user

    def forget_sessions(self, session_id: str | None = None) -> None:
        """Forget cached session answers: one session's, or (None) all of them."""
        if session_id is None:
            self._sessions.clear()
        else:
            self._sessions.drop(session_id)

    def forget(self) -> None:
        """Forget every cached answer about users, groups and memberships (another node
        changed them)."""
        self._identities.clear()
        self._names.clear()
        self._groups.clear()
        self._sizes.clear()

    async def set_password(self, username: str, password_hash: str) -> User:
        """Change a user's password and end every session of theirs.

        Raises:
            UnknownUserError
        """
        async with self._writing() as db:
            user = await self._user(username)
            await db.execute(
                "UPDATE users SET password_hash = ? WHERE id = ?", (password_hash, user.id)
            )
            await db.execute("DELETE FROM sessions WHERE user_id = ?", (user.id,))
        self.forget_sessions()
        return user

    async def delete_user(self, username: str) -> User:
        """Delete a user with their memberships and sessions.

        Raises:
            UnknownUserError
        """
        async with self._writing() as db:
            user = await self._user(username)
            await db.execute("DELETE FROM users WHERE id = ?", (user.id,))
        self.forget_sessions()
        self.forget()
        return user

    async def set_member(self, username: str, group: str, member: bool) -> tuple[User, bool]:
        """Make a user a member of a group (``member``), or take them out of it; True if
        that changed anything.

        Raises:
            UnknownUserError, UnknownGroupError
        """
        sql = (
            "INSERT OR IGNORE INTO user_groups (user_id, group_id) VALUES (?, ?)"
            if member
            else "DELETE FROM user_groups WHERE user_id = ? AND group_id = ?"
        )
        async with self._writing() as db:
            user = await self._user(username)
            cursor = await db.execute(sql, (user.id, await self._group_id(group)))
        self.forget()
        return user, cursor.rowcount > 0

    async def delete_group(self, name: str) -> list[str]:
        """Delete a group (its memberships with it).

        Returns:
            The usernames of its members.

        Raises:
            UnknownGroupError
        """
        async with self._writing() as db:
            group_id = await self._group_id(name)
            async with db.execute(
                "SELECT u.username FROM users u JOIN user_groups ug ON ug.user_id = u.id "
                "WHERE ug.group_id = ? ORDER BY u.username",
                (group_id,),
            ) as cursor:
                members = [row[0] for row in await cursor.fetchall()]
            await db.execute("DELETE FROM groups WHERE id = ?", (group_id,))
        self.forget()
        return members

    async def _user(self, username: str) -> User:
        user = await self.user_by_name(username)
        if user is None:
            raise UnknownUserError(username)
        return user


def _like_prefix(prefix: str) -> str:
    """A LIKE pattern (ESCAPE '\\') for names starting with ``prefix``."""
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
