"""History positions in Redis (DESIGN 5.1): offsets, epochs and recent messages per stream.

Theory of operation. With history on, a message is not PUBLISHed as is: one Lua script
(``publish.lua``) gives it its stream's next offset (``HINCRBY`` of a field of the stream's
meta hash, ``<prefix>s:<stream>``, which also holds the epoch), joins the encoded parts
around it, appends it to the stream's history (``XADD`` with ``MAXLEN`` on
``<prefix>h:<stream>``, the offset as the entry's ID) and PUBLISHes it, in one atomic step.
So two nodes never hand out the same offset, and every node receives a stream's messages in
offset order. ``read()`` finds where streams stand and, for a resume, what a client missed
(``positions.lua``), also in one step per stream; ``recent()`` a stream's last messages, with
the same script. A stream whose meta is gone (expired, or
Redis lost its data) gets a new epoch from Redis's clock, and its old history is dropped
with it; so does every stream of a Redis that restarted (another run id), which may have
lost messages.

Idempotency keys. A message with one sets ``<prefix>i:<stream>:<key>`` (``SET NX`` with the
idempotency ttl) in the same step, and goes out only if the key was not there (the script
replies 0 for a duplicate); with history off, through a script of its own
(``publish_once.lua``). So a publish and its key are kept together or not at all, whichever
node a retry reaches. (A stream's name has one colon at most: the key is all after it.)
"""

from __future__ import annotations

from typing import Any, Final

from redis.exceptions import RedisError

from ...protocol import Position
from ..base import BackplaneUnavailableError, Read, Recent
from .link import Link, Script, describe

META_TTL: Final = 30 * 86400  # seconds a stream's epoch and offset outlive its last message

_PUBLISH: Final = Script.packaged("publish")
_PUBLISH_ONCE: Final = Script.packaged("publish_once")
_POSITIONS: Final = Script.packaged("positions")


class Positions:
    """Streams' offsets and history in Redis, as ``history.History`` keeps them in memory."""

    def __init__(
        self, link: Link, node: str, size: int, ttl: float, idempotency_ttl: float = 300
    ) -> None:
        self._link = link
        self._node = node  # in new epochs
        self.enabled = size > 0 and ttl > 0
        self._size = size
        self._ttl = max(1, round(ttl))
        self._key_ms = max(1, round(idempotency_ttl * 1000))

    def publish(
        self, channel: str, stream: str, head: str, tail: str, key: str | None = None
    ) -> tuple[Any, ...]:
        """The command that publishes a message on ``channel`` (with history on: with its
        stream's next offset, and keeps it), unless its stream had its idempotency ``key``
        (then it replies 0)."""
        prefix = self._link.prefix
        if not self.enabled:  # then only for a key
            once = prefix + "i:" + stream + ":" + str(key)
            return (_PUBLISH_ONCE, 1, once, channel, head + tail, self._key_ms)
        args = (channel, head, tail, self._size, self._ttl, META_TTL, self._node)
        keys = (prefix + "s:" + stream, prefix + "h:" + stream)
        if key is None:
            return (_PUBLISH, *keys, *args)
        return (_PUBLISH, 3, *keys, prefix + "i:" + stream + ":" + key, *args, self._key_ms)

    async def read(self, streams: list[str], seen: dict[str, Position], budget: int) -> Read:
        """Where each stream stands and, for those in ``seen``, the messages after that
        position (None: not recoverable: another epoch, history that does not reach
        back, or more than ``budget`` bytes of it). One round trip, each stream read in
        one atomic step.

        Raises:
            BackplaneUnavailableError: Redis cannot be reached now.
        """
        link = self._link
        link.check()
        prefix = link.prefix
        keys: list[str] = []
        args: list[Any] = [self._node, META_TTL, self._ttl, self._size, budget]
        for stream in streams:
            keys += (prefix + "s:" + stream, prefix + "h:" + stream)
            was = seen.get(stream)
            args += ("", 0) if was is None else (was.epoch, was.offset)
        try:
            (results,) = await link.pipeline([(_POSITIONS, len(keys), *keys, *args)])
        except (RedisError, OSError) as exc:
            raise BackplaneUnavailableError(describe(exc)) from None
        found: Read = {}
        for stream, result in zip(streams, results, strict=True):
            where = Position(result[0].decode(), int(result[1]))
            replay = None
            if len(result) > 2 and result[2] == 1:
                replay = [frame.decode() for frame in result[3:]]
            found[stream] = (where, replay)
        return found

    async def recent(self, stream: str, limit: int, budget: int) -> Recent:
        """Where a stream stands and its last ``limit`` messages younger than the ttl,
        oldest first: as many of the newest as fit in ``budget`` bytes.

        Raises:
            BackplaneUnavailableError: Redis cannot be reached now.
        """
        (where, messages) = (await self.read([stream], {stream: Position("*", limit)}, budget))[
            stream
        ]
        return where, messages or []
