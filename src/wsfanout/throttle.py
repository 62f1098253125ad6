"""The login throttle: failed logins counted where every node sees them (DESIGN 8).

The policy is here; the counting is the store's (``Store.count_failure``, a table) or the
backplane's (``Backplane.count_failure``, Redis sorted sets), both atomic across nodes.
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
from .store import DatabaseError

log = logging.getLogger(__name__)

NAME_KEY_MAX: Final = 64  # longer login names are counted under a digest


class FailureCounts(Protocol):
    """Where the throttle counts: the store, or Redis (``Store`` and ``Backplane`` both)."""

    async def count_failure(
        self, limits: dict[str, int], window: float, now: float, attempt: str
    ) -> float: ...

    async def forgive_failure(self, keys: list[str], attempt: str, clear: list[str]) -> None: ...


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
