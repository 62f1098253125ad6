"""A TCP proxy for tests of clients: the network between a client and a node, which a test
can cut (every connection reset, as a NAT or a Wi-Fi change does) or point at another node
(as a load balancer does when a node dies)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct


class Proxy:
    """Forwards connections on 127.0.0.1:``port`` to 127.0.0.1:``target``."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.resets = 0
        self.hold = 0.0  # seconds a new connection waits before it is forwarded (a slow link)
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    def point(self, target: int) -> None:
        """New connections go to this port from now on."""
        self.target = target

    @property
    def connections(self) -> int:
        return len(self._pairs)

    def reset(self) -> int:
        """Reset (RST) every connection through the proxy, both ways; how many."""
        self.resets += 1
        return self._reset()

    def _reset(self) -> int:
        pairs, self._pairs = self._pairs, set()
        for pair in pairs:
            for writer in pair:
                _abort(writer)
        return len(pairs)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._reset()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> Proxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.sleep(self.hold)
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:  # the node is gone: the client sees a reset, as a balancer's would be
            _abort(writer)
            return
        pair = (writer, up_writer)
        self._pairs.add(pair)
        pipes = [
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ]
        self._tasks.update(pipes)
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pipe in pipes:
                pipe.cancel()
                self._tasks.discard(pipe)
            if pair in self._pairs:  # one side ended: end the other as it ended
                self._pairs.discard(pair)
                for side in pair:
                    side.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()


def _abort(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def unused_port() -> int:
    """A port nothing listens on: connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
