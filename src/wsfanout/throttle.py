"""The login throttle: failed logins counted where every node sees them (DESIGN 8).

The policy is ``LoginThrottle``'s; the counting is done where ``Service.start`` says: in the
database (``DatabaseCounts``, table ``login_failures``, through the store's ``throttling``
transaction) or, with the Redis backplane, in Redis (``backplane/redis/failures.py``'s
``RedisCounts``: sorted sets through the engine's link). Both are atomic across
nodes: a count and its check are one transaction (serialized per key) or one Lua script.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

from .backplane import BackplaneUnavailableError
from .store import DatabaseError, Store
from .store.sql import marks

log = logging.getLogger(__name__)

NAME_KEY_MAX: Final = 64  # longer login names are counted under a digest
FAILURES_PRUNE_EVERY: Final = 60.0  # seconds between drops of expired login failures

_FAILURES: Final = "SELECT key, at FROM login_failures WHERE key IN ({marks}) AND at > ?"
_FORGIVE: Final = "DELETE FROM login_failures WHERE key IN ({marks}) AND attempt = ?"
_FORGIVE_ALL: Final = "DELETE FROM login_failures WHERE key IN ({marks})"


class FailureCounts(Protocol):
    """Where the throttle counts: the database or Redis."""

    async def count_failure(
        self, limits: dict[str, int], window: float, now: float, attempt: str
    ) -> float:
        """Count one login ``attempt`` (a failure until ``forgive_failure``) under each of
        these keys, unless one of them already has its limit of failures in the last
        ``window`` seconds.

        Returns:
            0 when counted; else the seconds until every key is under its limit again
            (nothing was counted).

        Raises:
            DatabaseError, BackplaneUnavailableError: the counts cannot be reached.
        """

    async def forgive_failure(self, keys: list[str], attempt: str, clear: list[str]) -> None:
        """The ``attempt`` counted under ``keys`` was right: it is no failure. Every
        failure under the keys in ``clear`` is forgiven too.

        Raises:
            DatabaseError, BackplaneUnavailableError: the counts cannot be reached.
        """


class DatabaseCounts:
    """Failures as rows of ``login_failures`` (``FailureCounts``)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._pruned = 0.0  # when old login failures were last dropped

    async def count_failure(
        self, limits: dict[str, int], window: float, now: float, attempt: str
    ) -> float:
        keys = list(limits)
        async with self._store.throttling() as tx:
            await tx.serialize(keys)  # nodes counting at once see each other's counts
            if now - self._pruned > FAILURES_PRUNE_EVERY:
                # Keys nobody tries again would otherwise keep their rows for ever.
                self._pruned = now
                await tx.execute("DELETE FROM login_failures WHERE at <= ?", now - window)
            # At most each key's limit of rows (no more are ever counted), in one round trip.
            stamps: dict[str, list[float]] = {key: [] for key in keys}
            for key, at in await tx.fetch(_FAILURES.format(marks=marks(keys)), *keys, now - window):
                stamps[key].append(float(at))
            waits = [
                sorted(stamps[key])[-limit] + window - now
                for key, limit in limits.items()
                if len(stamps[key]) >= limit
            ]
            if waits:
                return max(waits)
            await tx.executemany(
                "INSERT INTO login_failures (key, at, attempt) VALUES (?, ?, ?)",
                [(key, now, attempt) for key in limits],
            )
        return 0.0

    async def forgive_failure(self, keys: list[str], attempt: str, clear: list[str]) -> None:
        async with self._store.throttling() as tx:
            await tx.execute(
                _FORGIVE.format(marks=marks(keys)),  # only placeholders go in
                *keys,
                attempt,
            )
            if clear:
                await tx.execute(_FORGIVE_ALL.format(marks=marks(clear)), *clear)


@dataclass(frozen=True, slots=True)
class Attempt:
    """A login attempt the throttle counted: its keys, and its id among their failures."""

    keys: list[str]
    id: str


class LoginThrottle:
    """Failed logins in a sliding window, counted three ways.

    - per (username, address): ``max_failures``; the owner of a name is not locked out by
      someone else's guesses from another address;
    - per address, whatever the usernames: ``ADDRESS_FACTOR`` times that (spraying names);
    - per username, from every address: ``USERNAME_FACTOR`` times that, a much higher bound
      against guessing spread over many addresses.

    An attempt is counted before its password is checked and taken back if it was right,
    so concurrent guesses get no more tries than the limit. The counts are kept where every
    node and every restart sees them (DESIGN 8): in Redis with the backplane, else in the
    database; each key holds at most its limit of failures.
    """

    ADDRESS_FACTOR: Final = 4
    USERNAME_FACTOR: Final = 20

    def __init__(
        self,
        counts: FailureCounts,
        max_failures: int,
        window: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.counts = counts
        self.max_failures = max_failures
        self.window = window
        self.clock = clock

    def limits(self, username: str, address: str) -> dict[str, int]:
        name = username.lower()
        if len(name) > NAME_KEY_MAX:  # nobody's (usernames are short): a short key for it
            name = "#" + hashlib.sha256(name.encode()).hexdigest()[:32]
        return {
            f"pair:{name}|{address}": self.max_failures,
            f"addr:{address}": self.max_failures * self.ADDRESS_FACTOR,
            f"user:{name}": self.max_failures * self.USERNAME_FACTOR,
        }

    async def attempt(self, username: str, address: str) -> Attempt | int:
        """Count one attempt; or, if a limit is reached, the whole seconds to wait (nothing
        counted).

        Raises:
            DatabaseError, BackplaneUnavailableError: the counts cannot be reached.
        """
        limits = self.limits(username, address)
        attempt = secrets.token_urlsafe(12)
        wait = await self.counts.count_failure(limits, self.window, self.clock(), attempt)
        if wait > 0:
            return max(1, math.ceil(wait))
        return Attempt(list(limits), attempt)

    async def succeeded(self, attempt: Attempt) -> None:
        """The attempt was right: it is not a failure, and the pair's past ones are forgiven.

        Raises:
            DatabaseError, BackplaneUnavailableError: the counts cannot be reached.
        """
        pairs = [key for key in attempt.keys if key.startswith("pair:")]
        await self.counts.forgive_failure(attempt.keys, attempt.id, pairs)

    async def withdraw(self, attempt: Attempt) -> None:
        """Take back an attempt whose password was never checked (the service failed
        meanwhile), if the counts can be reached: an outage must not lock users out."""
        try:
            await self.counts.forgive_failure(attempt.keys, attempt.id, [])
        except (DatabaseError, BackplaneUnavailableError) as exc:
            log.warning("a login attempt stays counted (%s)", exc)
