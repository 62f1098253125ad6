"""The harness's own TCP proxy: the network between a client and its node (a load balancer
that sends a connection to a live node when its own is dead), and between a node and Redis.

Its faults are what a TCP proxy can do to a link: ``cut`` (every connection reset, as a NAT
or a Wi-Fi change does), ``stall`` (nothing forwarded either way for a while, new connections
held too: a link that loses everything), and ``delay`` (every chunk held back a while: a slow
link). Loss through a proxy can only be one of those; real packet loss needs ``tc netem``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from collections.abc import Callable
from pathlib import Path


class Proxy:
    """Forwards connections on 127.0.0.1:``port`` to the first of ``targets()`` that takes
    them (a node that is down refuses, and the next one is tried)."""

    def __init__(self, name: str, targets: Callable[[], list[int]]) -> None:
        self.name = name
        self.targets = targets
        self.port = 0
        self.delay = 0.0  # seconds each chunk is held back
        self._open = asyncio.Event()  # cleared while stalled
        self._open.set()
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", port, backlog=4096, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def connections(self) -> int:
        return len(self._pairs)

    def upstream_ports(self) -> set[int]:
        """The local ports of the connections this proxy opened upstream (to find them in
        Redis's CLIENT LIST)."""
        ports = set()
        for _, upstream in self._pairs:
            sockname = upstream.get_extra_info("sockname")
            if sockname:
                ports.add(sockname[1])
        return ports

    def cut(self) -> int:
        """Reset every connection through the proxy, both ways; how many."""
        pairs, self._pairs = self._pairs, set()
        for pair in pairs:
            for writer in pair:
                _abort(writer)
        return len(pairs)

    def stall(self) -> None:
        self._open.clear()

    def heal(self) -> None:
        """No stall, no delay."""
        self.delay = 0.0
        self._open.set()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._open.wait()
            upstream = await self._connect()
            if upstream is None:  # every target is down: the client sees a reset
                _abort(writer)
                return
            up_reader, up_writer = upstream
            pair = (writer, up_writer)
            self._pairs.add(pair)
            pipes = [
                asyncio.create_task(self._pipe(reader, up_writer)),
                asyncio.create_task(self._pipe(up_reader, writer)),
            ]
            try:
                await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pipe in pipes:
                    pipe.cancel()
                if pair in self._pairs:  # one side ended: end the other as it ended
                    self._pairs.discard(pair)
                    for side in pair:
                        side.close()
        except asyncio.CancelledError:
            _abort(writer)
        finally:
            self._tasks.discard(task)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        for port in self.targets():
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(2):
                    return await asyncio.open_connection("127.0.0.1", port)
        return None

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                if not self._open.is_set():
                    await self._open.wait()
                if self.delay:
                    await asyncio.sleep(self.delay)
                writer.write(data)
                await writer.drain()


def _abort(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


_PICK = random.Random()  # not the run's seeded generator: ports change nothing it decides
_GIVEN: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port nothing is bound to, below the kernel's ephemeral range and not given before.

    Port 0 would give one from the ephemeral range, where every outgoing connection takes its
    local port (and leaves it in TIME_WAIT after the test suite's thousands): a server started
    on it a moment later can find it taken, as a RabbitMQ node once did with its distribution
    port (``dist_port_already_used``)."""
    low = _ephemeral_low()
    for _ in range(200):
        port = _PICK.randrange(max(1024, low - 12000), low)
        if port in _GIVEN:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    with socket.socket() as sock:  # the range below is full: the kernel's choice
        sock.bind(("127.0.0.1", 0))
        given: int = sock.getsockname()[1]
    return given
