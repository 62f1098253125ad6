"""Users, groups, memberships and sessions, in SQLite or PostgreSQL.

The SQL is written once for both (``sql.py``; the ``database`` package holds what differs:
connecting, transactions, the schema and its versions). Names are matched
case-insensitively through ``lower()``, so both backends answer alike. The login
throttle's counts (table ``login_failures``) are ``throttle.py``'s, through ``throttling()``.

A session is a row: a login creates one and its id goes into the cookie; it is valid while
the row is there. Revoking deletes rows (one at logout; all of a user's on a password change,
an operator's disconnect, or with the user). Lookups are cached for a few seconds; a
revocation made through this store forgets its cached answers at once, and one made by
another node is forgotten when its word arrives (``forget_sessions``). The session methods
are in ``sessions.py``, the caches in ``cache.py``, what the store answers and refuses in
``rows.py``.

Every failure of the database itself is a ``DatabaseError`` (the caller answers 503); a
change the store refuses is a ``StoreError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from ..database import (
    RETRY_MAX,
    RETRY_MIN,
    Database,
    Executor,
    SchemaError,
    Unready,
    open_database,
)
from ..database import DatabaseError as DatabaseError  # what callers catch, from here
from ..protocol import GROUP_RE, MAX_FIRST_NAME, USERNAME_RE
from .cache import CACHE_SECONDS, Cache
from .rows import (
    DuplicateError,
    InvalidNameError,
    StoreError,
    UnknownGroupError,
    UnknownUserError,
    User,
)
from .sessions import NO_SESSION, SESSIONS_PER_USER, SessionRows
from .sql import (
    GROUP_SIZES,
    IDENTITY,
    MEMBERS_OF,
    USER_BY_ID,
    USER_BY_NAME,
    USERS_LIKE,
    fold,
    like_prefix,
    marks,
)

__all__ = [
    "CACHE_SECONDS",
    "NO_SESSION",
    "SESSIONS_PER_USER",
    "DatabaseError",
    "DuplicateError",
    "InvalidNameError",
    "Store",
    "StoreError",
    "UnknownGroupError",
    "UnknownUserError",
    "User",
]

log = logging.getLogger(__name__)


class Store(SessionRows):
    """Users, groups, memberships and sessions, in SQLite or PostgreSQL
    (the ``database`` package), with short caches in front of the hot reads."""

    def __init__(self, db: Database, pool_size: int = 10) -> None:
        self._database = db
        self._db = db  # or, while it cannot be used yet, an ``Unready`` saying why
        self.kind = db.kind
        self.where = db.where
        self._identities: Cache[int, tuple[User, list[str]]] = Cache()
        self._groups: Cache[str, bool] = Cache()
        self._names: Cache[str, str] = Cache()
        self._sizes: Cache[str, int] = Cache()
        self._sessions: Cache[str, int] = Cache()  # session id -> user id, or NO_SESSION
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
        return await self._one_user(USER_BY_NAME, fold(username), self._db)

    async def user_by_id(self, user_id: int) -> User | None:
        return await self._one_user(USER_BY_ID, user_id, self._db)

    async def _one_user(self, sql: str, value: object, on: Executor) -> User | None:
        row = await on.fetchone(sql, value)
        return User(*row) if row else None

    async def identity(self, user_id: int) -> tuple[User, list[str]] | None:
        """A user and their groups, cached for a few seconds (for handshakes)."""
        cached = self._identities.get(user_id)
        if cached is not None:
            return cached
        since = self._identities.generation
        rows = await self._db.fetch(IDENTITY, user_id)  # one round trip for both
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
            sql = GROUP_SIZES.format(where=f" WHERE g.name IN ({marks(missing)})")
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
        key = fold(name)
        cached = self._names.get(key)
        if cached is not None:
            return cached
        since = self._names.generation
        user = await self.user_by_name(name)
        if user is not None:
            return self._names.put(key, user.username, since)
        rows = await self._db.fetch(
            "SELECT username FROM users WHERE lower(first_name) = ? LIMIT 2", fold(name)
        )
        if len(rows) != 1:
            raise UnknownUserError(name, len(rows))
        return self._names.put(key, str(rows[0][0]), since)

    async def directory(self, prefix: str, limit: int) -> tuple[list[str], list[tuple[str, str]]]:
        """Group names and (username, first name) pairs starting with ``prefix``
        (case-insensitively)."""
        pattern = like_prefix(prefix)
        rows = await self._db.fetch(
            "SELECT name FROM groups WHERE lower(name) LIKE ? ESCAPE '\\' ORDER BY name LIMIT ?",
            pattern,
            limit,
        )
        users = await self._db.fetch(USERS_LIKE.format(among=""), pattern, pattern, limit)
        return [row[0] for row in rows], [(row[0], row[1]) for row in users]

    async def list_users(self, prefix: str, limit: int) -> list[tuple[str, str]]:
        """(username, first name) of the users whose username starts with ``prefix``."""
        rows = await self._db.fetch(
            "SELECT username, first_name FROM users WHERE lower(username) LIKE ? "
            "ESCAPE '\\' ORDER BY lower(username) LIMIT ?",
            like_prefix(prefix),
            limit,
        )
        return [(row[0], row[1]) for row in rows]

    async def list_groups(self) -> list[tuple[str, int]]:
        """Every group's name and member count, by name."""
        rows = await self._db.fetch(GROUP_SIZES.format(where=""))
        return [(row[0], int(row[1])) for row in rows]

    async def users_sharing_groups(
        self, groups: list[str], prefix: str, limit: int
    ) -> list[tuple[str, str]]:
        """(username, first name) of the members of any of these groups, by username."""
        if not groups:
            return []
        among = MEMBERS_OF.format(marks=marks(groups))  # only placeholders are formatted in
        sql = USERS_LIKE.format(among=among)
        pattern = like_prefix(prefix)
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

    async def has_users(self) -> bool:
        """Whether any user exists (cheaper than counting them)."""
        return await self._db.fetchone("SELECT 1 FROM users LIMIT 1") is not None

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
        user = await self._one_user(USER_BY_NAME, fold(username), on)
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
