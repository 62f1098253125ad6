"""Lifecycle events (DESIGN 12): users connecting, coming online, joining groups, told to
the host app's callable (``create_app(hooks=…)``) and to a webhook (``webhooks.py``).

Theory of operation. ``emit()`` is a plain ``def``, called where the thing happens: the
websocket endpoint (``connected``, ``disconnected``), the backplane's presence (``online``,
``offline``: a user's first and last connection over every node, decided once, by whichever
node saw it, see ``Backplane.start``), the admin API (``joined``, ``left``). It builds the
event once and offers it to each consumer's bounded queue, never awaiting and never
raising, so nothing on the fan-out path or in a handshake waits for a hook. The host's
callable runs in a task of its own, one event at a time, in order; an exception it raises is
logged and counted, and the next event goes on. A queue that is full (a hook slower than
the events) drops what comes, counted in ``/metrics`` and logged.

What a node's death loses: the events still queued here (not yet handed to the callable,
or not yet answered 2xx by the webhook's receiver). The ``offline`` of users whose node
died is still told, by the node that notices (within the presence TTL, with Redis).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

log = logging.getLogger(__name__)

Hook = Callable[[dict[str, Any]], Awaitable[None]]
"""The host app's ``hooks``, made async (``App`` runs a plain function in a thread)."""


class Sink(Protocol):
    """Where events are posted besides the callable: ``webhooks.Webhook``."""

    def offer(self, event: dict[str, Any]) -> bool: ...
    def start(self) -> None: ...
    async def close(self, deadline: float) -> None: ...


HOOK_QUEUE: Final = 10_000  # events waiting for the host's callable, at most
LOG_EVERY: Final = 10.0  # seconds between lines about failing or dropped events
CLOSE_DEADLINE: Final = 5.0  # seconds the queued events get on shutdown


class Hooks:
    """Where lifecycle events go: the host's callable, a webhook, both, or nowhere."""

    def __init__(self, node: str, hook: Hook | None = None, webhook: Sink | None = None) -> None:
        self.node = node
        self.enabled = hook is not None or webhook is not None
        self.webhook = webhook
        self.stats = {"delivered": 0, "failed": 0, "dropped": 0}  # the callable's events
        self._hook = hook
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._idle = asyncio.Event()  # set when the callable has handled every event
        self._idle.set()
        self._logged = {"failed": -LOG_EVERY, "dropped": -LOG_EVERY}  # when, time.monotonic()

    def emit(self, kind: str, user: str, when: float | None = None, **fields: Any) -> None:
        """Tell ``kind`` (``connected``, ``online``, …) of ``user`` to every consumer,
        without waiting for any; ``when``: seconds since the epoch (default: now). It is
        also the backplane's ``OnPresence``: a user online or offline over all nodes."""
        if not self.enabled:
            return
        event = {
            "id": f"{self.node}-{next(self._ids)}",
            "type": kind,
            "time": time.time() if when is None else when,
            "node": self.node,
            "user": user,
            **fields,
        }
        if self._hook is not None:
            if len(self._queue) >= HOOK_QUEUE:
                self.stats["dropped"] += 1
                self._complain("dropped", "the hooks' queue is full: %d events dropped so far")
            else:
                self._queue.append(event)
                self._idle.clear()
                if self._wake is not None:
                    self._wake.set()
        if self.webhook is not None:
            self.webhook.offer(event)

    def connected(self, user: str) -> str | None:
        """A connection of ``user`` was accepted: its id for ``disconnected``, or None
        when no one listens."""
        if not self.enabled:
            return None
        connection = f"{self.node}-c{next(self._ids)}"
        self.emit("connected", user, connection=connection)
        return connection

    def disconnected(self, user: str, connection: str | None, code: int) -> None:
        if connection is not None:
            self.emit("disconnected", user, connection=connection, code=code)

    def start(self) -> None:
        """Start handing events to the callable and the webhook (on the running loop)."""
        if self._hook is not None and self._task is None:
            self._wake = asyncio.Event()
            if self._queue:  # told before start
                self._wake.set()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="wsfanout-hooks")
        if self.webhook is not None:
            self.webhook.start()

    async def _run(self) -> None:
        hook, queue, wake = self._hook, self._queue, self._wake
        assert hook is not None and wake is not None
        while True:
            await wake.wait()
            wake.clear()
            while queue:
                event = queue.popleft()
                try:
                    await hook(event)
                except Exception:
                    self.stats["failed"] += 1
                    self._complain("failed", "a hook raised: %d events failed so far", True)
                else:
                    self.stats["delivered"] += 1
            self._idle.set()

    def _complain(self, what: str, message: str, traceback: bool = False) -> None:
        """Log a failing or dropped event, at most once every LOG_EVERY seconds."""
        now = time.monotonic()
        if now - self._logged[what] >= LOG_EVERY:
            self._logged[what] = now
            log.error(message, self.stats[what], exc_info=traceback)

    async def close(self, deadline: float = CLOSE_DEADLINE) -> None:
        """Give the queued events up to ``deadline`` seconds (the callable's and the
        webhook's side by side), then drop what is left, counted."""
        task, self._task = self._task, None
        waits: list[Awaitable[Any]] = []
        if task is not None:
            waits.append(self._finish(task, deadline))
        if self.webhook is not None:
            waits.append(self.webhook.close(deadline))
        await asyncio.gather(*waits)

    async def _finish(self, task: asyncio.Task[None], deadline: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(deadline):
                await self._idle.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if self._queue:
            self.stats["dropped"] += len(self._queue)
            log.warning("%d lifecycle events dropped on shutdown", len(self._queue))
            self._queue.clear()
