"""A real webhook receiver for tests: an asyncio server speaking HTTP/1.1 through h11.

It records every request that arrived whole and answers from a list of chosen answers
(then 200s), in any framing (Content-Length, chunked, or ended by closing the connection);
it can keep silent, and stop (its port closed) and start again on the same port. h11 is
hypercorn's own parser, so a request it accepts is one a real server accepts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
import time
from collections.abc import AsyncIterator
from typing import Literal

import h11


@dataclasses.dataclass(frozen=True)
class Answer:
    """One answer: its status, body, extra headers and framing ("close": no length, the
    body ends when the connection is closed)."""

    status: int = 200
    body: bytes = b"ok"
    headers: tuple[tuple[str, str], ...] = ()
    framing: Literal["length", "chunked", "close"] = "length"


@dataclasses.dataclass(frozen=True)
class Received:
    """A request that arrived whole."""

    target: str
    headers: dict[str, str]  # names in lower case
    body: bytes
    connection: int  # the connection it came on, counted from 1
    at: float  # time.monotonic() when it had arrived


class Receiver:
    """The receiver on 127.0.0.1 (TLS with ``tls``); ``start()`` binds port 0 the first
    time and the same port after a ``stop()``."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        self.port = 0
        self.received: list[Received] = []
        self.answers: list[Answer] = []  # the next answers, in order; then 200s
        self.silent = False  # record requests but never answer them
        self.connections = 0
        self.errors: list[Exception] = []  # requests h11 refused, and the receiver's own faults
        self._server: asyncio.Server | None = None
        self._stopping = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Listen (again)."""
        self._stopping = False
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", self.port, ssl=self.tls, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Close the port and every connection (a request that arrived whole has had its
        answer written: a clean stop)."""
        if self._server is None:
            return
        self._stopping = True
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._handlers:
            await asyncio.wait(self._handlers)
        await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        self._writers.add(writer)
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        conn = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = b""
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Request):
                    request, body = event, b""
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    assert request is not None
                    if self._stopping:  # it came whole after the stop: it never arrived
                        return
                    headers = {k.decode().lower(): v.decode() for k, v in request.headers}
                    self.received.append(
                        Received(request.target.decode(), headers, body, number, time.monotonic())
                    )
                    if self.silent:
                        while await reader.read(65536):  # until the client gives up
                            pass
                        return
                    answer = self.answers.pop(0) if self.answers else Answer()
                    # Written in the same step as the request was recorded: a stop cannot
                    # come between them.
                    if answer.framing == "close":
                        writer.write(_close_delimited(answer))
                        writer.close()
                        return
                    self._answer(conn, writer, answer)
                    conn.start_next_cycle()
                    await writer.drain()
                elif isinstance(event, h11.ConnectionClosed):
                    return
        except ConnectionError:
            pass  # the client went away (a timeout, or a long answer it did not read)
        except Exception as exc:
            self.errors.append(exc)
        finally:
            self._writers.discard(writer)
            self._handlers.discard(handler)
            writer.close()

    @staticmethod
    def _answer(conn: h11.Connection, writer: asyncio.StreamWriter, answer: Answer) -> None:
        headers = list(answer.headers)
        if answer.framing == "length":
            headers.append(("Content-Length", str(len(answer.body))))
        writer.write(conn.send(h11.Response(status_code=answer.status, headers=headers)) or b"")
        if answer.body:
            writer.write(conn.send(h11.Data(data=answer.body)) or b"")
        writer.write(conn.send(h11.EndOfMessage()) or b"")


def _close_delimited(answer: Answer) -> bytes:
    head = f"HTTP/1.1 {answer.status} Whatever\r\nConnection: close\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in answer.headers)
    return (head + "\r\n").encode() + answer.body


@contextlib.asynccontextmanager
async def receiving(tls: ssl.SSLContext | None = None) -> AsyncIterator[Receiver]:
    """A started receiver, stopped at the end; a request it could not parse fails the test."""
    receiver = Receiver(tls)
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()
    assert receiver.errors == []
