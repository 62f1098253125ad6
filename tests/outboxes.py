"""Outboxes for tests of the hub and its engines, and a reader that records what it gets."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson

from wsfanout.flusher import Flusher
from wsfanout.outbox import Outbox
from wsfanout.types import Message


async def nowhere(message: object) -> None:
    raise AssertionError("nothing is sent in these tests")


def outbox(
    user: str,
    *groups: str,
    send: Any = nowhere,
    flusher: Flusher | None = None,
    session: str | None = "a-session",
) -> Outbox:
    """A connection's outbox; logged in with a session unless ``session`` is None (a
    token's or the host app's connection)."""
    return Outbox(
        user=user,
        groups=groups,
        session=session,
        send=send,
        flusher=flusher or Flusher(),
        limit=10_000,
        batch_max=8,
        batch_bytes=10_000,
    )


class Reader:
    """A connection's outbox whose client reads only once ``read()`` starts its writer;
    until then what it is sent stays queued. ``events`` is what it received, in order."""

    def __init__(self, user: str, *groups: str) -> None:
        self.flusher = Flusher()
        self.outbox = outbox(user, *groups, send=self._record, flusher=self.flusher)
        self.events: list[dict[str, Any]] = []
        self._writer: asyncio.Task[int] | None = None

    async def _record(self, message: Message) -> None:
        data = orjson.loads(message["text"])
        self.events += data if isinstance(data, list) else [data]

    def read(self) -> None:
        self._writer = asyncio.get_running_loop().create_task(self.outbox.run())

    def texts(self) -> list[str]:
        return [event["text"] for event in self.events if event["type"] == "message"]

    async def close(self) -> None:
        self.outbox.close(1000)
        if self._writer is None:
            self.read()
        assert self._writer is not None
        await self._writer
        await self.flusher.close()


async def eventually(condition: Callable[[], object], timeout: float = 3.0) -> None:
    """Wait until ``condition()`` holds (polling), failing after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - any condition, not one event
            await asyncio.sleep(0.005)
