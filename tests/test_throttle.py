"""throttle: failed logins counted in the database (both backends) and in Redis, alike."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from wsfanout import Settings, create_app
from wsfanout.backplane.redis.failures import RedisCounts
from wsfanout.backplane.redis.link import Link
from wsfanout.store import Store
from wsfanout.throttle import Attempt, DatabaseCounts, FailureCounts, LoginThrottle

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(params=["sqlite", "postgresql", "redis"])
async def counts(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[FailureCounts]:
    """Where the throttle counts: the database on each backend, or Redis (through the
    Redis backplane's link)."""
    if request.param == "redis":
        link = Link(REDIS_URL, request.getfixturevalue("redis_prefix"))
        yield RedisCounts(link)
        await link.close()
        return
    where = (
        tmp_path / "db.sqlite3" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    )
    store = await Store.open(where)
    yield DatabaseCounts(store)
    await store.close()


async def test_a_name_guessed_from_many_addresses_is_stopped_too(counts: FailureCounts) -> None:
    """Past 20x the limit across addresses, a username is throttled everywhere, until the
    window has passed."""
    now = [1000.0]
    throttle = LoginThrottle(counts, max_failures=5, window=900, clock=lambda: now[0])
    for n in range(100):
        assert isinstance(await throttle.attempt("anny", f"10.3.{n // 250}.{n % 250}"), Attempt)
    now[0] = 1001.0
    assert await throttle.attempt("Anny", "10.9.9.9") == 899
    now[0] = 1901.0  # the window passed
    assert isinstance(await throttle.attempt("anny", "10.9.9.9"), Attempt)


async def test_a_right_password_is_not_a_failure(counts: FailureCounts) -> None:
    """A success takes its own count back and forgives that pair's failures; other pairs
    keep theirs."""
    throttle = LoginThrottle(counts, max_failures=2, window=900, clock=lambda: 5.0)
    assert isinstance(await throttle.attempt("greg", "a"), Attempt)
    assert isinstance(await throttle.attempt("greg", "b"), Attempt)
    ok = await throttle.attempt("greg", "a")
    assert isinstance(ok, Attempt)
    await throttle.succeeded(ok)
    assert isinstance(await throttle.attempt("greg", "a"), Attempt)
    assert isinstance(await throttle.attempt("greg", "a"), Attempt)
    assert await throttle.attempt("greg", "a") == 900
    assert isinstance(await throttle.attempt("greg", "b"), Attempt)
    assert await throttle.attempt("greg", "b") == 900


async def test_parallel_attempts_on_two_stores_share_one_limit(pg_url: str) -> None:
    """Two nodes' stores on one PostgreSQL counting the same name at once: no more than
    the limit get through between them."""
    first, second = await Store.open(pg_url), await Store.open(pg_url)
    try:
        throttles = [
            LoginThrottle(DatabaseCounts(store), max_failures=5, window=900)
            for store in (first, second)
        ]
        results = await asyncio.gather(
            *(throttles[n % 2].attempt("lisa", "10.4.4.4") for n in range(20))
        )
    finally:
        await first.close()
        await second.close()
    assert sum(isinstance(result, Attempt) for result in results) == 5


class NoCounts:
    """Counts nothing: for what the throttle decides before it counts."""

    async def count_failure(
        self, limits: dict[str, int], window: float, now: float, attempt: str
    ) -> float:
        raise AssertionError("not counted here")

    async def forgive_failure(self, keys: list[str], attempt: str, clear: list[str]) -> None:
        raise AssertionError("not counted here")


def test_long_names_are_counted_under_a_short_key() -> None:
    """A login name longer than any username is counted under a digest: the keys stay
    small whatever an attacker sends, and each such name still has counts of its own."""
    throttle = LoginThrottle(NoCounts(), max_failures=5, window=900)
    long_a, long_b = throttle.limits("a" * 1000, "10.0.0.1"), throttle.limits("b" * 1000, "x")
    assert max(len(key) for key in long_a) < 100
    assert set(long_a).isdisjoint(long_b)
    assert "user:mike" in throttle.limits("MIKE", "10.0.0.1")


@pytest.mark.parametrize("redis", [False, True])
async def test_the_service_counts_where_its_engine_says(
    settings: Settings, redis_prefix: str, redis: bool
) -> None:
    """A started service counts failed logins in Redis with the Redis engine, else in the
    database (which every node of it shares)."""
    if redis:
        settings = dataclasses.replace(settings, redis_url=REDIS_URL, redis_prefix=redis_prefix)
    app = create_app(settings)
    await app.startup()
    try:
        assert app.service is not None
        expected = RedisCounts if redis else DatabaseCounts
        assert isinstance(app.service.throttle.counts, expected)
    finally:
        await app.shutdown()
