"""Idempotency keys in memory (one node): which keyed publishes a stream has had lately.

Theory of operation. A backend may give a publish an ``idempotency_key`` (DESIGN 5): a
publish whose key its stream (``all``, ``group:<name>``, ``user:<username>``) already had
within ``ttl`` seconds is taken but not published again, so a retry (an HTTP answer lost, a
RabbitMQ redelivery) never reaches anyone twice. ``add()`` records a key and says whether it
is new; a key counts from its first publish (a repeat does not extend it).

Bounds. Every key lives ``ttl`` seconds from its first publish, so keys expire in the order
they came: the oldest are dropped as they are met, from the front. At most ``max_keys`` are
kept over all streams; past that the oldest goes first, even before its time (a retry that
late would be published again). So memory is at most ``max_keys`` entries of about 420
bytes with keys and names of 64 characters (42 MB for 100,000), whatever is published.

This is the local engine's (``backplane/local.py``); the Redis engine keeps the keys in
Redis instead, set in the same script as the publish itself (``backplane/redis/``), so that
every node agrees.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Final

MAX_KEYS: Final = 100_000


class RecentKeys:
    """The idempotency keys published to each stream in the last ``ttl`` seconds."""

    def __init__(
        self,
        ttl: float,
        *,
        max_keys: int = MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.max_keys = max_keys
        self.clock = clock
        # (stream, key) -> when it expires, oldest first
        self._expires: collections.OrderedDict[tuple[str, str], float] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._expires)

    def add(self, stream: str, key: str) -> bool:
        """Record ``key`` for ``stream``: True if it is new there (publish it), False if
        the stream had it within ``ttl`` seconds (a duplicate: drop it)."""
        expires, now = self._expires, self.clock()
        while expires:
            first = next(iter(expires))
            if expires[first] > now:
                break
            del expires[first]
        name = (stream, key)
        if name in expires:
            return False
        if len(expires) >= self.max_keys:
            expires.popitem(last=False)
        expires[name] = now + self.ttl
        return True

    def forget(self, stream: str, key: str) -> None:
        """Drop a key that was recorded but not published after all (the node began
        stopping while it waited for room): a retry must go out."""
        self._expires.pop((stream, key), None)
