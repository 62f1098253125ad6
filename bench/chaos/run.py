"""The chaos run from start to audit: servers, nodes, proxies, readers and publishers up;
faults on the seeded schedule for the run's duration; then everything healed, publishing
stopped, a drain until every reader is connected and quiet; then the audit."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsfanout.store import Store

from . import audit
from .faults import KINDS, Faults, schedule
from .population import API_KEY, JWT_SECRET, NODES, Population, make
from .proxy import Proxy
from .services import Node, Postgres, Rabbit, Redis

SERVERS = ("hypercorn", "hypercorn", "uvicorn")
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Options:
    duration: float
    seed: int
    clients: int
    rate: float
    workers: int
    kinds: list[str]
    folder: Path | None
    quiet: float = 5.0  # seconds without a new delivery that end the drain
    drain_max: float = 180.0


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


class Process:
    """A child process of the harness that speaks JSON lines on stdout."""

    def __init__(self, name: str, args: list[str], folder: Path) -> None:
        self.name = name
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=(folder / f"{name}.err").open("wb"), env=env, cwd=ROOT,
        )  # fmt: skip
        self.last: dict[str, Any] = {}
        self.lines: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while True:
            line = await asyncio.to_thread(self.proc.stdout.readline)
            if not line:
                return
            with contextlib.suppress(ValueError):
                self.last = json.loads(line)
                await self.lines.put(self.last)

    def tell(self) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.write(b"go\n")
            self.proc.stdin.flush()

    async def wait(self, timeout: float = 60) -> int:
        try:
            return await asyncio.wait_for(asyncio.to_thread(self.proc.wait), timeout)
        except TimeoutError:
            self.proc.kill()
            return await asyncio.to_thread(self.proc.wait)


async def populate(url: str, population: Population) -> None:
    store = await Store.open(url)
    try:
        for group in population.groups:
            await store.add_group(group, exist_ok=True)
        for user, groups in population.users.items():
            await store.add_user(user, "!", groups=tuple(groups))
    finally:
        await store.close()


async def run(options: Options) -> int:
    folder = options.folder = options.folder or Path(tempfile.mkdtemp(prefix="wsfanout-chaos-"))
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)
    kinds = ", ".join(options.kinds) or "none"
    say(f"seed {options.seed}, {options.duration:g} s, {options.clients} clients, "
        f"{options.rate:g} publishes/s, faults: {kinds}; in {folder}")  # fmt: skip
    population = make(options.seed, options.clients)
    redis_server, postgres, rabbit = Redis(folder), Postgres(folder), Rabbit(folder)
    nodes: list[Node] = []
    links: list[Proxy] = []
    children: list[Process] = []
    try:
        await asyncio.gather(
            asyncio.to_thread(redis_server.start),
            asyncio.to_thread(postgres.start),
            asyncio.to_thread(rabbit.start),
        )
        await populate(postgres.url, population)
        redis_links = [Proxy(f"redis{i}", lambda: [redis_server.port]) for i in range(NODES)]
        for link in redis_links:
            await link.start()
        for i in range(NODES):
            env = {
                "WSFANOUT_REDIS_URL": f"redis://127.0.0.1:{redis_links[i].port}/0",
                "WSFANOUT_DATABASE_URL": postgres.url,
                "WSFANOUT_AMQP_URL": rabbit.url,
                "WSFANOUT_JWT_SECRET": JWT_SECRET,
                "WSFANOUT_API_KEYS": API_KEY,
                "WSFANOUT_SECRET_KEY": "chaos-secret",
                "WSFANOUT_HISTORY_SIZE": "1000",
                "WSFANOUT_HISTORY_TTL": "900",
                "WSFANOUT_PRESENCE_EVENTS_MAX": "0",
                "WSFANOUT_MAX_WAITING_PER_ADDRESS": "0",
                "WSFANOUT_LOG_LEVEL": "warning",
                "WSFANOUT_DATA_DIR": str(folder / f"node{i}"),
            }
            nodes.append(Node(i, SERVERS[i], folder, env))

        def targets(home: int) -> list[int]:  # the balancer: the home node, else a live one
            order = [nodes[(home + k) % NODES] for k in range(NODES)]
            return [node.port for node in order if node.alive or node is order[0]]

        client_links = [Proxy(f"node{i}", functools.partial(targets, i)) for i in range(NODES)]
        for link in client_links:
            await link.start()
        links = [*redis_links, *client_links]
        await asyncio.gather(*(asyncio.to_thread(node.start) for node in nodes))
        say("servers up: " + ", ".join(f"{n.name} :{n.port}" for n in nodes))

        config = {
            "folder": str(folder), "seed": options.seed, "rate": options.rate,
            "population": population.to_json(), "balancers": [p.port for p in client_links],
            "amqp_url": rabbit.url, "amqp_queue": "wsfanout",
            "workers": [list(range(w, options.clients, options.workers))
                        for w in range(options.workers)],
        }  # fmt: skip
        config_path = folder / "config.json"
        config_path.write_text(json.dumps(config))
        readers = [
            Process(f"readers{w}", ["bench.chaos.readers", str(config_path), str(w)], folder)
            for w in range(options.workers)
        ]
        children += readers
        await _until_connected(readers, options.clients, 120)
        say(f"{options.clients} readers connected")
        publishers = Process("publishers", ["bench.chaos.publishers", str(config_path)], folder)
        children.append(publishers)
        await asyncio.wait_for(publishers.lines.get(), 60)
        started = time.monotonic()
        say("publishing")

        faults = Faults(nodes, redis_server, postgres, rabbit, redis_links, client_links, say)
        plan = schedule(options.seed, options.kinds, 10_000, NODES) if options.kinds else []
        if plan:
            shown = max(len(options.kinds), int(options.duration / 8))
            say(f"the schedule's first {shown} faults (seed {options.seed}):")
            for number, fault in enumerate(plan[:shown], 1):
                print(f"    {number:3}. {fault}", flush=True)
        for fault in plan:
            if time.monotonic() - started > options.duration - 5:
                break
            await faults.do(fault)
        left = started + options.duration - time.monotonic()
        if left > 0:
            await asyncio.sleep(left)
        await faults.heal_all()
        say(f"{len(faults.done)} faults done; stopping the publishers")
        publishers.tell()
        published = await asyncio.wait_for(publishers.lines.get(), 200)
        say(f"publishers: {published}")
        await _drain(readers, options)
        for child in readers:
            child.tell()
        for child in readers:
            await child.wait()
        publishers.tell()
        await publishers.wait()
        (folder / "faults.json").write_text(json.dumps(faults.done, indent=1))
        return audit.main(folder, population, options.seed, published.get("queue_left", -1))
    finally:
        for child in children:
            if child.proc.poll() is None:
                child.proc.kill()
        for node in nodes:
            with contextlib.suppress(Exception):
                node.terminate(15)
        for link in links:
            await link.close()
        for stop in (rabbit.stop, postgres.stop, redis_server.stop):
            with contextlib.suppress(Exception):
                await asyncio.to_thread(stop)


async def _until_connected(readers: list[Process], clients: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        connected = sum(r.last.get("connected", 0) for r in readers)
        if connected >= clients:
            return
        await asyncio.sleep(0.5)
    raise RuntimeError(f"only {connected} of {clients} readers connected in {timeout} s")


async def _drain(readers: list[Process], options: Options) -> None:
    """Until every reader is connected and none got a message for ``quiet`` seconds."""
    deadline = time.monotonic() + options.drain_max
    while time.monotonic() < deadline:
        connected = sum(r.last.get("connected", 0) for r in readers)
        last = max(r.last.get("last", 0.0) for r in readers)
        if connected >= options.clients and time.monotonic() - last > options.quiet:
            say(f"drained: {connected} connected, quiet for {options.quiet:g} s")
            return
        await asyncio.sleep(0.5)
    say("the drain did not end in time: auditing anyway")


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="just chaos", description=__doc__)
    parser.add_argument("--duration", type=float, default=600, help="seconds of faults")
    parser.add_argument("--seed", type=int, default=None, help="replay a run (default: random)")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=20, help="publishes per second")
    parser.add_argument("--workers", type=int, default=3, help="reader processes")
    parser.add_argument(
        "--faults", type=fault_kinds, default=list(KINDS), help="kinds, comma-separated"
    )
    parser.add_argument("--folder", type=Path, default=None, help="keep logs here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(3), "big")
    options = Options(
        args.duration, seed, args.clients, args.rate, args.workers, args.faults, args.folder
    )
    code = asyncio.run(run(options))
    if code == 0 and args.folder is None and options.folder is not None:
        shutil.rmtree(options.folder, ignore_errors=True)  # its logs are kept when it fails
    return code


def fault_kinds(text: str) -> list[str]:
    """``--faults``: kinds, comma-separated (none: a run without faults)."""
    kinds = [kind for kind in text.split(",") if kind]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        known = ", ".join(KINDS)
        raise argparse.ArgumentTypeError(f"unknown: {', '.join(sorted(unknown))}; known: {known}")
    return kinds
