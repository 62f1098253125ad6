"""A small in-process ASGI driver: HTTP requests and websocket sessions, no server."""

from __future__ import annotations

import asyncio
import urllib.parse
from collections import deque
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import orjson

from wsfanout.types import ASGIApp, Message

TIMEOUT = 5.0


@dataclass
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.decode().lower() == name.lower():
                return value.decode("latin-1")
        return None

    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def cookie(self) -> str | None:
        """The ``name=value`` of a ``set-cookie`` header."""
        value = self.header("set-cookie")
        return value.split(";")[0] if value else None


def _headers(headers: dict[str, str] | None) -> list[tuple[bytes, bytes]]:
    merged = {"host": "testserver", **(headers or {})}
    return [(k.lower().encode(), v.encode("latin-1")) for k, v in merged.items()]


async def request(
    app: ASGIApp,
    method: str,
    path: str,
    *,
    body: bytes = b"",
    json: Any = None,
    headers: dict[str, str] | None = None,
    root_path: str = "",
    client: tuple[str, int] = ("127.0.0.1", 40000),
    chunks: int = 1,
    raw_path: bytes | None = None,
) -> Response:
    """Send one HTTP request through the app and collect the response."""
    all_headers = dict(headers or {})
    if json is not None:
        body = orjson.dumps(json)
        all_headers.setdefault("content-type", "application/json")
    path, _, query = path.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": root_path + path,
        "raw_path": raw_path if raw_path is not None else (root_path + path).encode(),
        "query_string": query.encode(),
        "root_path": root_path,
        "headers": _headers(all_headers),
        "client": client,
        "server": ("testserver", 80),
    }
    size = max(1, -(-len(body) // chunks)) if body else 1
    parts = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
    inbox: deque[Message] = deque(
        {"type": "http.request", "body": part, "more_body": i < len(parts) - 1}
        for i, part in enumerate(parts)
    )
    sent: list[Message] = []

    async def receive() -> Message:
        if inbox:
            return inbox.popleft()
        await asyncio.sleep(3600)  # a real server would wait for the disconnect
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await asyncio.wait_for(app(scope, receive, send), TIMEOUT)
    start = next(m for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return Response(start["status"], list(start.get("headers", [])), payload)


class Refused(Exception):
    def __init__(self, status: int | None, body: bytes) -> None:
        super().__init__(f"handshake refused with {status}: {body!r}")
        self.status = status
        self.body = body


class Closed(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"closed with {code}")
        self.code = code


@dataclass
class WebSocket:
    """One in-process websocket session; use as ``async with``."""

    app: ASGIApp
    path: str = "/"
    headers: dict[str, str] | None = None
    root_path: str = ""
    http_response_extension: bool = True
    query: str = ""  # the query string, as sent (already URL-encoded)
    reads: bool = True  # False: from the start, the app's sends block (until ``reading`` is set)
    to_app: asyncio.Queue[Message] = field(default_factory=asyncio.Queue)
    from_app: asyncio.Queue[Message] = field(default_factory=asyncio.Queue)
    events: deque[Any] = field(default_factory=deque)
    task: asyncio.Task[None] | None = None
    close_code: int | None = None
    reading: asyncio.Event = field(default_factory=asyncio.Event)
    """Cleared: the app's sends block, like a client that stopped reading."""
    scope: Message = field(default_factory=dict)
    """The scope the app was called with (filled in on entering)."""

    async def __aenter__(self) -> WebSocket:
        scope = {
            "type": "websocket",
            "asgi": {"version": "3.0"},
            "scheme": "ws",
            "path": self.root_path + self.path,
            "raw_path": (self.root_path + self.path).encode(),
            "query_string": self.query.encode(),
            "root_path": self.root_path,
            "headers": _headers(self.headers),
            "client": ("127.0.0.1", 40001),
            "server": ("testserver", 80),
            "subprotocols": [],
            "extensions": {"websocket.http.response": {}} if self.http_response_extension else {},
        }
        self.scope = scope
        if self.reads:
            self.reading.set()
        self.task = asyncio.create_task(self._run(scope))
        await self.to_app.put({"type": "websocket.connect"})
        first = await asyncio.wait_for(self.from_app.get(), TIMEOUT)
        if first["type"] == "websocket.accept":
            return self
        if first["type"] == "websocket.close":
            raise Refused(None, b"")
        body = await asyncio.wait_for(self.from_app.get(), TIMEOUT)
        raise Refused(first["status"], body.get("body", b""))

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.to_app.put({"type": "websocket.disconnect", "code": 1000})
        assert self.task is not None
        await asyncio.wait_for(self.task, TIMEOUT)

    async def _run(self, scope: Message) -> None:
        await self.app(scope, self.to_app.get, self._app_send)

    async def until_closed(self) -> list[Any]:
        """Every event up to the close; the code is left in ``close_code``."""
        events = []
        try:
            while True:
                events.append(await self.receive())
        except Closed:
            return events

    async def _app_send(self, message: Message) -> None:
        if message["type"] == "websocket.send":
            await self.reading.wait()
        await self.from_app.put(message)

    async def send_text(self, text: str) -> None:
        await self.to_app.put({"type": "websocket.receive", "text": text})

    async def send_bytes(self, data: bytes) -> None:
        await self.to_app.put({"type": "websocket.receive", "bytes": data})

    async def send_json(self, data: Any) -> None:
        await self.send_text(orjson.dumps(data).decode())

    async def receive(self, timeout: float = TIMEOUT) -> Any:
        """The next event; a batched frame yields its events one by one.

        Raises:
            Closed: the app closed the socket.
        """
        while not self.events:
            message = await asyncio.wait_for(self.from_app.get(), timeout)
            if message["type"] == "websocket.close":
                self.close_code = message.get("code", 1000)
                raise Closed(self.close_code)
            data = orjson.loads(message["text"])
            self.events.extend(data if isinstance(data, list) else [data])
        return self.events.popleft()

    async def nothing(self, wait: float = 0.1) -> bool:
        """True if no event arrives within ``wait`` seconds."""
        if self.events:
            return False
        try:
            message = await asyncio.wait_for(self.from_app.get(), wait)
        except TimeoutError:
            return True
        await self.from_app.put(message)  # keep it for receive()
        return False


def resume_query(streams: dict[str, Any]) -> str:
    """The query string that resumes from these positions (DESIGN 5.1)."""
    return "resume=" + urllib.parse.quote(orjson.dumps(streams).decode())


async def until(ws: WebSocket, kind: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The events before the first of type ``kind``, and that one."""
    before = []
    while (event := await ws.receive())["type"] != kind:
        before.append(event)
    return before, event
