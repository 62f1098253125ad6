"""The Redis engine's link: its connection pools, pipelines, Lua scripts, and health.

Connections are bounded, and a command waits (up to ``SYNC_TIMEOUT``) for a free one rather
than failing: publishing, joins and heartbeats share one pool (``client``); users' presence
requests and the login throttle get a small one of their own (``queries``), so that no
number of them can take the connections the others need.

A Lua script is a packaged ``.lua`` file beside this module, read once at import
(``Script.packaged``) and run by its SHA; one that Redis has forgotten (it restarted) is
loaded again and its commands run again, in order (``pipeline``). Whether Redis can be used
now (``healthy``, ``reason``) is the subscriber's to judge (``pubsub.py``): it is the one
connection that is always in use.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from importlib import resources
from typing import Any, Final

import redis.asyncio as redis
from redis.exceptions import NoScriptError, RedisError

from ..base import BackplaneUnavailableError

log = logging.getLogger(__name__)

SYNC_TIMEOUT: Final = 2.0  # seconds a command waits for a free connection
PIPELINE_MAX: Final = 1000  # commands per round trip to Redis
POOL_MAX: Final = 50  # connections for publishing, joins and presence updates ...
QUERY_POOL_MAX: Final = 4  # ... and for users' presence requests and the throttle
STOP_TIMEOUT: Final = 5.0  # seconds close() waits for each task and connection pool


class Script:
    """A Lua script run by its SHA (loaded again when Redis has forgotten it)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    @classmethod
    def packaged(cls, *names: str) -> Script:
        """The ``.lua`` files of these names beside this module, joined in order (a
        script that uses a shared function names its file first)."""
        folder = resources.files(__package__)
        return cls("".join(folder.joinpath(f"{name}.lua").read_text() for name in names))


class Link:
    """The connection pools to one Redis, and what it is known to be now."""

    def __init__(self, url: str, prefix: str) -> None:
        self.prefix = prefix  # of every key and channel
        self.client: Any = _client(url, POOL_MAX)
        self.queries: Any = _client(url, QUERY_POOL_MAX)
        self.healthy = False
        self.reason = "not connected yet"
        self.starting = True  # not connected yet, and no attempt has failed either
        self.tried = asyncio.Event()  # set once the first attempt has connected or failed

    def check(self) -> None:
        """Raise unless Redis can be used now (as far as the subscriber knows).

        Raises:
            BackplaneUnavailableError: it cannot.
        """
        if not self.healthy:
            raise BackplaneUnavailableError(self.reason)

    def up(self, channels: int) -> None:
        if not self.healthy:
            again = "" if self.starting else " again: logins and publishing work"
            log.info("backplane connected%s: subscribed to %d channels", again, channels)
        self.healthy = True
        self.starting = False
        self.reason = "ok"
        self.tried.set()

    def down(self, exc: BaseException) -> None:
        reason = describe(exc)
        if self.healthy or self.reason != reason:
            log.warning("backplane unavailable (%s); reconnecting with backoff", reason)
        self.healthy = False
        self.starting = False
        self.reason = reason
        self.tried.set()

    async def ping(self) -> None:
        """Raise if Redis does not answer a PING (for /healthz).

        Raises:
            BackplaneUnavailableError: it did not.
        """
        self.check()
        try:
            await asyncio.wait_for(self.client.ping(), 2)
        except (RedisError, OSError, TimeoutError) as exc:
            raise BackplaneUnavailableError(describe(exc)) from None

    async def renew(self) -> None:
        """Drop the pooled connections: they may be dead sockets to a Redis that
        restarted, and the first command after this must not fail on one. (Nothing is
        retried: a script might have run before its reply was lost.)"""
        await self.client.connection_pool.disconnect()
        await self.queries.connection_pool.disconnect()

    async def pipeline(
        self, commands: list[tuple[Any, ...]], each: bool = False, client: Any = None
    ) -> list[Any]:
        """Run commands in one round trip (``_add_command`` says how they are written).
        Scripts Redis has forgotten (it restarted) are loaded and those commands run
        again, in order.

        Returns:
            Each command's reply; with ``each``, a command's error reply in its place.

        Raises:
            RedisError, OSError: Redis failed; without ``each``, the first error reply.
        """
        client = self.client if client is None else client
        pipe = client.pipeline(transaction=False)
        for command in commands:
            _add_command(pipe, command)
        results = await pipe.execute(raise_on_error=False)
        again = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        if again:
            for script in {commands[i][0].sha: commands[i][0] for i in again}.values():
                await client.script_load(script.source)
            pipe = client.pipeline(transaction=False)
            for i in again:
                _add_command(pipe, commands[i])
            for i, result in zip(again, await pipe.execute(raise_on_error=False), strict=True):
                results[i] = result
        for result in results:
            if isinstance(result, Exception) and not each:
                raise result
        return list(results)

    async def close(self) -> None:
        for client in (self.client, self.queries):
            with contextlib.suppress(Exception):
                async with asyncio.timeout(STOP_TIMEOUT):
                    await client.aclose()


def _client(url: str, connections: int) -> Any:
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=connections,
        timeout=SYNC_TIMEOUT,  # waiting for a free connection
        socket_connect_timeout=2,
        socket_timeout=5,
        retry_on_timeout=False,
    )
    return redis.Redis.from_pool(pool)


def _add_command(pipe: Any, command: tuple[Any, ...]) -> None:
    """Queue one command: plain, or ``(Script, *keys, *args)`` with two keys, or
    ``(Script, number of keys, *keys, *args)``."""
    head = command[0]
    if isinstance(head, Script):
        if isinstance(command[1], int):
            pipe.evalsha(head.sha, command[1], *command[2:])
        else:
            pipe.evalsha(head.sha, 2, *command[1:])
    else:
        pipe.execute_command(*command)


async def stop(task: asyncio.Task[None] | None) -> None:
    """Cancel a task and wait until it ends, cancelling it again every 0.1 s, for up to
    STOP_TIMEOUT: redis-py can swallow a cancellation that lands inside a read (it becomes
    a timeout, or a retry), and a task that missed it would keep ``close()`` waiting for
    ever."""
    if task is None:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STOP_TIMEOUT
    while not task.done():
        if loop.time() > deadline:
            log.warning("%s did not stop within %g s; left behind", task.get_name(), STOP_TIMEOUT)
            return
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    if not task.cancelled():
        task.exception()  # retrieved: a failure there was the loop's to log, not asyncio's


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
