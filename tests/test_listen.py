"""cli/listen: ``wsfanout listen`` run as a user runs it, in a subprocess, against a real
server: JSON lines on stdout, resuming across a server restart and across runs
(``--positions``), one line of error for a refused login."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

from tests.listener import SERVER_ENV, Publisher, token
from tests.proxy import Proxy, unused_port
from tests.server import WSFANOUT, Server


class Listen:
    """``wsfanout listen`` in a subprocess; its stdout read line by line."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def start(cls, *args: str) -> Listen:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WSFANOUT_")}
        process = await asyncio.create_subprocess_exec(
            str(WSFANOUT),
            "listen",
            *args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        return cls(process)

    async def until(self, kind: str, text: str | None = None) -> dict[str, Any]:
        """Read lines until an event of this type (and text) comes; that event."""
        assert self.process.stdout is not None
        while True:
            line = await asyncio.wait_for(self.process.stdout.readline(), 30)
            assert line, f"listen ended: {await self.stop()}"
            event: dict[str, Any] = json.loads(line)  # every line is JSON
            self.events.append(event)
            if event["type"] == kind and (text is None or event.get("text") == text):
                return event

    async def stop(self) -> tuple[int, str]:
        """SIGTERM; the exit status and stderr, once it has ended."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await self.ended()

    async def ended(self) -> tuple[int, str]:
        """The exit status and stderr, once it has ended by itself."""
        _, stderr = await asyncio.wait_for(self.process.communicate(), 30)
        assert self.process.returncode is not None
        return self.process.returncode, stderr.decode()

    def texts(self) -> list[str]:
        return [e["text"] for e in self.events if e["type"] == "message"]


async def test_listen_prints_events_and_resumes(
    tmp_path: Path, demo_db: Path, server_kind: str, redis_prefix: str
) -> None:
    """listen prints JSON lines; after a server restart it resumes (Redis keeps history);
    stopped with SIGTERM it saves its positions, and the next run, given them, prints what
    was published meanwhile, once."""
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    env = {
        **SERVER_ENV,
        "WSFANOUT_REDIS_URL": "redis://127.0.0.1:6379/0",
        "WSFANOUT_REDIS_PREFIX": redis_prefix,
    }
    positions = tmp_path / "positions.json"
    publisher = Publisher()
    with Server(tmp_path, env, server=server_kind).running() as node:
        # Through a proxy that lets listen back once the node is ready (test_client_faults
        # says why); the URL is the proxy's.
        proxy = Proxy(node.port)
        await proxy.start()
        first = await Listen.start(
            proxy.ws_url,
            "--username",
            "greg",
            "--password",
            "Greg-demo",
            "--positions",
            str(positions),
        )
        try:
            assert (await first.until("welcome"))["user"] == "greg"
            assert await publisher.publish(node, "one")
            await first.until("message", "one")
            proxy.point(unused_port())
            await asyncio.to_thread(node.stop)
            await asyncio.to_thread(node.start)
            proxy.point(node.port)
            assert await publisher.publish(node, "two")
            assert (await first.until("resumed"))["recovered"] is True
            if "two" not in first.texts():  # not replayed: published after the client was back
                await first.until("message", "two")
        finally:
            status, stderr = await first.stop()
            await proxy.close()
        assert status == 0, stderr
        assert "disconnected: going_away (the server is going away (1001))" in stderr
        assert first.texts() == ["one", "two"]
        saved = json.loads(positions.read_text())
        assert set(saved) == {"all", "group:boys", "user:greg"}

        assert await publisher.publish(node, "three")  # while nobody listens
        second = await Listen.start(
            node.ws_url,
            "--token",
            token("greg", ("boys",)),
            "--stream",
            "all",
            "--positions",
            str(positions),
        )
        try:
            await second.until("message", "three")
            assert (await second.until("resumed"))["recovered"] is True
        finally:
            status, stderr = await second.stop()
        assert status == 0, stderr
        assert second.texts() == ["three"]
        assert json.loads(positions.read_text())["all"]["offset"] == saved["all"]["offset"] + 1


async def test_listen_says_why_a_login_is_refused(
    tmp_path: Path, demo_db: Path, server_kind: str
) -> None:
    """A wrong password: exit 1, one line on stderr with the server's reason, no traceback."""
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    with Server(tmp_path, SERVER_ENV, server=server_kind).running() as node:
        listen = await Listen.start(node.ws_url, "--username", "greg", "--password", "nope")
        status, stderr = await listen.ended()
    assert status == 1
    lines = [line for line in stderr.splitlines() if line.startswith("wsfanout: error:")]
    assert lines == [
        f"wsfanout: error: {node.ws_url}: the login was refused (401): User or password wrong"
    ], stderr
    assert "Traceback" not in stderr
