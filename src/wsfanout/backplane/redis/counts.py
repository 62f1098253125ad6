"""Failed logins counted in Redis, where every node of the Redis backplane sees them at once.

The login throttle (``throttle.py``) counts through whatever its ``FailureCounts`` is; with the
Redis engine that is ``RedisCounts``, which ``RedisBackplane.failure_counts()`` offers on its
own link. A count and its check are one Lua script (``count_failure.lua``, beside this
module), so nodes counting at once see each other's counts.
"""

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
