"""A worker process of reading clients: ``python -m bench.chaos.readers CONFIG WORKER``.

Each client is a ``wsfanout.client.Client`` on its home node's proxy, with a token, and logs
every event the application gets, with ``time.monotonic()`` (one clock for every process of
the machine), one JSON array a line:

- ``["w", client, t, {stream: [epoch, offset]}]``: a welcome;
- ``["m", client, t, stream, offset, text]``: a message;
- ``["r", client, t, recovered, lost, missed]``: resumed;
- ``["s", client, t, state, reason]``: a change of state.

Every second the worker prints ``{"connected": n, "clients": N, "events": n, "last": t}`` on
stdout; a line on stdin ends it (every client closed, the log flushed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import IO, Any

import orjson

from wsfanout.client import Client

from .population import Population, token


class Reader:
    def __init__(self, index: int, user: str, groups: list[str], url: str, log: IO[bytes]):
        self.index = index
        self.log = log
        self.connected = False
        self.events = 0
        self.last = 0.0
        tok = token(user, groups)
        self.client = Client(
            url, get_token=lambda: tok, on_state=self._state, connect_timeout=15,
            max_queue=100_000,
        )  # fmt: skip

    def _write(self, row: list[Any]) -> None:
        self.log.write(orjson.dumps(row) + b"\n")

    def _state(self, state: str, reason: str | None) -> None:
        self.connected = state == "connected"
        self._write(["s", self.index, time.monotonic(), state, reason])

    async def run(self) -> None:
        async for event in self.client:
            now = time.monotonic()
            kind = event.get("type")
            if kind == "message":
                self.events += 1
                self.last = now
                row = ["m", self.index, now, event.get("stream"), event.get("offset")]
                self._write([*row, event.get("text")])
            elif kind == "welcome":
                streams = {
                    name: [where.get("epoch"), where.get("offset")]
                    for name, where in (event.get("streams") or {}).items()
                }
                self._write(["w", self.index, now, streams])
            elif kind == "resumed":
                lost = event.get("lost") or []
                row = ["r", self.index, now, event.get("recovered"), lost, event.get("missed")]
                self._write(row)


async def main(config: dict[str, Any], worker: int, log: IO[bytes]) -> None:
    population = Population.from_json(config["population"])
    readers = []
    for index in config["workers"][worker]:
        user, home = population.clients[index]
        url = f"ws://127.0.0.1:{config['balancers'][home]}/"
        readers.append(Reader(index, user, population.users[user], url, log))
    tasks = []
    for start in range(0, len(readers), 25):  # a few at a time: no storm of our own making
        tasks += [asyncio.create_task(r.run()) for r in readers[start : start + 25]]
        await asyncio.sleep(0.1)
    stop = asyncio.ensure_future(asyncio.to_thread(sys.stdin.readline))
    while not stop.done():
        status = {
            "connected": sum(r.connected for r in readers),
            "clients": len(readers),
            "events": sum(r.events for r in readers),
            "last": max((r.last for r in readers), default=0.0),
        }
        print(json.dumps(status), flush=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(stop), 1.0)
    await asyncio.gather(*(r.client.close() for r in readers), return_exceptions=True)
    await asyncio.gather(*tasks, return_exceptions=True)


if __name__ == "__main__":
    settings, number = json.loads(Path(sys.argv[1]).read_text()), int(sys.argv[2])
    with Path(settings["folder"], f"readers{number}.log").open("wb", buffering=1 << 20) as out:
        asyncio.run(main(settings, number, out))
