"""The servers a chaos run starts for itself, on free ports in a folder of its own, so that
it can stop and restart them at will: redis-server, a PostgreSQL cluster (initdb/pg_ctl), a
RabbitMQ node (its own node name, ports and folders), and the wsfanout nodes. The machine's
shared servers are never touched."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .proxy import free_port

HOST = "127.0.0.1"


def wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), 0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port} after {timeout} s")


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)
    if not candidates:
        raise RuntimeError(f"{name} is not installed")
    return str(candidates[0])


class Redis:
    """redis-server without persistence: a restart loses every stream's history, as a Redis
    that lost its data does (every epoch changes)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> None:
        log = (self.folder / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", HOST, "--save", "",
             "--appendonly", "no", "--dir", str(self.folder)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_port(self.port, 20, self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


class Postgres:
    """A cluster of its own: initdb into the run's folder, pg_ctl on a free port; as root,
    run as the postgres user (PostgreSQL refuses root)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder / "pg"
        self.folder.mkdir()
        self.data = self.folder / "data"
        self.port = free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
            self._as = ["runuser", "-u", "postgres", "--"]
        self._run(_tool("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-N")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{HOST}:{self.port}/postgres"

    def _run(self, *command: str) -> None:
        subprocess.run(
            [*self._as, *command], check=True, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, timeout=120,
        )  # fmt: skip

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses={HOST} -c fsync=off"
        log = str(self.folder / "log")
        self._run(_tool("pg_ctl"), "-D", str(self.data), "-l", log, "-o", options, "-w", "start")

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run(_tool("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")


class Rabbit:
    """A RabbitMQ node of the run's own beside the machine's: its own node name, ports,
    config, database and logs, run as the rabbitmq user (whose Erlang cookie it shares)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder / "rabbit"
        self.folder.mkdir()
        (self.folder / "enabled_plugins").write_text("[].\n")
        self._ports()
        self.started = False
        self.proc: subprocess.Popen[bytes] | None = None

    def _ports(self) -> None:
        self.port, self.dist_port = free_port(), free_port()
        self.node = f"chaos{self.port}@localhost"
        (self.folder / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = {HOST}:{self.port}\nloopback_users = none\n"
        )
        if os.geteuid() == 0:
            subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(self.folder)], check=True)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{HOST}:{self.port}/"

    def _env(self) -> list[str]:
        base = str(self.folder)
        return [
            "env", "HOME=/var/lib/rabbitmq", f"RABBITMQ_NODENAME={self.node}",
            f"RABBITMQ_NODE_PORT={self.port}", f"RABBITMQ_DIST_PORT={self.dist_port}",
            f"RABBITMQ_CONFIG_FILE={base}/rabbitmq.conf", f"RABBITMQ_MNESIA_BASE={base}/mnesia",
            f"RABBITMQ_LOG_BASE={base}/log",
            f"RABBITMQ_ENABLED_PLUGINS_FILE={base}/enabled_plugins",
            f"RABBITMQ_NODE_IP_ADDRESS={HOST}",
        ]  # fmt: skip

    def _as(self) -> list[str]:
        return ["runuser", "-u", "rabbitmq", "--"] if os.geteuid() == 0 else []

    def start(self) -> None:
        """Start the node; the first start tries new ports twice more if the node exits
        before it listens (a port taken between picking and starting). Later starts (the
        restart fault) keep the ports the nodes were given."""
        attempts = 1 if self.started else 3
        for attempt in range(attempts):
            log = (self.folder / "server.out").open("ab")
            self.proc = subprocess.Popen(
                [*self._as(), *self._env(), "/usr/lib/rabbitmq/bin/rabbitmq-server"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
            try:
                wait_port(self.port, 90, self.proc)
            except RuntimeError:
                if attempt == attempts - 1 or self.proc.poll() is None:
                    raise
                self._ports()
                continue
            self.started = True
            return

    def stop(self) -> None:
        if self.proc is None:
            return
        ctl = [*self._as(), *self._env(), "/usr/lib/rabbitmq/bin/rabbitmqctl", "-n", self.node]
        with contextlib.suppress(subprocess.SubprocessError):
            subprocess.run([*ctl, "stop"], capture_output=True, timeout=60)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None


class Node:
    """One wsfanout node (``wsfanout serve``, hypercorn or uvicorn) on a fixed port, in a
    session of its own (kill -9 takes all of it)."""

    def __init__(self, index: int, server: str, folder: Path, env: dict[str, str]) -> None:
        self.index = index
        self.server = server
        self.folder = folder / f"node{index}"
        self.folder.mkdir()
        self.port = free_port()
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def name(self) -> str:
        return f"node{self.index}({self.server})"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 60) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, self.port))
        sock.listen(2048)
        self.starts += 1
        log = (self.folder / "server.log").open("ab")
        log.write(f"--- start {self.starts} at {time.monotonic():.3f}\n".encode())
        log.flush()
        command = [sys.executable, "-m", "wsfanout.cli", "serve", "--server", self.server]
        command += ["--bind", f"fd://{sock.fileno()}"]
        self.proc = subprocess.Popen(
            command, pass_fds=[sock.fileno()], env={**os.environ, **self.env},
            stdout=log, stderr=subprocess.STDOUT, cwd=self.folder, start_new_session=True,
        )  # fmt: skip
        sock.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: see {self.folder}/server.log")
            with contextlib.suppress(OSError):
                url = f"http://{HOST}:{self.port}/healthz"
                with urllib.request.urlopen(url, timeout=2) as answer:
                    if answer.status == 200:
                        return
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not become healthy in {timeout} s")

    def kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def terminate(self, timeout: float = 30) -> int | None:
        """SIGTERM, and wait for the node to stop; its exit status."""
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None
        self.proc = None
        return code
