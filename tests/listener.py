"""What tests of the Python client share: an application that listens through it and keeps
what it got, a publisher that keeps what the service acknowledged, and the check that the
one got every acknowledged message of the other exactly once and in order."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable
from typing import Any

import jwt

from tests.server import Server, http
from wsfanout.client import Client

API_KEY = "client-test-key"
RATE = 200  # messages a second a Publisher.run sends at most
JWT_SECRET = "client-test-jwt-secret-of-32-bytes!"  # HS256 wants 32 bytes or more
SERVER_ENV = {"WSFANOUT_API_KEYS": API_KEY, "WSFANOUT_JWT_SECRET": JWT_SECRET}


def token(sub: str, groups: tuple[str, ...] = (), lifetime: float = 300) -> str:
    """A connection token for ``sub``, signed with the servers' ``JWT_SECRET``."""
    claims = {"sub": sub, "groups": list(groups), "exp": int(time.time() + lifetime)}
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


class Listener:
    """An application iterating over a client's events, in a task of its own."""

    def __init__(self, chat: Client) -> None:
        self.chat = chat
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self.task = asyncio.create_task(self._listen())

    async def _listen(self) -> None:
        async for event in self.chat:
            self.events.append(event)
            self._changed.set()
        self._changed.set()

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event["type"] == kind]

    def texts(self, stream: str = "all") -> list[str]:
        return [e["text"] for e in self.of("message") if e.get("stream") == stream]

    async def until(self, done: Callable[[], bool], timeout: float = 30) -> None:
        """Wait until ``done()`` holds (checked at each event), or fail saying what came."""
        try:
            async with asyncio.timeout(timeout):
                while not done():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            shown = [e["type"] + ":" + str(e.get("text", "")) for e in self.events[-10:]]
            kinds = collections.Counter(e["type"] for e in self.events)
            raise AssertionError(
                f"not within {timeout} s; state {self.chat.state} ({self.chat.reason}), "
                f"events {dict(kinds)}, the last: {shown}"
            ) from None

    async def got(self, text: str, stream: str = "all", timeout: float = 30) -> None:
        await self.until(lambda: text in self.texts(stream), timeout)

    async def stop(self) -> None:
        await self.chat.close()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self.task, 10)


class Publisher:
    """Broadcasts numbered messages through a node's HTTP API, one at a time, keeping those
    the node acknowledged (202); those refused (a node or Redis away) are not kept."""

    def __init__(self, prefix: str = "m") -> None:
        self.prefix = prefix
        self.acked: list[str] = []
        self.refused = 0
        self.sent = 0

    async def publish(self, server: Server | str, text: str | None = None) -> bool:
        url = server if isinstance(server, str) else server.http_url
        text = text or f"{self.prefix}{self.sent}"
        self.sent += 1
        try:
            status, _ = await asyncio.to_thread(
                http,
                "POST",
                url + "/api/publish",
                {"type": "broadcast", "text": text},
                {"authorization": f"Bearer {API_KEY}"},
            )
        except OSError:
            status = 0
        if status == 202:
            self.acked.append(text)
            return True
        self.refused += 1
        return False

    async def publish_batch(self, server: Server, texts: list[str]) -> bool:
        """Publish several broadcasts in one request; whether the node took them all."""
        items = [{"type": "broadcast", "text": text} for text in texts]
        self.sent += len(texts)
        status, _ = await asyncio.to_thread(
            http,
            "POST",
            server.http_url + "/api/publish",
            items,
            {"authorization": f"Bearer {API_KEY}"},
        )
        if status != 202:
            self.refused += len(texts)
            return False
        self.acked += texts
        return True

    async def run(self, server: Callable[[], Server | str], stop: asyncio.Event) -> None:
        """Publish until ``stop`` is set, to whichever node ``server()`` names now (a node
        that is away refuses, and the next message tries again), at most ``RATE`` a
        second: however long a cut lasts on a loaded machine, what it misses stays within
        the history the tests keep."""
        while not stop.is_set():
            published = await self.publish(server())
            await asyncio.sleep(1 / RATE if published else 0.05)


def exactly_once(got: list[str], acked: list[str], lost: bool) -> list[str]:
    """Check that ``got`` holds no message twice and keeps the publisher's order, and that
    every acknowledged message is in it unless the client was told the stream was lost.

    Returns the acknowledged messages that did not arrive (empty unless ``lost``)."""
    assert len(got) == len(set(got)), f"duplicates: {len(got) - len(set(got))}"
    order = {text: n for n, text in enumerate(acked)}
    positions = [order[text] for text in got if text in order]
    assert positions == sorted(positions), "out of order"
    missing = [text for text in acked if text not in set(got)]
    assert lost or not missing, f"{len(missing)} acknowledged messages never arrived: {missing}"
    return missing
