"""Users, groups, memberships, sessions and login failures, in SQLite or PostgreSQL.

The SQL is written once for both (``database.py`` holds what differs: connecting,
transactions, the schema and its versions). Names are matched case-insensitively through
``lower()``, so both backends answer alike.

A session is a row: a login creates one and its id goes into the cookie; it is valid while
the row is there. Revoking deletes rows (one at logout; all of a user's on a password change,
an operator's disconnect, or with the user). Lookups are cached for a few seconds; a
revocation made through this store forgets its cached answers at once, and one made by
another node is forgotten when its word arrives (``forget_sessions``).

Every failure of the database itself is a ``DatabaseError`` (the caller answers 503); a
change the store refuses is a ``StoreError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import string
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Generic, TypeVar

from .database import (
    RETRY_MAX,
    RETRY_MIN,
    Database,
    Executor,
    SchemaError,
    Unready,
    open_database,
)
from .database import DatabaseError as DatabaseError  # what callers catch, from here

log = logging.getLogger(__name__)

K = TypeVar("K")
V = TypeVar("V")

_USER_COLUMNS: Final = "SELECT id, username, first_name, password_hash FROM users"
_USER_BY_NAME: Final = _USER_COLUMNS + " WHERE lower(username) = ?"  # ? folded: _fold
_USER_BY_ID: Final = _USER_COLUMNS + " WHERE id = ?"
_IDENTITY: Final = (  # a user's row once per group (once with NULL when in none), by group
    "SELECT u.id, u.username, u.first_name, u.password_hash, g.name FROM users u "
    "LEFT JOIN user_groups ug ON ug.user_id = u.id LEFT JOIN groups g ON g.id = ug.group_id "
    "WHERE u.id = ? ORDER BY g.name"
)

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


# Groups with their member counts; ``where`` narrows them (placeholders only).
_GROUP_SIZES: Final = (
    "SELECT g.name, count(ug.user_id) FROM groups g "
    "LEFT JOIN user_groups ug ON ug.group_id = g.id{where} GROUP BY g.id, g.name ORDER BY g.name"
)
# Users whose username or first name starts with a prefix (LIKE patterns: ``_like_prefix``);
# ``among`` narrows them to the members of some groups (placeholders only).
_USERS_LIKE: Final = (
    "SELECT username, first_name FROM users u WHERE {among}(lower(username) LIKE ? ESCAPE '\\' "
    "OR lower(first_name) LIKE ? ESCAPE '\\') ORDER BY lower(username) LIMIT ?"
)
_MEMBERS_OF: Final = (
    "EXISTS (SELECT 1 FROM user_groups ug JOIN groups g ON g.id = ug.group_id "
    "WHERE ug.user_id = u.id AND g.name IN ({marks})) AND "
)
# Names compare case-insensitively in ASCII only, as SQLite's lower() does, so that both
# backends answer alike: lower(column) = ? with the value folded here.
_ASCII_LOWER: Final = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
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
    """Users, groups, memberships, sessions and login failures, in SQLite or PostgreSQL
    (``database.py``), with short caches in front of the hot reads."""

    def __init__(self, db: Database, pool_size: int = 10) -> None:
        self._database = db
        self._db = db  # or, while it cannot be used yet, an ``Unready`` saying why
        self.kind = db.kind
        self.where = db.where
        self._identities: _Cache[int, tuple[User, list[str]]] = _Cache()
        self._groups: _Cache[str, bool] = _Cache()
        self._names: _Cache[str, str] = _Cache()
        self._sizes: _Cache[str, int] = _Cache()
        self._sessions: _Cache[str, int] = _Cache()  # session id -> user id, or NO_SESSION
        self._throttling = asyncio.Semaphore(max(1, pool_size // 2))  # ``throttling``
        self._preparing: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        where: Path | str,
        *,
        pool_size: int = 10,
        keep_trying: bool = False,
        migrate: bool = True,
    ) -> Store:
        """Open a SQLite file (a path) or PostgreSQL (a ``postgresql://`` URL), and bring
        its schema up to date (``database.migrate``; not without ``migrate``, for a look).

        With ``keep_trying``, a database that cannot be reached is tried again in the
        background, with backoff, until it answers; meanwhile every call raises
        DatabaseError (and ``ping`` says why).

        Raises:
            StoreError: the database cannot be reached (without ``keep_trying``), or its
            schema is newer than this code, or not wsfanout's.
        """
        try:
            db = await open_database(where, pool_size)
        except DatabaseError as exc:
            raise StoreError(str(exc)) from None
        store = cls(db, pool_size)
        try:
            await (db.migrate() if migrate else db.ping())
        except SchemaError as exc:
            await db.close()
            raise StoreError(str(exc)) from None
        except DatabaseError as exc:
            if not keep_trying:
                await db.close()
                raise StoreError(str(exc)) from None
            log.error("%s; trying again in the background", exc)
            store._db = Unready(db, str(exc))
            store._preparing = asyncio.get_running_loop().create_task(store._keep_trying())
        return store

    async def _keep_trying(self) -> None:
        delay = RETRY_MIN
        while True:
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)
            try:
                await self._database.migrate()
            except DatabaseError as exc:
                # Logged again only when the reason changes (a wrong password, then down).
                changed = not isinstance(self._db, Unready) or self._db.reason != str(exc)
                self._db = Unready(self._database, str(exc))
                log.log(logging.WARNING if changed else logging.DEBUG, "still: %s", exc)
                continue
            except SchemaError as exc:  # nothing to wait for: every call (and /healthz) says so
                self._db = Unready(self._database, str(exc))
                log.critical("%s", exc)
                return
            self._db = self._database
            log.info("%s %s reached: serving from it", self.kind, self.where)
            return

    async def close(self) -> None:
        if self._preparing is not None:
            self._preparing.cancel()
            await asyncio.gather(self._preparing, return_exceptions=True)
        await self._database.close()

    async def version(self) -> int:
        """The schema version the database holds (it may be older or newer than this
        code's ``database.VERSION``).

        Raises:
            DatabaseError, SchemaError
        """
        return await self._database.version()

    @property
    def ready(self) -> bool:
        """Whether the database has been reached (``open`` with ``keep_trying``)."""
        return not isinstance(self._db, Unready)

    async def ping(self) -> None:
        """Raises DatabaseError unless the database answers (and is ready to use)."""
        await self._db.ping()

    # Reads

    async def user_by_name(self, username: str) -> User | None:
        """The user with this username, whatever its case."""
        return await self._one_user(_USER_BY_NAME, _fold(username), self._db)

    async def user_by_id(self, user_id: int) -> User | None:
        return await self._one_user(_USER_BY_ID, user_id, self._db)

    async def _one_user(self, sql: str, value: object, on: Executor) -> User | None:
        row = await on.fetchone(sql, value)
        return User(*row) if row else None

    async def identity(self, user_id: int) -> tuple[User, list[str]] | None:
        """A user and their groups, cached for a few seconds (for handshakes)."""
        cached = self._identities.get(user_id)
        if cached is not None:
            return cached
        since = self._identities.generation
        rows = await self._db.fetch(_IDENTITY, user_id)  # one round trip for both
        if not rows:
            return None
        user = User(*rows[0][:4])
        groups = [row[4] for row in rows if row[4] is not None]
        return self._identities.put(user_id, (user, groups), since)

    async def groups_of(self, user_id: int) -> list[str]:
        rows = await self._db.fetch(
            "SELECT g.name FROM groups g JOIN user_groups ug ON ug.group_id = g.id "
            "WHERE ug.user_id = ? ORDER BY g.name",
            user_id,
        )
        return [row[0] for row in rows]

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
            sql = _GROUP_SIZES.format(where=f" WHERE g.name IN ({_marks(missing)})")
            for name, count in await self._db.fetch(sql, *missing):
                sizes[name] = self._sizes.put(name, int(count), since)
        return sizes

    async def group_exists(self, name: str) -> bool:
        """Whether a group exists; a yes is cached for a few seconds."""
        if self._groups.get(name):
            return True
        since = self._groups.generation
        found = await self._db.fetchone("SELECT 1 FROM groups WHERE name = ?", name) is not None
        return self._groups.put(name, True, since) if found else False

    async def resolve_user(self, name: str) -> str:
        """The username meant by ``name``: an exact username, else the one user with
        that first name; both case-insensitive, never a prefix or substring.

        Raises:
            UnknownUserError: nobody, or several users, go by that name.
        """
        key = _fold(name)
        cached = self._names.get(key)
        if cached is not None:
            return cached
        since = self._names.generation
        user = await self.user_by_name(name)
        if user is not None:
            return self._names.put(key, user.username, since)
        rows = await self._db.fetch(
            "SELECT username FROM users WHERE lower(first_name) = ? LIMIT 2", _fold(name)
        )
        if len(rows) != 1:
            raise UnknownUserError(name, len(rows))
        return self._names.put(key, str(rows[0][0]), since)

    async def directory(self, prefix: str, limit: int) -> tuple[list[str], list[tuple[str, str]]]:
        """Group names and (username, first name) pairs starting with ``prefix``
        (case-insensitively)."""
        pattern = _like_prefix(prefix)
        rows = await self._db.fetch(
            "SELECT name FROM groups WHERE lower(name) LIKE ? ESCAPE '\\' ORDER BY name LIMIT ?",
            pattern,
            limit,
        )
        users = await self._db.fetch(_USERS_LIKE.format(among=""), pattern, pattern, limit)
        return [row[0] for row in rows], [(row[0], row[1]) for row in users]

    async def session_user(self, session_id: str) -> int | None:
        """The user id of a live session, or None (revoked, expired and pruned, unknown).

        Both answers are cached for a few seconds; a revocation made through this store
        (or told with ``forget_sessions``) is seen at once.
        """
        cached = self._sessions.get(session_id)
        if cached is not None:
            return cached or None
        since = self._sessions.generation
        row = await self._db.fetchone("SELECT user_id FROM sessions WHERE id = ?", session_id)
        found = int(row[0]) if row else NO_SESSION
        return self._sessions.put(session_id, found, since) or None

    async def list_users(self, prefix: str, limit: int) -> list[tuple[str, str]]:
        """(username, first name) of the users whose username starts with ``prefix``."""
        rows = await self._db.fetch(
            "SELECT username, first_name FROM users WHERE lower(username) LIKE ? "
            "ESCAPE '\\' ORDER BY lower(username) LIMIT ?",
            _like_prefix(prefix),
            limit,
        )
        return [(row[0], row[1]) for row in rows]

    async def list_groups(self) -> list[tuple[str, int]]:
        """Every group's name and member count, by name."""
        rows = await self._db.fetch(_GROUP_SIZES.format(where=""))
        return [(row[0], int(row[1])) for row in rows]

    async def users_sharing_groups(
        self, groups: list[str], prefix: str, limit: int
    ) -> list[tuple[str, str]]:
        """(username, first name) of the members of any of these groups, by username."""
        if not groups:
            return []
        among = _MEMBERS_OF.format(marks=_marks(groups))  # only placeholders are formatted in
        sql = _USERS_LIKE.format(among=among)
        pattern = _like_prefix(prefix)
        rows = await self._db.fetch(sql, *groups, pattern, pattern, limit)
        return [(row[0], row[1]) for row in rows]

    async def counts(self) -> dict[str, int]:
        """How many users, groups and live sessions the database holds."""
        row = await self._db.fetchone(
            "SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM groups), "
            "(SELECT count(*) FROM sessions)"
        )
        assert row is not None
        return {"users": int(row[0]), "groups": int(row[1]), "sessions": int(row[2])}

    # Writes: each in one transaction of its own; the caches are forgotten afterwards.

    async def add_group(self, name: str, *, exist_ok: bool = False) -> None:
        """Raises: InvalidNameError, DuplicateError (unless ``exist_ok``)."""
        if not GROUP_RE.fullmatch(name):
            raise InvalidNameError("group name", name, "letters, digits, '_', '.', '-'; 1-64")
        async with self._db.transaction() as tx:
            added = await tx.execute(
                "INSERT INTO groups (name) VALUES (?) ON CONFLICT DO NOTHING", name
            )
        if not added and not exist_ok:
            raise DuplicateError("group", name)
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
        async with self._db.transaction() as tx:
            group_ids = [await self._group_id(name, tx) for name in groups]
            row = await tx.fetchone(
                "INSERT INTO users (username, first_name, password_hash, created_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING id",
                username,
                first_name,
                password_hash,
                time.time(),
            )
            if row is None:
                raise DuplicateError("user", username)
            user_id = int(row[0])
            await tx.executemany(
                "INSERT INTO user_groups (user_id, group_id) VALUES (?, ?) ON CONFLICT DO NOTHING",
                [(user_id, gid) for gid in dict.fromkeys(group_ids)],
            )
        self.forget()
        return user_id

    async def _group_id(self, name: str, on: Executor) -> int:
        row = await on.fetchone("SELECT id FROM groups WHERE name = ?", name)
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
        async with self._db.transaction() as tx:
            await tx.execute(
                "DELETE FROM sessions WHERE user_id = ? AND created_at < ?", user_id, now - max_age
            )
            added = await tx.execute(
                "INSERT INTO sessions (id, user_id, created_at) "
                "SELECT ?, id, ? FROM users WHERE id = ?",
                session_id,
                now,
                user_id,
            )
        if not added:
            raise UnknownUserError(f"#{user_id}")
        return session_id

    async def trim_sessions(self, user_id: int) -> list[str]:
        """Drop this user's sessions but the newest SESSIONS_PER_USER; the ids dropped
        (their open connections are the caller's to close)."""
        async with self._db.transaction() as tx:
            rows = await tx.fetch(
                "DELETE FROM sessions WHERE user_id = ? AND id NOT IN "
                "(SELECT id FROM sessions WHERE user_id = ? ORDER BY created_at DESC LIMIT ?) "
                "RETURNING id",
                user_id,
                user_id,
                SESSIONS_PER_USER,
            )
        dropped = [str(row[0]) for row in rows]
        for session_id in dropped:
            self.forget_sessions(session_id)
        return dropped

    async def prune(self, session_max_age: float, failure_window: float) -> int:
        """Drop every session older than ``session_max_age`` seconds, and the login
        failures older than ``failure_window``; how many sessions went."""
        now = time.time()
        async with self._db.transaction() as tx:
            await tx.execute("DELETE FROM login_failures WHERE at <= ?", now - failure_window)
            return await tx.execute(
                "DELETE FROM sessions WHERE created_at < ?", now - session_max_age
            )

    async def revoke_session(self, session_id: str) -> None:
        """End one session (a logout)."""
        async with self._db.transaction() as tx:
            await tx.execute("DELETE FROM sessions WHERE id = ?", session_id)
        self.forget_sessions(session_id)

    async def revoke_user_sessions(self, username: str) -> User:
        """End every session of a user.

        Raises:
            UnknownUserError
        """
        async with self._db.transaction() as tx:
            user = await self._user(username, tx)
            await tx.execute("DELETE FROM sessions WHERE user_id = ?", user.id)
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
        async with self._db.transaction() as tx:
            user = await self._user(username, tx)
            await tx.execute(
                "UPDATE users SET password_hash = ? WHERE id = ?", password_hash, user.id
            )
            await tx.execute("DELETE FROM sessions WHERE user_id = ?", user.id)
        self.forget_sessions()
        return user

    async def delete_user(self, username: str) -> User:
        """Delete a user with their memberships and sessions.

        Raises:
            UnknownUserError
        """
        async with self._db.transaction() as tx:
            user = await self._user(username, tx)
            await tx.execute("DELETE FROM users WHERE id = ?", user.id)
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
            "INSERT INTO user_groups (user_id, group_id) VALUES (?, ?) ON CONFLICT DO NOTHING"
            if member
            else "DELETE FROM user_groups WHERE user_id = ? AND group_id = ?"
        )
        async with self._db.transaction() as tx:
            user = await self._user(username, tx)
            changed = await tx.execute(sql, user.id, await self._group_id(group, tx))
        self.forget()
        return user, changed > 0

    async def delete_group(self, name: str) -> list[str]:
        """Delete a group (its memberships with it).

        Returns:
            The usernames of its members.

        Raises:
            UnknownGroupError
        """
        async with self._db.transaction() as tx:
            group_id = await self._group_id(name, tx)
            rows = await tx.fetch(
                "SELECT u.username FROM users u JOIN user_groups ug ON ug.user_id = u.id "
                "WHERE ug.group_id = ? ORDER BY lower(u.username)",
                group_id,
            )
            await tx.execute("DELETE FROM groups WHERE id = ?", group_id)
        self.forget()
        return [row[0] for row in rows]

    async def _user(self, username: str, on: Executor) -> User:
        user = await self._one_user(_USER_BY_NAME, _fold(username), on)
        if user is None:
            raise UnknownUserError(username)
        return user

    # Login failures: counted by the throttle (``throttle.py``) when there is no Redis

    @contextlib.asynccontextmanager
    async def throttling(self) -> AsyncIterator[Executor]:
        """A write transaction for the login throttle's counts (table ``login_failures``).
        Logins hold a pooled connection while they wait for each other: at most half the
        pool at a time, so that a burst of them never keeps handshakes from the database.

        Raises:
            DatabaseError: the database failed.
        """
        async with self._throttling, self._db.transaction() as tx:
            yield tx


def _marks(values: list[str]) -> str:
    """As many ``?`` placeholders, comma-separated, as there are values."""
    return ",".join("?" * len(values))


def _fold(name: str) -> str:
    """``name`` as ``lower()`` makes a stored name on both backends (ASCII letters only)."""
    return name.translate(_ASCII_LOWER)


def _like_prefix(prefix: str) -> str:
    """A LIKE pattern (ESCAPE '\\') for folded names starting with ``prefix``."""
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return _fold(escaped) + "%"
