"""The store's short caches: positive answers for a few seconds, so hot paths skip the database."""

from __future__ import annotations

import time
from typing import Final, Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

CACHE_SECONDS: Final = 10.0
CACHE_ENTRIES: Final = 100_000


class Cache(Generic[K, V]):
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
