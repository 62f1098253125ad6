"""The documentation's code blocks, run as a reader would paste them (``tests/docs.py``): the
installs in venvs of their own, the commands under bash against real servers, PostgreSQL,
Redis and RabbitMQ with names of the test's own, the Python blocks as files or modules."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml  # type: ignore[import-untyped]

from tests import asgi, docs
from tests.server import Client, Server, http

ROOT = docs.ROOT
KEY = "key1"  # the API key the blocks use
JWT_SECRET = "docs-test-jwt-secret-0123456789abcdef"
PASSWORD = "docs-test-password"  # the module server's users' own, whatever the demo's are


def test_every_pasted_block_names_a_test_that_reads_it() -> None:
    """Every fenced block of README.md and docs/ a reader would paste follows a
    ``<!-- run: tests/FILE.py::TEST -->`` marker, and that test exists and reads the block
    through ``tests/docs.py`` (it calls ``docs.block``/``docs.blocks``, naming the page). Only
    blocks that are not commands may go unmarked: ``json`` (protocol frames), ``text`` and
    blocks with no language (program output, diagrams)."""
    problems = []
    for page in docs.pages():
        for found in docs.blocks_of(page):
            where = f"{page}:{found.line} ({found.language or 'no language'})"
            if found.test is None:
                if found.language not in docs.NOT_PASTED:
                    problems.append(f"{where}: no <!-- run: ... --> marker")
                continue
            path, name = found.test
            if not (ROOT / path).is_file():
                problems.append(f"{where}: {path} does not exist")
                continue
            if not reads(ROOT / path, name, page):
                problems.append(f"{where}: {path} has no {name} that calls docs.block({page!r})")
    assert problems == [], "\n".join(problems)


def reads(path: Path, name: str, page: str) -> bool:
    """Whether ``path`` defines ``name`` (a test or fixture) calling ``docs.block`` or
    ``docs.blocks``, with ``page`` named in it."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            calls = [
                call
                for call in ast.walk(node)
                if isinstance(call, ast.Call)
                and isinstance(call.func, ast.Attribute)
                and call.func.attr in ("block", "blocks")
                and isinstance(call.func.value, ast.Name)
                and call.func.value.id == "docs"
            ]
            pages = {c.value for c in ast.walk(node) if isinstance(c, ast.Constant)}
            return bool(calls) and page in pages
    return False


def test_the_check_tells_a_test_that_reads_its_block_from_one_that_does_not() -> None:
    """A marker naming a test that exists but reads no block of the page fails the check."""
    here = Path(__file__)
    assert reads(here, "test_the_readmes_publish_block", "README.md")
    assert not reads(here, "test_the_readmes_publish_block", "docs/publishing.md")
    assert not reads(here, "need", "README.md")


# -- installs, in venvs of their own --------------------------------------------------------


def need(program: str) -> None:
    """Skip (fail under CI=true) unless ``program`` is on PATH."""
    if shutil.which(program) is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{program} is not installed, and CI=true requires it")
        pytest.skip(f"{program} is not installed")


def published_clone(tmp_path: Path) -> Path:
    """A bare clone of this checkout's HEAD, standing for the reader's git URL."""
    bare = tmp_path / "wsfanout.git"
    subprocess.run(["git", "clone", "--quiet", "--bare", str(ROOT), str(bare)], check=True)
    return bare


def fresh_venv(path: Path) -> Path:
    """A new venv with a current pip (the one Python 3.11 bundles reads no git+file URL);
    its bin directory."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    pip = [str(path / "bin" / "python"), "-m", "pip", "install", "-q", "--upgrade", "pip"]
    subprocess.run(pip, check=True, capture_output=True)
    return path / "bin"


PIP_INSTALL = re.compile(r"(\S*/)?pip install ")


def run_installs_once(
    block: str, cwd: Path, venv: Path, done: set[str], timeout: float = 120
) -> docs.Ran:
    """``docs.run_shell`` of ``block`` in ``cwd`` with ``venv`` first on PATH, leaving out
    each ``pip install`` command ``done`` holds (and adding the ones it runs): pages that
    document the same install (the README's and getting started's) share one run, as the
    same command again would put the same wheel in the same venv. Every other command runs."""
    commands = [c for c in docs.commands(block) if not (PIP_INSTALL.match(c) and c in done)]
    done.update(c for c in commands if PIP_INSTALL.match(c))
    script = "".join(command + "\n" for command in commands)
    return docs.run_shell(script, cwd, path=(venv,), timeout=timeout)


# 90 s alone on a quiet machine; started beside the bench and the Justfile's install (the
# slow tests start together), on a loaded machine it took 182 s: past the suite's 180 s.
@pytest.mark.slow(90)
@pytest.mark.timeout(420)
def test_install_from_a_clone(tmp_path: Path) -> None:
    """Getting started's clone and ``just serve`` (a .venv of its own, the demo users, a
    server answering /healthz), then every ``pip install`` from a clone in that venv (the
    README's, getting started's, the Python client's, the servers page's, whose
    ``wsfanout serve`` and ``--server uvicorn`` start too), and the README's ``just serve``
    and ``just test`` (``just --dry-run test``: the suite does not run itself); the venv
    ``just serve`` made holds no test tool. Each distinct ``pip install`` runs once (the
    pages repeat some: ``run_installs_once``)."""
    need("just")
    url = f"file://{published_clone(tmp_path)}"
    cloned = docs.blocks("docs/getting-started.md", "test_install_from_a_clone")
    first, port = cloned[0], docs.free_port()
    first = docs.substituted(
        first,
        {
            "https://git.example.com/you/wsfanout.git": url,
            "just serve": f"WSFANOUT_BIND=127.0.0.1:{port} just serve",
        },
    )
    ran = docs.run_shell(first, tmp_path, path=(), timeout=300)
    assert json.loads(ran.healthz[0])["status"] == "ok"
    clone = tmp_path / "wsfanout"
    venv, installed = clone / ".venv" / "bin", set[str]()
    run_installs_once(cloned[1], clone, venv, installed, timeout=300)
    for extra in docs.blocks("docs/clients/python.md", "test_install_from_a_clone"):
        run_installs_once(extra, clone, venv, installed)
    check = "import uvicorn, websockets, wsfanout.client"
    subprocess.run([str(clone / ".venv" / "bin" / "python"), "-c", check], check=True)
    for tool in ("pytest", "mypy", "ruff", "playwright", "mkdocs"):  # serving needs none
        assert not (clone / ".venv" / "bin" / tool).exists(), tool

    servers = docs.block("docs/operating/servers.md", "test_install_from_a_clone")
    a, b = docs.free_port(), docs.free_port()
    uvicorn = "wsfanout serve --server uvicorn"
    servers = docs.substituted(
        servers,
        {
            "wsfanout serve  ": f"wsfanout serve --bind 127.0.0.1:{a}  ",
            uvicorn: f"{uvicorn} --bind 127.0.0.1:{b}",
        },
    )
    ran = run_installs_once(servers, clone, venv, installed)
    assert [json.loads(body)["status"] for body in ran.healthz] == ["ok", "ok"]

    readme, installs = docs.blocks("README.md", "test_install_from_a_clone")
    run_installs_once(installs, clone, venv, installed)
    port = docs.free_port()
    readme = docs.substituted(
        readme,
        {
            "just serve": f"WSFANOUT_BIND=127.0.0.1:{port} just serve",
            "just test": "just --dry-run test",
        },
    )
    ran = run_installs_once(readme, clone, venv, installed)
    assert json.loads(ran.healthz[0])["status"] == "ok"
    assert "pytest -n" in ran.errors  # what `just test` would run, after the lint


@pytest.mark.slow(40)
def test_install_from_a_git_url(tmp_path: Path) -> None:
    """The README's and getting started's ``pip install 'wsfanout[uvicorn] @ git+...'``, from
    a bare clone of this checkout (``git+file://``), into a new venv: the command and
    uvicorn are there. The two pages' command is the same, run once."""
    url = f"git+file://{published_clone(tmp_path)}"
    venv, installed = fresh_venv(tmp_path / "venv"), set[str]()
    for page in ("README.md", "docs/getting-started.md"):
        install = docs.block(page, "test_install_from_a_git_url")
        install = docs.substituted(install, {"git+https://git.example.com/you/wsfanout.git": url})
        run_installs_once(install, tmp_path, venv, installed)
    check = "import uvicorn, wsfanout; print(wsfanout.create_app)"
    subprocess.run([str(venv / "python"), "-c", check], check=True)
    assert (venv / "wsfanout").is_file()


# -- the first commands, in an empty directory ------------------------------------------------


def test_the_first_commands(tmp_path: Path) -> None:
    """The README's ``wsfanout demo`` and ``wsfanout serve --server uvicorn``, in an empty
    directory: the demo users are created and the server answers /healthz."""
    uvicorn = "wsfanout serve --server uvicorn"
    block = docs.block("README.md", "test_the_first_commands")
    block = docs.substituted(block, {uvicorn: f"{uvicorn} --bind 127.0.0.1:{docs.free_port()}"})
    ran = docs.run_shell(block, tmp_path)
    assert "demo users created: greg" in ran.output
    assert json.loads(ran.healthz[0])["status"] == "ok"
    assert (tmp_path / "data" / "wsfanout.sqlite3").is_file()


def test_the_servers_start(tmp_path: Path) -> None:
    """Getting started's four commands in an empty directory: the demo, then plain hypercorn,
    ``wsfanout serve`` and ``wsfanout serve --server uvicorn``, each up on /healthz."""
    a, b, c = docs.free_port(), docs.free_port(), docs.free_port()
    uvicorn = "wsfanout serve --server uvicorn"
    block = docs.block("docs/getting-started.md", "test_the_servers_start")
    block = docs.substituted(
        block,
        {
            "hypercorn wsfanout:app": f"hypercorn --bind 127.0.0.1:{a} wsfanout:app",
            "--bind 0.0.0.0:8000": f"--bind 127.0.0.1:{b}",
            uvicorn: f"{uvicorn} --bind 127.0.0.1:{c}",
        },
    )
    ran = docs.run_shell(block, tmp_path)
    assert [json.loads(body)["status"] for body in ran.healthz] == ["ok", "ok", "ok"]


def test_managing_users(tmp_path: Path) -> None:
    """Getting started's user commands on a terminal (``user add alice`` asks for her
    password, typed twice): alice, in chess, and bob then log in with their passwords."""
    typed = "alice-password"
    block = docs.block("docs/getting-started.md", "test_managing_users")
    ran = docs.run_shell(
        block, tmp_path, answers=(("password for alice:", typed), ("again:", typed))
    )
    assert "schema: version" in ran.output
    bob = re.search(r"user add bob --password '([^']+)'", block)
    assert bob is not None
    with Server(tmp_path / "data").running() as server:
        for user, password in (("alice", typed), ("bob", bob.group(1))):
            status, _ = http(
                "POST", server.http_url + "/login", {"username": user, "password": password}
            )
            assert status == 200, user
        alice = wsfanout_json(tmp_path, "user", "list")
    assert "alice" in alice


def wsfanout_json(cwd: Path, *args: str) -> str:
    """A ``wsfanout`` command's output, run in ``cwd`` (its ./data)."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("WSFANOUT_")}
    command = [str(docs.VENV_BIN / "wsfanout"), *args]
    done = subprocess.run(
        command, cwd=cwd, env=inherited, capture_output=True, text=True, check=True
    )
    return done.stdout


# -- against a server of the module's own -----------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, demo_db: Path) -> Iterator[Server]:
    """The demo users (with a password of this module's, not the demo's), API key ``key1``
    and connection tokens, under hypercorn."""
    data = tmp_path_factory.mktemp("docs-server")
    shutil.copy(demo_db, data / "wsfanout.sqlite3")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSFANOUT_")}
    for user in ("greg", "amanda", "mike"):
        command = [str(docs.VENV_BIN / "wsfanout"), "user", "passwd", user, "--password", PASSWORD]
        subprocess.run(
            command, env={**env, "WSFANOUT_DATA_DIR": str(data)}, check=True, capture_output=True
        )
    settings = {"WSFANOUT_API_KEYS": KEY, "WSFANOUT_JWT_SECRET": JWT_SECRET}
    with Server(data, settings).running() as running:
        yield running
    log = running.log_path.read_text()
    assert "Traceback" not in log, log


def on(server: Server, text: str) -> str:
    """``text`` with the reader's 127.0.0.1:8000 replaced by the module's server."""
    return docs.substituted(text, {"http://127.0.0.1:8000": server.http_url})


async def texts(client: Client, count: int) -> list[str]:
    """The next ``count`` messages' texts."""
    return [(await client.next_of("message"))["text"] for _ in range(count)]


async def test_the_readmes_publish_block(server: Server, tmp_path: Path) -> None:
    """The README's ``curl`` to ``/api/publish`` is accepted (its answer as the comment
    says) and reaches a girl."""
    amanda = await Client.open(server.ws_url, server.login("amanda", PASSWORD))
    try:
        await amanda.next_of("welcome")
        block = on(server, docs.block("README.md", "test_the_readmes_publish_block"))
        ran = await asyncio.to_thread(docs.run_shell, block, tmp_path)
        assert json.loads(ran.output) == {"accepted": 1}
        assert await texts(amanda, 1) == ["sale at 5"]
    finally:
        await amanda.close()


async def test_publishing_over_http(server: Server, tmp_path: Path) -> None:
    """The publishing page's ``curl`` batch and ``wsfanout publish``: a girl gets the sale
    twice, Mike his direct message."""
    amanda = await Client.open(server.ws_url, server.login("amanda", PASSWORD))
    mike = await Client.open(server.ws_url, server.login("mike", PASSWORD))
    try:
        await amanda.next_of("welcome")
        await mike.next_of("welcome")
        block = on(server, docs.block("docs/publishing.md", "test_publishing_over_http"))
        ran = await asyncio.to_thread(docs.run_shell, block, tmp_path)
        assert ran.output.startswith('{"accepted":2}'), ran.output
        assert await texts(amanda, 2) == ["sale at 5", "sale at 5"]
        assert await texts(mike, 1) == ["your order shipped"]
    finally:
        await amanda.close()
        await mike.close()


async def test_the_admin_api_commands(server: Server, tmp_path: Path) -> None:
    """The admin page's two ``curl`` commands: greg's open socket is told he joined girls,
    then is closed (1008) as his sessions are revoked."""
    greg = await Client.open(server.ws_url, server.login("greg", PASSWORD))
    try:
        await greg.next_of("welcome")
        block = on(server, docs.block("docs/operating/admin.md", "test_the_admin_api_commands"))
        await asyncio.to_thread(docs.run_shell, block, tmp_path)
        assert (await greg.next_of("joined"))["group"] == "girls"
        await asyncio.wait_for(greg.reader, 10)
        assert greg.conn.close_code == 1008
    finally:
        await greg.close()
        await asyncio.to_thread(
            docs.run_shell,
            on(
                server,
                "curl -fsS -X DELETE -H 'Authorization: Bearer key1' http://127.0.0.1:8000/api/users/greg/groups/girls\n",
            ),
            tmp_path,
        )


async def test_listening_on_the_command_line(server: Server, tmp_path: Path) -> None:
    """The Python client page's two ``wsfanout listen`` commands, side by side: greg by
    password, and a token user listening to the boys only; each prints a message sent to
    the boys, and on SIGINT the second writes its positions."""
    first, second = docs.commands(
        docs.block("docs/clients/python.md", "test_listening_on_the_command_line")
    )
    first = re.sub(
        r"--password \S+",
        f"--password {PASSWORD}",
        docs.substituted(first, {"ws://127.0.0.1:8000/": server.ws_url}),
    )
    second = docs.substituted(second, {"wss://chat.example.com/": server.ws_url})
    token = jwt.encode(
        {"sub": "tok-boy", "groups": ["boys"], "exp": int(time.time()) + 300},
        JWT_SECRET,
        algorithm="HS256",
    )
    env = {**os.environ, "PATH": f"{docs.VENV_BIN}{os.pathsep}{os.environ['PATH']}", "TOKEN": token}
    listeners = [
        await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            f"exec {line}",
            cwd=tmp_path,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for line in (first, second)
    ]
    try:
        for listener in listeners:
            assert listener.stdout is not None
            while (
                '"welcome"' not in (await asyncio.wait_for(listener.stdout.readline(), 20)).decode()
            ):
                pass
        item = {"type": "group", "group": "boys", "text": "listen to this"}
        status, _ = await asyncio.to_thread(
            http, "POST", server.http_url + "/api/publish", item, {"authorization": f"Bearer {KEY}"}
        )
        assert status == 202
        for listener in listeners:
            assert listener.stdout is not None
            while (
                "listen to this"
                not in (await asyncio.wait_for(listener.stdout.readline(), 20)).decode()
            ):
                pass
    finally:
        for listener in listeners:
            if listener.returncode is None:
                listener.send_signal(signal.SIGINT)
        codes = [await asyncio.wait_for(listener.wait(), 20) for listener in listeners]
    assert codes == [0, 0]
    assert "group:boys" in json.loads((tmp_path / "boys.json").read_text())


async def test_the_readmes_embedding_sketch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's ``who`` and ``create_app``: a request whose session (the host's, put in
    the scope by its middleware) names a user connects as them, in staff, and gets what the
    host's code publishes to staff; without a session, the handshake is refused."""
    monkeypatch.setenv("WSFANOUT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("WSFANOUT_SECRET_KEY", "docs-test-secret")
    namespace: dict[str, Any] = {"__name__": "host"}
    block = docs.block("README.md", "test_the_readmes_embedding_sketch")
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the docs' own code
    chat = namespace["chat"]

    async def host(scope: Any, receive: Any, send: Any) -> None:  # the host's session middleware
        await chat({**scope, "session": {"user": "alice"}}, receive, send)

    await chat.startup()
    try:
        async with asgi.WebSocket(host) as ws:
            welcome = await ws.receive()
            assert (welcome["user"], welcome["groups"]) == ("alice", ["staff"])
            assert await chat.publish({"type": "group", "group": "staff", "text": "hi"}) == 1
            assert (await ws.receive())["text"] == "hi"
        with pytest.raises(asgi.Refused):
            async with asgi.WebSocket(chat):
                pass
    finally:
        await chat.shutdown()


# -- PostgreSQL and Redis, with names of the test's own ---------------------------------------


def test_many_machines_commands(tmp_path: Path, pg_url: str, redis_prefix: str) -> None:
    """The README's database, key, demo users and ``wsfanout serve --workers 2`` on
    PostgreSQL and Redis (a database of the test's own, dropped after), and the many
    machines page's ``hypercorn --workers 4`` on PostgreSQL and Redis, then on Redis and
    the local SQLite file: each up on /healthz with Redis ok (the test's own database
    schema and key prefix)."""
    env = {"WSFANOUT_REDIS_PREFIX": redis_prefix}
    database = f"wsfanout_docs_{uuid.uuid4().hex[:10]}"  # the README creates it: its own name
    readme = docs.block("README.md", "test_many_machines_commands")
    readme = docs.substituted(
        readme,
        {
            "-U postgres wsfanout": f"-U postgres {database}",
            "127.0.0.1:5432/wsfanout": f"127.0.0.1:5432/{database}",
            "--bind 0.0.0.0:8000": f"--bind 127.0.0.1:{docs.free_port()}",
        },
    )
    page, local = docs.blocks("docs/operating/many-machines.md", "test_many_machines_commands")
    page = docs.substituted(
        page,
        {
            "postgresql://wsfanout:secret@db.internal:5432/wsfanout": pg_url,
            "redis://redis.internal:6379/0": "redis://127.0.0.1:6379/0",
            "WSFANOUT_SECRET_KEY=…": "WSFANOUT_SECRET_KEY=docs-test-secret-key",
            "--bind 0.0.0.0:8000": f"--bind 127.0.0.1:{docs.free_port()}",
        },
    )
    local = docs.substituted(local, {"--bind 0.0.0.0:8000": f"--bind 127.0.0.1:{docs.free_port()}"})
    try:
        healthz = docs.run_shell(readme, tmp_path, env=env).healthz
    finally:
        subprocess.run(
            ["dropdb", "-h", "127.0.0.1", "-U", "postgres", "--if-exists", "--force", database],
            check=True,
            timeout=30,
        )
    for block in (page, local):
        healthz += docs.run_shell(block, tmp_path, env=env).healthz
    assert [json.loads(body)["checks"]["redis"] for body in healthz] == ["ok"] * 3
    assert (tmp_path / "data" / "wsfanout.sqlite3").is_file()  # the last one's, and only it


# -- what cannot run here: checked as far as it goes ------------------------------------------


def test_the_benchmark_commands() -> None:
    """The benchmarks page's commands are not run (a full run takes over 9 minutes): each
    ``just bench`` line's arguments are read by bench/run.py's own parser, every ``--only``
    names a scenario, and ``just locust`` takes its arguments (``just --dry-run``)."""
    need("just")
    sys.path.insert(0, str(ROOT))
    from bench import run

    names = {scenario.name for scenario in run.scenarios(False)}
    for command in docs.commands(docs.block("docs/benchmarks.md", "test_the_benchmark_commands")):
        for part in command.split("&&"):
            words = shlex.split(part)
            if words[:2] == ["just", "bench"]:
                args = run.parser().parse_args(words[2:])
                assert set(args.only or ()) <= names, part
            elif words[:2] == ["just", "locust"]:
                dry = ["just", "--dry-run", *words[1:]]
                subprocess.run(dry, cwd=ROOT, check=True, capture_output=True)


def test_the_container_commands() -> None:
    """The container page's commands need podman or docker with a registry for the base
    image, which this project's machines do not have: skipped there, run where they do."""
    block = docs.block("docs/operating/container.md", "test_the_container_commands")
    assert "podman build" in block
    if (
        shutil.which("podman") is None
        or subprocess.run(["podman", "info"], capture_output=True, check=False).returncode
    ):
        pytest.skip("podman does not run here (no container runtime): the block was not run")
    pytest.skip("building the image needs a registry this machine cannot reach")


def test_the_compose_example(tmp_path: Path) -> None:
    """The Compose example: every WSFANOUT_* variable it sets is a setting, its build file
    exists, each variable it requires is what the ``.env`` line writes (that line is run);
    ``docker compose`` itself only where Docker runs (not on this project's machines)."""
    compose_text, commands = docs.blocks(
        "docs/operating/many-machines.md", "test_the_compose_example"
    )
    compose = yaml.safe_load(compose_text)
    required = set(re.findall(r"\$\{(\w+):\?", compose_text))
    written = docs.commands(commands)[0]
    docs.run_shell(written, tmp_path)
    dotenv = dict(line.split("=", 1) for line in (tmp_path / ".env").read_text().splitlines())
    assert set(dotenv) == required and all(dotenv.values())
    read = re.findall(r'reader\.\w+\(\s*"(\w+)"', (ROOT / "src/wsfanout/config.py").read_text())
    settings = {f"WSFANOUT_{name}" for name in read}
    for name in ("node1", "node2"):
        service = compose["services"][name]
        assert (ROOT / service["build"]["dockerfile"]).is_file()
        assert set(service["environment"]) <= settings
    if subprocess.run(["docker", "info"], capture_output=True, check=False).returncode:
        pytest.skip("Docker does not run here: the compose commands were checked, not run")
