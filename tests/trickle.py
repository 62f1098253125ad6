"""The trickle attack of issue 24, as a process of its own: ``python -m tests.trickle [--body]
PORT COUNT SOURCE...`` keeps COUNT TCP connections to 127.0.0.1:PORT, spread over the SOURCE
addresses (127.0.0.x: every one of them is this machine), each sending one byte of a request
head every TRICKLE seconds, never a whole head; with ``--body``, a whole ``POST /login``
head at once, then one byte of its body every TRICKLE seconds, never a whole body. A
connection the server ends (or refuses) is opened again at once, within RATE connections a
second in all. Every second it prints one line, ``open=N ended=N``: how many connections
are open now, and how many the server has ended so far. It runs until killed (SIGTERM).

A process of its own so that its thousands of connections (and its reconnecting at once)
cost the test's process neither descriptors nor the interpreter's lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

TRICKLE = 3.0  # seconds between two bytes of a head
RATE = 1000.0  # connections made again a second, at most, in all (the first ones at once)
HEAD = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Trickle: " + b"a" * 4096
BODY_HEAD = (
    b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"Content-Length: 16000\r\n\r\n"
)
BODY = b"{" + b" " * 15998 + b"}"


class Trickle:
    def __init__(self, port: int, *, body: bool = False) -> None:
        self.port = port
        self.first, self.trickled = (BODY_HEAD, BODY) if body else (b"", HEAD)
        self.open = 0
        self.ended = 0
        self._next = 0.0  # when the next connection may be made (loop time)

    async def _turn(self) -> None:
        """Wait for this connection's turn to be made again: RATE a second in all."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        at = self._next = max(self._next + 1 / RATE, now)
        if at > now:
            await asyncio.sleep(at - now)

    async def connection(self, source: str) -> None:
        """One connection after the other from ``source``, each trickling its head (or its
        body)."""
        again = False
        while True:
            if again:
                await self._turn()
            again = True
            try:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", self.port, local_addr=(source, 0)
                )
            except OSError:  # reset as it was made
                self.ended += 1
                continue
            self.open += 1
            try:
                writer.write(self.first)
                for byte in self.trickled:
                    writer.write(bytes([byte]))
                    with contextlib.suppress(TimeoutError):
                        if not await asyncio.wait_for(reader.read(4096), TRICKLE):
                            break  # the server ended it
            except OSError:
                pass  # reset
            finally:
                self.open -= 1
                self.ended += 1
                writer.close()

    async def run(self, count: int, sources: list[str]) -> None:
        tasks = [
            asyncio.create_task(self.connection(sources[n % len(sources)])) for n in range(count)
        ]
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        while not stop.is_set():
            print(f"open={self.open} ended={self.ended}", flush=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def main() -> None:
    args = sys.argv[1:]
    body = args[:1] == ["--body"]
    port, count, *sources = args[1:] if body else args
    asyncio.run(Trickle(int(port), body=body).run(int(count), sources))


if __name__ == "__main__":
    main()
