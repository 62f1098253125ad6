"""Session rows: a login creates one and its id goes into the cookie; it is valid while the
row is there. Revoking deletes rows. Lookups are cached for a few seconds; a revocation made
through this store forgets its cached answers at once, and one made by another node is
forgotten when its word arrives (``forget_sessions``)."""

from __future__ import annotations

import secrets
import time
from typing import Final

from ..database import Database
from .cache import Cache
from .rows import UnknownUserError

SESSIONS_PER_USER: Final = 1000  # live sessions kept per user; the oldest go first
NO_SESSION: Final = 0  # a cached "no such session" (user ids start at 1)


class SessionRows:
    """The ``Store``'s session methods (a part of it: ``Store`` inherits them)."""

    _db: Database
    _sessions: Cache[str, int]  # session id -> user id, or NO_SESSION

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

    def forget_sessions(self, session_id: str | None = None) -> None:
        """Forget cached session answers: one session's, or (None) all of them."""
        if session_id is None:
            self._sessions.clear()
        else:
            self._sessions.drop(session_id)
