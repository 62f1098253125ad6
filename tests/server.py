"""Real servers for end-to-end tests: hypercorn in a subprocess on port 0, and raw clients."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate

from tests.conftest import SECRET
from wsfanout.cli import demo_password

ROOT = Path(__file__).resolve().parents[1]


SERVERS = ("hypercorn", "uvicorn")
UVICORN_FLAGS = ("--ws", "websockets-sansio", "--http", "h11", "--no-proxy-headers")


class Server:
    """``hypercorn wsfanout:app`` (or ``uvicorn wsfanout:app``, or ``wsfanout serve``) on a
    socket bound to 127.0.0.1:0 and passed as ``fd://``."""

    def __init__(
        self,
        data_dir: Path,
        env: dict[str, str] | None = None,
        app: str = "wsfanout:app",
        health_path: str = "/healthz",
        workers: int = 1,
        bare: bool = False,
        serve: bool = False,
        args: tuple[str, ...] = (),
        server: str = "hypercorn",
        session: bool = False,
        descriptors: int | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.cwd = cwd or data_dir  # where the server runs (an app module may live there)
        self.env = env or {}
        self.app = app
        self.health_path = health_path
        self.workers = workers
        self.bare = bare  # no WSFANOUT_* at all: what `hypercorn wsfanout:app` does on its own
        self.serve = serve  # `wsfanout serve` (pings every 20 s, its own limits) instead
        self.args = args  # more arguments for the server command
        self.server = server  # hypercorn or uvicorn (with its websockets-sansio protocol)
        self.session = session  # a session (and process group) of its own, as under systemd
        self.descriptors = descriptors  # the server's file descriptor limit (None: ours)
        self.log_path = data_dir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def stopped_by_sigterm(self) -> tuple[int, ...]:
        """The exit statuses of a clean stop on SIGTERM: plain uvicorn re-raises the signal
        once it has stopped, to die of it, as it does for every app (its supervisor of
        several workers does not)."""
        if self.server == "uvicorn" and not self.serve and self.workers == 1:
            return (-signal.SIGTERM,)
        return (0,)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def start(self, timeout: float = 30) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(1024)
        self.port = sock.getsockname()[1]
        env = self.environment()
        with self.log_path.open("ab") as log:
            bind = f"fd://{sock.fileno()}"
            workers = ["--workers", str(self.workers)]
            if self.serve:
                command = ["-m", "wsfanout.cli", "serve", "--server", self.server, *workers]
                command += ["--bind", bind]
            elif self.server == "uvicorn":  # as the README tells users of plain uvicorn
                # uvicorn's command line, its --fd kept a TCP socket (bench/uvicorn_fd.py)
                fd = ["--fd", str(sock.fileno())]
                command = ["-m", "bench.uvicorn_fd", *UVICORN_FLAGS, *workers, *fd]
                command.append(self.app)
            else:
                command = ["-m", "hypercorn", *workers, "--bind", bind, self.app]
            self.proc = subprocess.Popen(
                [sys.executable, *command, *self.args],
                pass_fds=[sock.fileno()],
                preexec_fn=self._limit_descriptors if self.descriptors else None,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                start_new_session=self.session,
            )
        sock.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()}")
            with contextlib.suppress(OSError):
                status, _ = http("GET", self.http_url + self.health_path)
                if status == 200:
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"server did not start: {self.log_path.read_text()}")

    def environment(self) -> dict[str, str]:
        """The server's environment variables, built when it starts (on ``self.port``)."""
        env = {
            **os.environ,
            "WSFANOUT_DATA_DIR": str(self.data_dir),
            "WSFANOUT_SECRET_KEY": SECRET,
            "WSFANOUT_PRESENCE_EVENTS_MAX": "0",  # tests of presence turn them on
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            **self.env,
        }
        if self.bare:
            env = {k: v for k, v in env.items() if not k.startswith("WSFANOUT_")}
        return env

    def _limit_descriptors(self) -> None:
        """In the server's process, before it runs: its lower file descriptor limit."""
        assert self.descriptors is not None
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.descriptors, hard))

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    @contextlib.contextmanager
    def running(self) -> Iterator[Server]:
        self.start()
        try:
            yield self
        finally:
            self.stop()

    def pids(self) -> list[int]:
        """The server's processes: hypercorn's, then its workers'."""
        assert self.proc is not None
        found, pending = [], [self.proc.pid]
        while pending:
            pid = pending.pop()
            found.append(pid)
            with contextlib.suppress(OSError):
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
                pending.extend(int(child) for child in children)
        return found

    def rss(self) -> int:
        """The resident memory of the server's processes (hypercorn's and its workers'), bytes."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        return total

    def kill(self) -> None:
        """SIGKILL every process of the server at once: it dies without a word."""
        assert self.proc is not None
        for pid in self.pids():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def established(self) -> int:
        """How many TCP connections the server holds open on its port (any state but
        LISTEN, TIME_WAIT and CLOSE: ESTABLISHED, or closing with data still queued)."""
        port = f"{self.port:04X}"
        count = 0
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            local, state = fields[1], fields[3]
            if local.endswith(":" + port) and state not in ("0A", "06", "07"):
                count += 1
        return count

    def metric(self, name: str) -> float:
        """The value of an unlabelled metric in the server's /metrics."""
        _, answer = http("GET", self.http_url + "/metrics")
        for line in answer["_body"].splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"no {name} in /metrics")

    def login(self, username: str, password: str | None = None) -> str:
        """Log in over HTTP; the ``Cookie`` header value."""
        status, headers = http(
            "POST",
            self.http_url + "/login",
            {"username": username, "password": password or demo_password(username)},
        )
        assert status == 200, (status, headers)
        return headers["set-cookie"].split(";")[0]


@contextlib.contextmanager
def demo_server(data_dir: Path, demo_db: Path, env: dict[str, str]) -> Iterator[Server]:
    """A running server on a copy of the demo database; its log must show no traceback."""
    shutil.copy(demo_db, data_dir / "wsfanout.sqlite3")
    with Server(data_dir, env).running() as running:
        yield running
    log = running.log_path.read_text()
    assert "Traceback" not in log, log


def http(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str]]:
    """A blocking request; (status, headers with a ``_body`` entry)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})  # noqa: S310
    if data is not None:
        request.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            result = {k.lower(): v for k, v in response.headers.items()}
            result["_body"] = response.read().decode()
            return response.status, result
    except urllib.error.HTTPError as err:
        result = {k.lower(): v for k, v in err.headers.items()}
        result["_body"] = err.read().decode()
        return err.code, result


class Client:
    """A websockets client that reads continuously into a queue of events."""

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.events: asyncio.Queue[Any] = asyncio.Queue()
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, url: str, cookie: str, **headers: str) -> Client:
        conn = await connect(url, additional_headers={"cookie": cookie, **headers}, max_size=None)
        return cls(conn)

    async def _read(self) -> None:
        with contextlib.suppress(Exception):
            async for frame in self.conn:
                data = orjson.loads(frame)
                for event in data if isinstance(data, list) else [data]:
                    self.events.put_nowait(event)

    async def send(self, data: Any) -> None:
        await self.conn.send(orjson.dumps(data).decode())

    async def next(self, timeout: float = 10) -> Any:
        return await asyncio.wait_for(self.events.get(), timeout)

    async def next_of(self, kind: str, timeout: float = 10) -> Any:
        """The next event of this type, skipping others."""
        while True:
            event = await self.next(timeout)
            if event["type"] == kind:
                return event

    async def quiet(self, wait: float = 0.3) -> list[Any]:
        """Everything that arrives within ``wait`` seconds."""
        await asyncio.sleep(wait)
        found = []
        while not self.events.empty():
            found.append(self.events.get_nowait())
        return found

    async def close(self) -> None:
        await self.conn.close()
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader


class RawClient:
    """A websocket over a plain socket, driven by wsproto: it reads only when told to."""

    def __init__(
        self, port: int, cookie: str, rcvbuf: int | None = None, deflate: bool = False
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", port))
        self.sock.settimeout(10)
        self.ws = WSConnection(ConnectionType.CLIENT)
        request = Request(
            host=f"127.0.0.1:{port}",
            target="/",
            extra_headers=[(b"cookie", cookie.encode())],
            extensions=[PerMessageDeflate()] if deflate else [],
        )
        self.sock.sendall(self.ws.send(request))
        events = self._events_until(lambda e: isinstance(e, (AcceptConnection, RejectConnection)))
        if not isinstance(events[-1], AcceptConnection):
            raise RuntimeError(f"handshake refused: {events[-1]!r}")
        self._partial = ""
        self.texts: list[str] = self._texts(events)

    def _texts(self, events: list[Event]) -> list[str]:
        """Whole text messages (wsproto hands large ones over in parts)."""
        texts = []
        for event in events:
            if isinstance(event, TextMessage):
                self._partial += event.data
                if event.message_finished:
                    texts.append(self._partial)
                    self._partial = ""
        return texts

    def _events_until(self, done: Any) -> list[Event]:
        found: list[Event] = []
        while True:
            data = self.sock.recv(65536)
            self.ws.receive_data(data or None)
            for event in self.ws.events():
                found.append(event)
                if done(event):
                    return found
            if not data:
                return found

    def read_until_close(self) -> tuple[int | None, list[str]]:
        """Read everything up to the close frame: (close code, text frames)."""
        events = self._events_until(lambda e: isinstance(e, CloseConnection))
        texts = self.texts + self._texts(events)
        closes = [e for e in events if isinstance(e, CloseConnection)]
        return (closes[0].code if closes else None), texts

    def count_pings(self, wanted: int) -> int:
        """Read until ``wanted`` pings have arrived (answered as a browser would)."""
        seen = 0

        def enough(event: Event) -> bool:
            nonlocal seen
            if isinstance(event, Ping):
                seen += 1
                self.sock.sendall(self.ws.send(event.response()))
            return seen >= wanted

        self._events_until(enough)
        return seen

    def reset(self) -> None:
        """Drop the TCP connection abruptly (RST), with no close frame."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


WSFANOUT = Path(sys.executable).parent / "wsfanout"  # the installed console script


def wsfanout(data_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The ``wsfanout`` command as an operator runs it on one machine: its data directory,
    and no ``WSFANOUT_*`` variable but ``env``."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("WSFANOUT_")}
    return subprocess.run(
        [str(WSFANOUT), *args],
        env={**inherited, "WSFANOUT_DATA_DIR": str(data_dir), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def redis_reachable(port: int = 6379) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def bench_node_modules() -> None:
    """bench/'s Node packages (``ws``, for the load generator and the soak's clients), from its
    package-lock, once: test workers that need them at once take turns (two ``npm ci`` in one
    folder at once fail, ENOENT), holding a lock on bench/package-lock.json."""
    bench = ROOT / "bench"
    with (bench / "package-lock.json").open("rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (bench / "node_modules" / "ws").exists():
            return
        done = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--prefix", str(bench)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, f"npm ci in bench/ failed: {done.stderr[-2000:]}"


def need_redis() -> None:
    """Skip (fail under CI=true) unless the machine's Redis answers on 127.0.0.1:6379."""
    if not redis_reachable():
        if os.environ.get("CI") == "true":
            pytest.fail("Redis is not running on 127.0.0.1:6379, and CI=true requires it")
        pytest.skip("Redis is not running on 127.0.0.1:6379 (start redis-server to run this)")


async def queue_messages(url: str, queue: str, *, delete: bool = False) -> int:
    """Messages ready in a RabbitMQ queue, asked on a new connection (a robust channel
    answers from its cache); ``delete`` deletes the queue afterwards."""
    import aio_pika

    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, durable=True, passive=True)
        count = declared.declaration_result.message_count
        assert count is not None
        if delete:
            await channel.queue_delete(queue)
        return count


def delete_redis_keys(prefix: str, url: str = "redis://127.0.0.1:6379/0") -> int:
    """Delete a test's keys (its history, presence) from the shared Redis; how many."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=prefix.replace("*", "\\*") + "*", count=1000))
        if keys:
            client.delete(*keys)
        return len(keys)
    except redis.RedisError:
        return 0
    finally:
        client.close()


class RedisServer:
    """A redis-server of the test's own, on a free port, stopped and started at will."""

    def __init__(self, directory: Path) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not redis_reachable(self.port):
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None
