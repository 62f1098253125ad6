"""The events a client holds for the application's ``async for``: bounded, so that an
application that reads slowly holds the reader back rather than memory growing, and ended
once the client is closed, after the events it still holds."""

from __future__ import annotations

import asyncio
import collections
from typing import Any


class Inbox:
    """A bounded FIFO of events, one reader (the client's runner) and one application."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("max_queue must be at least 1")
        self.size = size
        self._events: collections.deque[dict[str, Any]] = collections.deque()
        self._arrived, self._room = asyncio.Event(), asyncio.Event()
        self._ended = False

    async def put(self, events: list[dict[str, Any]]) -> None:
        """Hold these events, waiting while the inbox is full."""
        for event in events:
            while len(self._events) >= self.size:
                self._arrived.set()  # what is held is there to take meanwhile
                self._room.clear()
                await self._room.wait()
            self._events.append(event)
        if events:
            self._arrived.set()

    async def get(self) -> dict[str, Any]:
        """The next event.

        Raises:
            StopAsyncIteration: the inbox has ended and holds nothing more.
        """
        while not self._events:
            if self._ended:
                raise StopAsyncIteration
            self._arrived.clear()
            await self._arrived.wait()
        event = self._events.popleft()
        self._room.set()
        return event

    def end(self) -> None:
        """No more events will come: ``get`` ends once the held ones are taken."""
        self._ended = True
        self._arrived.set()

    def reopen(self) -> None:
        self._ended = False
