"""The JavaScript client (``web/wsfanout.js``) as its users run it: its ``node --test`` suite
(``clients/js/test/``) against real hypercorn, one node with history in memory and one with
the Redis backplane; and its npm package, packed, installed in a project of its own,
type-checked with ``tsc`` and running the documentation's examples.

The Node tests stop and start the servers through a small HTTP endpoint of this module's
(``Control``), so that a test restarts a server while its clients reconnect.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests import docs
from tests.server import ROOT, Server, delete_redis_keys, redis_reachable

JS = ROOT / "clients" / "js"
EXAMPLES = ROOT / "docs" / "clients" / "examples"
JWT_SECRET = "js-client-test-secret-0123456789abcdef"
API_KEY = "js-client-test-key"
REDIS_URL = "redis://127.0.0.1:6379/0"
NODE = shutil.which("node")
NPM = shutil.which("npm")
# Node 20 has WebSocket behind a flag; web/wsfanout.js has no package.json of type module
# beside it, so Node is told to recognise its ES module syntax.
NODE_FLAGS = ("--experimental-websocket", "--experimental-detect-module", "--no-warnings")

pytestmark = pytest.mark.skipif(
    (NODE is None or NPM is None) and os.environ.get("CI") != "true",
    reason="Node.js 20+ and npm are not installed here (apt-get install nodejs npm)",
)


class Control(ThreadingHTTPServer):
    """``POST /stop/<name>`` and ``POST /start/<name>`` for the Node tests: each answers once
    the server has stopped, or is up again on the same port."""

    def __init__(self, servers: dict[str, Server]) -> None:
        self.servers = servers
        super().__init__(("127.0.0.1", 0), _ControlHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ControlHandler(BaseHTTPRequestHandler):
    server: Control

    def do_POST(self) -> None:
        _, action, name = self.path.split("/", 2)
        server = self.server.servers.get(name)
        if server is None or action not in ("stop", "start"):
            self.send_error(404)
            return
        if action == "stop":
            server.stop()
        else:
            server.start()
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: pytest shows the Node tests' own output."""


@contextlib.contextmanager
def controlled(servers: dict[str, Server]) -> Iterator[Control]:
    control = Control(servers)
    thread = threading.Thread(target=control.serve_forever, daemon=True)
    thread.start()
    try:
        yield control
    finally:
        control.shutdown()
        control.server_close()
        thread.join(5)


def server_env(**more: str) -> dict[str, str]:
    return {
        "WSFANOUT_JWT_SECRET": JWT_SECRET,
        "WSFANOUT_API_KEYS": API_KEY,
        "WSFANOUT_PRESENCE_EVENTS_MAX": "100",
        "WSFANOUT_LOG_LEVEL": "warning",
        **more,
    }


def run_node(args: list[str], env: dict[str, str], cwd: Path, timeout: float) -> str:
    """Run node; its output, or the test fails with it."""
    assert NODE is not None
    result = subprocess.run(
        [NODE, *NODE_FLAGS, *args],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


@pytest.fixture
def redis_env() -> Iterator[dict[str, str]]:
    """The Redis backplane's settings, with a prefix of the test's own; none without Redis
    (the Node tests that need it then skip, saying why)."""
    if not redis_reachable():
        if os.environ.get("CI") == "true":
            pytest.fail("Redis is not running on 127.0.0.1:6379, and CI=true requires it")
        yield {}
        return
    prefix = f"wsfanout-js-{os.getpid()}-{id(object())}:"
    yield {"WSFANOUT_REDIS_URL": REDIS_URL, "WSFANOUT_REDIS_PREFIX": prefix}
    delete_redis_keys(prefix)


@pytest.mark.slow(19)
def test_the_node_suite_against_real_servers(
    tmp_path: Path, demo_db: Path, redis_env: dict[str, str]
) -> None:
    """clients/js/test/*.test.js pass under Node's own test runner and WebSocket: states,
    requests, presence, history, resume across resets and restarts, 1008, backoff."""
    servers = {"single": Server(tmp_path / "single", server_env())}
    if redis_env:
        servers["redis"] = Server(tmp_path / "redis", server_env(**redis_env))
    with contextlib.ExitStack() as stack:
        for server in servers.values():
            server.data_dir.mkdir()
            shutil.copy(demo_db, server.data_dir / "wsfanout.sqlite3")
            stack.enter_context(server.running())
        control = stack.enter_context(controlled(servers))
        env = {
            "WSFANOUT_URL_SINGLE": servers["single"].ws_url,
            "WSFANOUT_JWT_SECRET": JWT_SECRET,
            "WSFANOUT_API_KEY": API_KEY,
            "WSFANOUT_CONTROL": control.url,
        }
        if "redis" in servers:
            env["WSFANOUT_URL_REDIS"] = servers["redis"].ws_url
        tests = sorted(str(path) for path in (JS / "test").glob("*.test.js"))
        output = run_node(["--test", "--test-reporter=spec", *tests], env, JS, timeout=150)
    print(output)
    for server in servers.values():
        log = server.log_path.read_text()
        assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def typescript() -> Path:
    """tsc from clients/js's devDependencies (``npm ci`` once, from its package-lock)."""
    tsc = JS / "node_modules" / ".bin" / "tsc"
    if not tsc.exists():
        assert NPM is not None
        subprocess.run(
            [NPM, "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
            cwd=JS,
            check=True,
            capture_output=True,
            timeout=120,
        )
    return tsc


def test_the_npm_package_types_check_and_runs_the_documented_example(
    tmp_path: Path, demo_db: Path, typescript: Path
) -> None:
    """``npm pack`` gives a package holding web/wsfanout.js byte for byte and its types; a
    project that installs the tarball type-checks the TypeScript example (``tsc --noEmit``,
    strict) and runs the documentation's Node example against a real server."""
    assert NPM is not None
    packed = subprocess.run(
        [NPM, "pack", "--json", "--pack-destination", str(tmp_path)],
        cwd=JS,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    test = "test_the_npm_package_types_check_and_runs_the_documented_example"
    quickstart, typed = docs.blocks("docs/clients/javascript.md", test)
    assert [quickstart, typed] == [
        (EXAMPLES / n).read_text() for n in ("quickstart.mjs", "typed.ts")
    ]
    assert docs.block("docs/clients/index.md", test) == quickstart
    tarball = tmp_path / json.loads(packed.stdout)[0]["filename"]
    with tarfile.open(tarball) as archive:
        names = set(archive.getnames())
        assert names == {
            "package/package.json",
            "package/README.md",
            "package/wsfanout.js",
            "package/wsfanout.d.ts",
        }
        module = archive.extractfile("package/wsfanout.js")
        assert module is not None
        assert module.read() == (ROOT / "web" / "wsfanout.js").read_bytes()

    project = tmp_path / "project"
    project.mkdir()
    (project / "package.json").write_text(
        '{"name": "uses-wsfanout", "private": true, "type": "module"}'
    )
    subprocess.run(
        [NPM, "install", "--no-audit", "--no-fund", "--offline", str(tarball)],
        cwd=project,
        check=True,
        capture_output=True,
        timeout=60,
    )
    for example in EXAMPLES.glob("*"):
        shutil.copy(example, project)
    tsconfig = {
        "compilerOptions": {
            "strict": True,
            "noEmit": True,
            "target": "es2022",
            "module": "nodenext",
            "moduleResolution": "nodenext",
            "lib": ["es2022", "dom"],
            "types": [],
        },
        "files": ["typed.ts"],
    }
    (project / "tsconfig.json").write_text(json.dumps(tsconfig))
    checked = subprocess.run(
        [str(typescript), "-p", str(project)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr

    data = tmp_path / "server"
    data.mkdir()
    shutil.copy(demo_db, data / "wsfanout.sqlite3")
    with Server(data, server_env()).running() as server:
        env = {"WSFANOUT_URL": server.ws_url, "WSFANOUT_TOKEN": token("greg", ["boys"])}
        output = run_node(["quickstart.mjs"], env, project, timeout=30)
    assert [line.strip() for line in output.splitlines()] == [
        "state: connecting",
        "state: connected",
        "greg: hello from Node",
        "acknowledged: w1",
        "state: closed closed",
    ], output


def token(user: str, groups: list[str]) -> str:
    """A connection token as an operator's backend mints one."""
    import time

    import jwt

    claims = {"sub": user, "groups": groups, "exp": int(time.time()) + 300}
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


HARNESS = """\
import { Client } from "%(module)s";
const saved = new Map();  // what a page has, and Node has not
globalThis.sessionStorage = {
  getItem: (k) => saved.get(k) ?? null, setItem: (k, v) => saved.set(k, String(v)),
};
const handlers = {};
globalThis.addEventListener = (name, listener) => { handlers[name] = listener; };
globalThis.location = { href: process.env.PAGE, assign: (to) => console.log("assign", to) };
%(positions)s
%(state)s
await new Promise((resolve) => { chat.on("welcome", resolve); chat.connect(); });
%(requests)s
console.log("answers", ack.id, count, messages.length);
handlers.pagehide();
console.log("saved", Object.keys(JSON.parse(sessionStorage.getItem("positions"))).sort().join(" "));
chat.close();
const opened = [];
globalThis.WebSocket = class extends WebSocket {
  constructor(...args) { super(...args); opened.push(this); }
};
%(resume)s
await new Promise((resolve) => opened[0].addEventListener("message", (m) => {
  for (const event of [JSON.parse(m.data)].flat()) {
    if (event.type === "resumed") { console.log("resumed", JSON.stringify(event)); resolve(); }
  }
}));
opened[0].close();
"""


def test_the_documented_fragments_run(tmp_path: Path, demo_db: Path) -> None:
    """The JavaScript page's fragments (the state listener, saved positions, the requests)
    run in Node as one page's script, with what a page has (location with a token,
    sessionStorage, pagehide) stubbed; and the protocol page's hand-made resume is answered
    with a resume that says what it could not recover."""
    page = "docs/clients/javascript.md"
    state, positions, requests = docs.blocks(page, "test_the_documented_fragments_run")
    resume = docs.block("docs/protocol.md", "test_the_documented_fragments_run")
    data = tmp_path / "server"
    data.mkdir()
    shutil.copy(demo_db, data / "wsfanout.sqlite3")
    with Server(data, server_env()).running() as server:
        credential = token("nina", ["girls", "boys"])
        resume = docs.substituted(
            resume,
            {"wss://chat.example.com/?resume=": f"{server.ws_url}?token={credential}&resume="},
        )
        script = tmp_path / "fragments.mjs"
        script.write_text(
            HARNESS
            % {
                "module": (ROOT / "web" / "wsfanout.js").as_uri(),
                "positions": positions,
                "state": state,
                "requests": requests,
                "resume": resume,
            }
        )
        env = {"PAGE": f"{server.http_url}/?token={credential}"}
        output = run_node([str(script)], env, tmp_path, timeout=30)
    lines = output.splitlines()
    assert "answers w1 1 1" in lines, output
    assert "saved all group:boys group:girls user:nina" in lines, output
    resumed = json.loads(
        next(line for line in lines if line.startswith("resumed ")).split(" ", 1)[1]
    )
    assert (resumed["recovered"], sorted(resumed["lost"])) == (False, ["all", "group:boys"])
