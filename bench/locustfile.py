"""A locust load test: users log in over HTTP, then chat over one websocket each.

Each simulated user logs in as one of the demo users (``wsfanout demo``), opens
the websocket with the session cookie, and sends a weighted mix of broadcast,
group and direct messages while a background greenlet reads everything that
arrives. A message's "response time" is the time until the server acks it (the
frame carries an ``id``); messages received are counted as their own entries.

    just locust                       # 50 users, 60 s, headless, against a local server
    locust -f bench/locustfile.py --host http://127.0.0.1:8000   # with the web UI

``websocket-client`` works under locust's gevent; the asyncio clients do not.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from typing import Any

import gevent
import websocket
from locust import HttpUser, between, events, task

from wsfanout.cli import DEMO_GROUPS

# username -> group, as `wsfanout demo` creates them
DEMO = {first.lower(): group for group, members in DEMO_GROUPS.items() for first in members}
_names = itertools.cycle(DEMO)


class ChatUser(HttpUser):
    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        self.username = next(_names)
        response = self.client.post(
            "/login",
            json={"username": self.username, "password": self.username.capitalize()},
            name="/login",
        )
        response.raise_for_status()
        cookie = "; ".join(f"{k}={v}" for k, v in self.client.cookies.items())
        url = self.host.replace("http", "ws", 1).rstrip("/") + "/"
        self.ws = websocket.create_connection(url, cookie=cookie, enable_multithread=True)
        self.pending: dict[str, float] = {}
        self.counter = 0
        self.reader = gevent.spawn(self._read)

    def on_stop(self) -> None:
        self.reader.kill()
        self.ws.close()

    def _read(self) -> None:
        while True:
            try:
                frame = self.ws.recv()
            except websocket.WebSocketException as exc:
                self._report("ws close", 0, 0, exc)
                return
            data = json.loads(frame)
            for event in data if isinstance(data, list) else [data]:
                self._handle(event, len(frame))

    def _handle(self, event: dict[str, Any], size: int) -> None:
        kind = event.get("type")
        if kind == "ack":
            sent = self.pending.pop(event["id"], None)
            if sent is not None:
                self._report("send", (time.perf_counter() - sent) * 1000, size)
        elif kind == "error":
            self.pending.pop(event.get("id", ""), None)
            self._report("send", 0, size, RuntimeError(event.get("code")))
        elif kind == "message":
            self._report(f"recv {event['kind']}", 0, size)

    def _report(self, name: str, ms: float, size: int, exc: Exception | None = None) -> None:
        events.request.fire(
            request_type="WS",
            name=name,
            response_time=ms,
            response_length=size,
            exception=exc,
            context={},
        )

    def _send(self, message: dict[str, Any]) -> None:
        self.counter += 1
        message["id"] = f"{self.username}-{self.counter}"
        self.pending[message["id"]] = time.perf_counter()
        self.ws.send(json.dumps(message))

    @task(1)
    def broadcast(self) -> None:
        self._send({"type": "broadcast", "text": f"hello from {self.username}"})

    @task(3)
    def group(self) -> None:
        group = random.choice(["boys", "girls"])
        self._send({"type": "group", "group": group, "text": f"to {group}"})

    @task(2)
    def direct(self) -> None:
        other = random.choice(list(DEMO))
        self._send({"type": "direct", "user_name": other.capitalize(), "text": "psst"})
