"""A locust load test: users log in, then chat over one websocket each, through
``wsfanout.client`` (the Python client: login, reconnect, resume, acks).

Each simulated user is one of the demo users (``wsfanout demo``) and sends a weighted mix of
broadcast, group and direct messages while it reads everything that arrives. Entries:
``connect`` (login, handshake and welcome), ``send`` (until the server's ack, or its error),
``recv <kind>`` per message received (its length: the text's), and a failed ``connection``
for each time a client lost its connection or was refused (it reconnects and resumes).

    just locust                       # 50 users, 60 s, headless, against a local server
    locust -f bench/locustfile.py --host http://127.0.0.1:8000   # with the web UI

Locust runs its users as gevent greenlets in a monkey-patched process, where an asyncio
client cannot run beside them, so the clients of a locust process share one asyncio loop in a
real OS thread of its own (``Loop``). The times are taken in that thread, where the frames
are handled, and reach locust's statistics through its hub; the two threads share the GIL,
as the old single-threaded greenlets shared one thread, so keep a locust process under a core.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import gevent
import gevent.monkey
from gevent.event import AsyncResult
from locust import User, between, events, task

from wsfanout.cli import DEMO_GROUPS, demo_password
from wsfanout.client import Client, ClientError

# username -> group, as `wsfanout demo` creates them
DEMO = {first.lower(): group for group, members in DEMO_GROUPS.items() for first in members}
_names = itertools.cycle(DEMO)
T = TypeVar("T")
# gevent made threading's threads greenlets; these are the operating system's.
_start_thread = gevent.monkey.get_original("_thread", "start_new_thread")


class _OSThreads(concurrent.futures.ThreadPoolExecutor):
    """The loop's executor (the client logs in with ``asyncio.to_thread``) on real threads:
    a patched thread is a greenlet that only the locust thread's hub would ever run."""

    def submit(
        self, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def work() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:
                future.set_exception(exc)

        _start_thread(work, ())
        return future


class Loop:
    """One asyncio loop in a real OS thread, for every user of this locust process.

    Its selector is the unpatched one (gevent's would wait on a hub nobody runs in that
    thread). Greenlets hand it coroutines; what they wait for, and every statistic, comes
    back through the locust thread's hub, so locust's own state is touched by its thread only.
    """

    def __init__(self) -> None:
        self.loop = asyncio.SelectorEventLoop(
            gevent.monkey.get_original("selectors", "DefaultSelector")()
        )
        self.loop.set_default_executor(_OSThreads())
        self.hub = gevent.get_hub()
        _start_thread(self.loop.run_forever, ())

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        """Run a coroutine there, not waiting for it (it reports what it measures)."""
        asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def wait(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine there; its result, this greenlet waiting (the others run on)."""
        result: AsyncResult = AsyncResult()

        def settle(done: concurrent.futures.Future[T]) -> None:
            if done.exception() is not None:
                result.set_exception(done.exception())
            else:
                result.set(done.result())

        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        future.add_done_callback(lambda done: self.hub.loop.run_callback_threadsafe(settle, done))
        value: T = result.get()
        return value

    def report(self, name: str, ms: float, size: int, exc: Exception | None = None) -> None:
        """A locust request entry, from the loop's thread."""
        self.hub.loop.run_callback_threadsafe(
            lambda: events.request.fire(
                request_type="WS",
                name=name,
                response_time=ms,
                response_length=size,
                exception=exc,
                context={},
            )
        )

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


_loop: Loop | None = None


def shared_loop() -> Loop:
    """This process's loop, started by its first user (after locust's workers forked)."""
    global _loop
    if _loop is None:
        _loop = Loop()
    return _loop


@events.quitting.add_listener
def _stop_loop(**_kwargs: Any) -> None:
    if _loop is not None:
        _loop.stop()


class ChatUser(User):
    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        self.username = next(_names)
        self.stopping = False
        self.loop = shared_loop()
        url = (self.host or "").replace("http", "ws", 1).rstrip("/") + "/"
        self.chat = self.loop.wait(self._connect(url))
        self.loop.spawn(self._read())

    def on_stop(self) -> None:
        self.stopping = True  # sends still waiting for their ack end unreported
        if hasattr(self, "chat"):  # connected once
            self.loop.wait(self.chat.close())

    async def _connect(self, url: str) -> Client:
        chat = Client(
            url,
            username=self.username,
            password=demo_password(self.username),
            on_state=self._changed,
        )
        started = time.perf_counter()
        try:
            await chat.connect()
        except ClientError as exc:
            self.loop.report("connect", (time.perf_counter() - started) * 1000, 0, exc)
            raise
        self.loop.report("connect", (time.perf_counter() - started) * 1000, 0)
        return chat

    def _changed(self, state: str, reason: str | None) -> None:
        if state == "disconnected" or (state == "closed" and reason != "closed"):
            self.loop.report("connection", 0, 0, ClientError(reason or state))

    async def _read(self) -> None:
        async for event in self.chat:
            if event["type"] == "message":
                self.loop.report(f"recv {event['kind']}", 0, len(event["text"]))
            elif event["type"] == "error":  # one that answers no request of ours
                self.loop.report("error", 0, 0, ClientError(str(event.get("code"))))

    async def _send(self, message: dict[str, Any]) -> None:
        started = time.perf_counter()
        try:
            await self.chat.send(message)
        except ClientError as exc:
            if not self.stopping:
                self.loop.report("send", (time.perf_counter() - started) * 1000, 0, exc)
            return
        self.loop.report("send", (time.perf_counter() - started) * 1000, 0)

    @task(1)
    def broadcast(self) -> None:
        self.loop.spawn(self._send({"type": "broadcast", "text": f"hello from {self.username}"}))

    @task(3)
    def group(self) -> None:
        group = random.choice(["boys", "girls"])
        self.loop.spawn(self._send({"type": "group", "group": group, "text": f"to {group}"}))

    @task(2)
    def direct(self) -> None:
        other = random.choice(list(DEMO))
        self.loop.spawn(
            self._send({"type": "direct", "user_name": other.capitalize(), "text": "psst"})
        )
