"""The publisher process: ``python -m bench.chaos.publishers CONFIG``.

At a steady rate it publishes messages of every kind (broadcast, group, direct) through
every door: the websocket (a client per node, ``send`` and its ``ack``), the HTTP API
(``POST /api/publish``, its 202) and RabbitMQ (a persistent message, the broker's confirm).
Each message's text is its unique id. It logs, one JSON array a line:

- ``["p", id, via, stream, t]``: about to be sent;
- ``["a", id, t, outcome]``: ``ok`` (acknowledged) or why not (not acknowledged: it may
  still have been published, or not).

It stops publishing at the first line on stdin, waits for the answers still due, then
prints the number of messages left in the RabbitMQ queue once it is empty (or after a
while) and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sys
import time
from pathlib import Path
from typing import IO, Any

import aio_pika
import orjson

from wsfanout.client import Client, ClientError

from .population import API_KEY, Population, token

KINDS = (("broadcast", 0.04), ("group", 0.46), ("direct", 0.5))
VIAS = ("ws", "http", "amqp")
HTTP_TIMEOUT = 10.0
HTTP_TRIES = 3  # attempts of an HTTP publish (to the next node each time) ...
HTTP_RETRY_PAUSE = 1.0  # ... this many seconds apart


class Publishers:
    def __init__(self, config: dict[str, Any], log: IO[bytes]) -> None:
        self.config = config
        self.population = Population.from_json(config["population"])
        self.log = log
        self.rng = random.Random(f"{config['seed']}-publishers")
        self.ws: list[Client] = []
        self.amqp: aio_pika.abc.AbstractRobustConnection | None = None
        self.channel: aio_pika.abc.AbstractChannel | None = None
        self.pending: set[asyncio.Task[None]] = set()
        self.drains: list[asyncio.Task[None]] = []
        self.counts = {"sent": 0, "ok": 0, "http retries": 0}

    def _write(self, row: list[Any]) -> None:
        self.log.write(orjson.dumps(row) + b"\n")

    async def start(self) -> None:
        for i, port in enumerate(self.config["balancers"]):
            name = self.population.publishers[i]
            tok = token(name, [])
            client = Client(f"ws://127.0.0.1:{port}/", get_token=lambda tok=tok: tok)
            await client.connect()
            self.ws.append(client)
            self.drains.append(asyncio.create_task(self._drain(client)))
        self.amqp = await aio_pika.connect_robust(self.config["amqp_url"], reconnect_interval=1)
        self.channel = await self.amqp.channel(publisher_confirms=True)
        await self.channel.declare_queue(self.config["amqp_queue"], durable=True)

    async def _drain(self, client: Client) -> None:
        async for _ in client:  # what a publisher receives is not audited
            pass

    def message(self, number: int) -> tuple[str, str, dict[str, Any]]:
        """The n-th message: its door, stream and body (an API item, or a websocket frame)."""
        rng = self.rng
        via = rng.choice(VIAS)
        kind = rng.choices([k for k, _ in KINDS], [w for _, w in KINDS])[0]
        text = f"{via[0]}{number}"
        if kind == "broadcast":
            return via, "all", {"type": "broadcast", "text": text}
        if kind == "group":
            group = rng.choice(self.population.groups)
            return via, f"group:{group}", {"type": "group", "group": group, "text": text}
        user = rng.choice(list(self.population.users))
        return via, f"user:{user}", {"type": "direct", "user_name": user, "text": text}

    async def publish(self, number: int) -> None:
        via, stream, body = self.message(number)
        text = body["text"]
        self._write(["p", text, via, stream, time.monotonic()])
        self.counts["sent"] += 1
        try:
            if via == "ws":
                await self.ws[number % len(self.ws)].send(body)
            elif via == "http":
                await self._post_until_taken(number, {**body, "from": "chaos"})
            else:
                await self._amqp({**body, "from": "chaos"})
            outcome = "ok"
        except ClientError as exc:
            outcome = exc.code
        except Exception as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        if outcome == "ok":
            self.counts["ok"] += 1
        self._write(["a", text, time.monotonic(), outcome])

    async def _post_until_taken(self, number: int, item: dict[str, Any]) -> None:
        """POST the item, and again to the next node while no 202 came (the node died, a
        503 while Redis is away), up to ``HTTP_TRIES`` times: as a backend that must not lose
        a message does. Its idempotency key makes a retry of what was published already a
        no-op; the audit fails on any reader given it twice."""
        item = {**item, "idempotency_key": item["text"]}
        for attempt in range(HTTP_TRIES):
            try:
                await self._post((number + attempt) % len(self.ws), item)
                return
            except Exception:
                if attempt == HTTP_TRIES - 1:
                    raise
                self.counts["http retries"] += 1
                await asyncio.sleep(HTTP_RETRY_PAUSE)

    async def _post(self, node: int, item: dict[str, Any]) -> None:
        port = self.config["balancers"][node]
        body = orjson.dumps(item)
        head = (
            f"POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        async with asyncio.timeout(HTTP_TIMEOUT):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(head.encode() + body)
                status_line = await reader.readline()
                await reader.read()
            finally:
                writer.close()
        parts = status_line.split()
        status = int(parts[1]) if len(parts) > 1 else 0
        if status != 202:
            raise RuntimeError(f"HTTP {status}")

    async def _amqp(self, item: dict[str, Any]) -> None:
        assert self.channel is not None
        message = aio_pika.Message(
            orjson.dumps(item), delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=item["text"],
        )  # fmt: skip
        async with asyncio.timeout(HTTP_TIMEOUT):
            await self.channel.default_exchange.publish(
                message, routing_key=self.config["amqp_queue"]
            )

    async def run(self, stop: asyncio.Future[str]) -> None:
        rate = self.config["rate"]
        started, number = time.monotonic(), 0
        while not stop.done():
            number += 1
            task = asyncio.create_task(self.publish(number))
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)
            delay = started + number / rate - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(stop), delay)
        await asyncio.gather(*self.pending, return_exceptions=True)

    async def queue_left(self, wait: float) -> int:
        """The messages still in the RabbitMQ queue, once it is empty or ``wait`` passed."""
        deadline = time.monotonic() + wait
        left = -1
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                assert self.amqp is not None
                channel = await self.amqp.channel()
                queue = await channel.declare_queue(self.config["amqp_queue"], passive=True)
                left = queue.declaration_result.message_count or 0
                await channel.close()
                if left == 0:
                    return 0
            await asyncio.sleep(1)
        return left


async def main(config: dict[str, Any], log: IO[bytes]) -> None:
    publishers = Publishers(config, log)
    await publishers.start()
    print(json.dumps({"started": True}), flush=True)
    stop = asyncio.ensure_future(asyncio.to_thread(sys.stdin.readline))
    await publishers.run(stop)
    left = await publishers.queue_left(120)
    print(json.dumps({**publishers.counts, "queue_left": left}), flush=True)
    await asyncio.to_thread(sys.stdin.readline)  # the end of the drain: close
    for client in publishers.ws:
        await client.close()
    if publishers.amqp is not None:
        await publishers.amqp.close()


if __name__ == "__main__":
    settings = json.loads(Path(sys.argv[1]).read_text())
    with Path(settings["folder"], "publishers.log").open("wb", buffering=1 << 16) as out:
        asyncio.run(main(settings, out))
