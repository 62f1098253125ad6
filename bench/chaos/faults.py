"""The faults of a chaos run: a schedule made from the seed (the same seed, the same faults
in the same order with the same parameters), and doing each one.

One fault at a time: it starts, lasts its while, is healed (the server restarted, the link
whole again), and after a short pause the next one starts. Every kind is in each round of
the schedule, in a shuffled order.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio

from .proxy import Proxy
from .services import Node, Postgres, Rabbit, Redis

KINDS = (
    "kill9",  # kill -9 a node, restart it
    "sigterm",  # SIGTERM a node (it drains), restart it
    "redis-restart",  # kill Redis (no persistence: its data is lost), start it again
    "client-kill",  # CLIENT KILL a node's subscriber connection
    "pg-restart",  # stop PostgreSQL (fast), start it again
    "rabbit-restart",  # stop the RabbitMQ node, start it again
    "redis-link",  # stall, slow or cut the link between a node and Redis
    "client-link",  # stall, slow or cut the links between a node and its clients
)
LINK_FAULTS = ("stall", "delay", "cut")


@dataclass(frozen=True)
class Fault:
    kind: str
    node: int  # the node it is done to (or whose link), where that means something
    hold: float  # seconds before it is healed
    how: str = ""  # for links: stall, delay or cut
    delay: float = 0.0  # for a slow link: seconds per chunk
    pause: float = 1.0  # seconds after it is healed, before the next

    def __str__(self) -> str:
        what = f"{self.kind} node{self.node}"
        if self.how:
            what += f" {self.how}" + (f" {self.delay * 1000:.0f} ms" if self.how == "delay" else "")
        return f"{what} for {self.hold:.1f} s, then {self.pause:.1f} s"


def schedule(seed: int, kinds: list[str], count: int, nodes: int) -> list[Fault]:
    """``count`` faults of these kinds, each kind once per round, in a seeded order."""
    rng = random.Random(f"{seed}-faults")
    faults: list[Fault] = []
    while len(faults) < count:
        round_ = list(kinds)
        rng.shuffle(round_)
        for kind in round_:
            how, delay = "", 0.0
            if kind.endswith("-link"):
                how = rng.choice(LINK_FAULTS)
                delay = round(rng.uniform(0.02, 0.3), 3) if how == "delay" else 0.0
            hold = round(rng.uniform(1.0, 6.0), 1)
            if how == "stall" and rng.random() < 0.3:  # past the pings' timeouts, at times
                hold = round(rng.uniform(20.0, 45.0), 1)
            pause = round(rng.uniform(1.0, 4.0), 1)
            faults.append(Fault(kind, rng.randrange(nodes), hold, how, delay, pause))
    return faults[:count]


class Faults:
    """Does faults to the run's servers and links."""

    def __init__(
        self,
        nodes: list[Node],
        redis_server: Redis,
        postgres: Postgres,
        rabbit: Rabbit,
        redis_links: list[Proxy],
        client_links: list[Proxy],
        say: Callable[[str], None],
    ) -> None:
        self.nodes = nodes
        self.redis = redis_server
        self.postgres = postgres
        self.rabbit = rabbit
        self.redis_links = redis_links
        self.client_links = client_links
        self.say = say
        self.done: list[dict[str, Any]] = []

    async def do(self, fault: Fault) -> None:
        started = time.monotonic()
        node = self.nodes[fault.node]
        detail = ""
        if fault.kind == "kill9":
            node.kill()
            await asyncio.sleep(fault.hold)
            await asyncio.to_thread(node.start)
        elif fault.kind == "sigterm":
            code = await asyncio.to_thread(node.terminate)
            detail = f"exit {code}"
            await asyncio.sleep(fault.hold)
            await asyncio.to_thread(node.start)
        elif fault.kind == "redis-restart":
            await asyncio.to_thread(self.redis.stop)
            await asyncio.sleep(fault.hold)
            await asyncio.to_thread(self.redis.start)
        elif fault.kind == "client-kill":
            detail = f"{await self._client_kill(fault.node)} killed"
            await asyncio.sleep(fault.hold)
        elif fault.kind == "pg-restart":
            await asyncio.to_thread(self.postgres.stop)
            await asyncio.sleep(fault.hold)
            await asyncio.to_thread(self.postgres.start)
        elif fault.kind == "rabbit-restart":
            await asyncio.to_thread(self.rabbit.stop)
            await asyncio.sleep(fault.hold)
            await asyncio.to_thread(self.rabbit.start)
        elif fault.kind.endswith("-link"):
            links = self.redis_links if fault.kind == "redis-link" else self.client_links
            link = links[fault.node]
            if fault.how == "cut":
                detail = f"{link.cut()} connections reset"
            elif fault.how == "stall":
                link.stall()
            else:
                link.delay = fault.delay
            await asyncio.sleep(fault.hold)
            link.heal()
        else:
            raise ValueError(f"unknown fault {fault.kind!r}")
        took = time.monotonic() - started
        self.say(f"fault {fault}: done in {took:.1f} s {detail}".rstrip())
        self.done.append({"fault": str(fault), "t": started, "took": took, "detail": detail})
        await asyncio.sleep(fault.pause)

    async def _client_kill(self, index: int) -> int:
        """Kill the node's subscriber connection(s) in Redis: the ones in pub/sub mode that
        came through the node's own Redis proxy."""
        ports = self.redis_links[index].upstream_ports()
        client = redis.asyncio.Redis(host="127.0.0.1", port=self.redis.port)
        killed = 0
        try:
            for entry in await client.client_list():
                port = int(str(entry.get("addr", ":0")).rpartition(":")[2])
                if port in ports and (int(entry.get("sub", 0)) or int(entry.get("psub", 0))):
                    await client.client_kill_filter(_id=entry["id"])
                    killed += 1
        finally:
            await client.aclose()
        return killed

    async def heal_all(self) -> None:
        """Every link whole, every server up (the end of the run)."""
        for link in (*self.redis_links, *self.client_links):
            link.heal()
        for server in (self.redis, self.rabbit):
            if server.proc is None:
                await asyncio.to_thread(server.start)
        for node in self.nodes:
            if not node.alive:
                await asyncio.to_thread(node.start)
