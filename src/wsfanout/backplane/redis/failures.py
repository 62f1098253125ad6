"""The login throttle's failure counts in Redis (``throttle.FailureCounts``): shared by every
node of the Redis backplane, through its link; the script is ``count_failure.lua``. Here, and
imported only with the Redis engine, so that a node without Redis never imports redis-py."""

from __future__ import annotations

from typing import Final

from redis.exceptions import RedisError

from ..base import BackplaneUnavailableError
from .link import Link, Script, describe

_COUNT_FAILURE: Final = Script.packaged("count_failure")


class RedisCounts:
    """Failures as sorted sets ``<prefix>lf:<key>`` of attempts scored by time, shared by
    every node of the Redis backplane (the throttle's ``FailureCounts``)."""

    def __init__(self, link: Link) -> None:
        self._link = link

    async def count_failure(
        self, limits: dict[str, int], window: float, now: float, attempt: str
    ) -> float:
        link = self._link
        keys = [link.prefix + "lf:" + key for key in limits]
        command = (_COUNT_FAILURE, len(keys), *keys, repr(now), repr(window), attempt)
        try:
            (wait,) = await link.pipeline([(*command, *limits.values())], client=link.queries)
        except (RedisError, OSError) as exc:
            raise BackplaneUnavailableError(describe(exc)) from None
        return float(wait)

    async def forgive_failure(self, keys: list[str], attempt: str, clear: list[str]) -> None:
        link = self._link
        prefix = link.prefix + "lf:"
        commands: list[tuple[object, ...]] = [("ZREM", prefix + key, attempt) for key in keys]
        if clear:
            commands.append(("DEL", *(prefix + key for key in clear)))
        try:
            await link.pipeline(commands, client=link.queries)
        except (RedisError, OSError) as exc:
            raise BackplaneUnavailableError(describe(exc)) from None
