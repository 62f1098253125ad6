"""cli: the wsfanout command, run as a user would, in a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus

from tests.conftest import DEMO_USERS
from tests.listener import Listener
from tests.server import Client, Server, demo_server, wsfanout
from wsfanout import passwords
from wsfanout.cli import demo_password
from wsfanout.client import Client as ChatClient
from wsfanout.config import Settings
from wsfanout.database import VERSION
from wsfanout.store import Store

WSFANOUT = Path(sys.executable).parent / "wsfanout"  # the installed console script
KEY = "cli-test-key"
NOTE = "note: changed in the database only"
# Where the admin verbs find a node and a key: the tests say it themselves.
API_VARIABLES = ("WSFANOUT_URL", "WSFANOUT_API_KEY", "WSFANOUT_API_KEYS")
ADD_BOB = (
    "user",
    "add",
    "bob",
    "--password",
    "bob-password",
    "--first-name",
    "Bob",
    "--group",
    "chess",
)


run = wsfanout


def test_version_prints_the_installed_version(tmp_path: Path) -> None:
    """`wsfanout --version` prints the version pip installed, and exits 0."""
    result = run(tmp_path, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"wsfanout {metadata.version('wsfanout')}\n"


def test_the_demo_passwords_are_long_enough(tmp_path: Path) -> None:
    """`wsfanout demo` says what the passwords are, and each is as long as a password must
    be (WSFANOUT_MIN_PASSWORD_LENGTH's default): the page logs in with the one it says."""
    demo = run(tmp_path, "demo")
    assert "(each password is the first name and -demo: Greg-demo)" in demo.stdout
    for username in DEMO_USERS:
        problem = passwords.length_problem(demo_password(username), Settings().min_password_length)
        assert problem is None
    with Server(tmp_path).running() as server:
        assert server.login("greg", "Greg-demo").startswith("wsfanout_session=")


def test_db_init_creates_the_database(tmp_path: Path) -> None:
    """db init creates the data dir, the file and the schema."""
    result = run(tmp_path / "new", "db", "init")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "new" / "wsfanout.sqlite3").exists()
    assert "database ready" in result.stdout


def test_users_and_groups(tmp_path: Path) -> None:
    """group add and user add work, and their mistakes are one-line errors with exit 1."""
    assert run(tmp_path, "group", "add", "chess").returncode == 0
    ok = run(tmp_path, *ADD_BOB)
    assert ok.returncode == 0, ok.stderr
    assert "user 'bob' created in chess" in ok.stdout
    cases = [
        (("group", "add", "chess"), "a group named 'chess' already exists"),
        (("user", "add", "BOB", "--password", "bob-password"), "a user named 'BOB' already exists"),
        (
            ("user", "add", "eve", "--password", "bob-password", "--group", "nope"),
            "no group named 'nope'",
        ),
        (("user", "add", "bad name", "--password", "bob-password"), "invalid username 'bad name'"),
        (("user", "add", "eve"), "give --password"),
        (("user", "add", "eve", "--password", ""), "must not be empty"),
        (
            ("user", "add", "eve", "--password", "1234567"),
            "a password has at least 8 characters (WSFANOUT_MIN_PASSWORD_LENGTH); this one has 7",
        ),
    ]
    for args, message in cases:
        result = run(tmp_path, *args)
        assert result.returncode == 1, args
        assert result.stderr.startswith("wsfanout: error: ") and message in result.stderr, (
            result.stderr
        )
        assert "Traceback" not in result.stderr
        assert result.stderr.count("\n") == 1


def test_demo_is_idempotent(tmp_path: Path) -> None:
    """demo creates the six users once; a rerun changes nothing and says so."""
    first = run(tmp_path, "demo")
    assert first.returncode == 0, first.stderr
    assert "greg, chuck, mike, amanda, lisa, anny" in first.stdout
    again = run(tmp_path, "demo")
    assert again.returncode == 0 and "already exist" in again.stdout


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WSFANOUT_OUTBOX_BYTES": "huge"}, "WSFANOUT_OUTBOX_BYTES='huge'"),
        ({"WSFANOUT_DATABASE": "/proc/nope/x.sqlite3"}, "cannot open database"),
    ],
)
def test_bad_settings_and_paths(tmp_path: Path, env: dict[str, str], message: str) -> None:
    """A bad variable or an unusable database path is a clear one-line error."""
    result = run(tmp_path, "db", "init", **env)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    """An unknown command prints usage and exits 2."""
    result = run(tmp_path, "frobnicate")
    assert result.returncode == 2 and "usage:" in result.stderr


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something else is already listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["serve", "--bind", "nonsense"], {}, "--bind 'nonsense': expected HOST:PORT"),
        (["serve", "--bind", "no-such-host.invalid:8000"], {}, "cannot listen on"),
        (["serve", "--bind", "127.0.0.1:TAKEN"], {}, "cannot listen on 127.0.0.1:"),
        (["serve", "--ping-interval", "-5"], {}, "--ping-interval must be 0"),
        (["serve"], {"WSFANOUT_REDIS_URL": "http://x"}, "WSFANOUT_REDIS_URL='http://x'"),
        (["serve"], {"WSFANOUT_DATA_DIR": "FILE"}, "cannot"),
        (["publish", "hi", "--key", "k", "--url", "notaurl"], {}, "--url 'notaurl'"),
    ],
)
def test_serve_and_publish_refuse_clearly(
    tmp_path: Path, taken_port: int, args: list[str], env: dict[str, str], message: str
) -> None:
    """A bad address, a taken port, a bad setting or path: one line, exit 1, nothing served."""
    plain_file = tmp_path / "a-file"
    plain_file.write_text("not a directory")
    args = [a.replace("TAKEN", str(taken_port)) for a in args]
    env = {k: str(plain_file) if v == "FILE" else v for k, v in env.items()}
    result = run(tmp_path / "data", *args, **env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert "wsfanout serving on" not in result.stdout


def ok(data_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run a command that must succeed."""
    result = run(data_dir, *args, **env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def accounts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir with the group 'chess' and the user 'bob' in it; nobody changes it."""
    data_dir = tmp_path_factory.mktemp("accounts")
    ok(data_dir, "group", "add", "chess")
    ok(data_dir, *ADD_BOB)
    return data_dir


def test_user_and_group_verbs_change_the_database(tmp_path: Path) -> None:
    """Without --url the verbs list and change the database, and each change says that
    open connections keep the old state."""
    ok(tmp_path, "group", "add", "chess")
    ok(tmp_path, "group", "add", "go")
    ok(tmp_path, *ADD_BOB)
    ok(tmp_path, "user", "add", "alice", "--password", "bob-password", "--first-name", "Alice")
    listed = ok(tmp_path, "user", "list")
    assert (listed.stdout, listed.stderr) == ("alice\tAlice\nbob\tBob\n", "")
    assert ok(tmp_path, "user", "list", "--prefix", "B").stdout == "bob\tBob\n"
    assert ok(tmp_path, "group", "list").stdout == "chess\t1\ngo\t0\n"

    for _ in range(2):  # a second time changes nothing and is no error
        joined = ok(tmp_path, "user", "join", "BOB", "go")
        assert joined.stdout == "BOB is in go\n"
        assert joined.stderr.startswith(NOTE) and joined.stderr.count("\n") == 1
    for _ in range(2):
        assert ok(tmp_path, "user", "leave", "bob", "chess").stdout == "bob is not in chess\n"
    assert ok(tmp_path, "group", "list").stdout == "chess\t0\ngo\t1\n"

    deleted = ok(tmp_path, "group", "delete", "go")
    assert deleted.stdout == "group 'go' deleted\n" and deleted.stderr.startswith(NOTE)
    assert ok(tmp_path, "group", "list").stdout == "chess\t0\n"
    gone = ok(tmp_path, "user", "delete", "alice")
    assert gone.stdout == "user 'alice' deleted\n" and gone.stderr.startswith(NOTE)
    assert ok(tmp_path, "user", "list").stdout == "bob\tBob\n"


async def test_passwd_and_disconnect_revoke_stored_sessions(tmp_path: Path) -> None:
    """passwd sets the new password and ends bob's sessions; disconnect without --url ends
    them too, and says it closed no connection."""
    ok(tmp_path, "user", "add", "bob", "--password", "old-password")
    store = await Store.open(tmp_path / "wsfanout.sqlite3")
    try:
        bob = await store.user_by_name("bob")
        assert bob is not None
        session = await store.create_session(bob.id, 3600)
        changed = ok(tmp_path, "user", "passwd", "bob", "--password", "new-password")
        assert changed.stdout == "password of 'bob' changed; their sessions are revoked\n"
        assert changed.stderr.startswith(NOTE)
        assert await store.session_user(session) is None
        bob = await store.user_by_name("bob")
        assert bob is not None
        assert passwords.verify_password("new-password", bob.password_hash)
        assert not passwords.verify_password("old-password", bob.password_hash)

        session = await store.create_session(bob.id, 3600)
        ended = ok(tmp_path, "user", "disconnect", "bob")
        assert ended.stdout == "stored sessions of 'bob' revoked; open connections are not closed\n"
        assert ended.stderr.startswith(NOTE)
        assert await store.session_user(session) is None
    finally:
        await store.close()


def on_terminal(data_dir: Path, args: list[str], typed: list[tuple[str, bytes]]) -> tuple[int, str]:
    """Run the command on a terminal of its own, typing each answer once its prompt shows.

    Returns:
        The exit code and all the terminal showed.
    """
    leader, follower = os.openpty()
    # The new session takes the terminal as its own, as a login shell's would be.
    become_tty = "import fcntl, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0)"
    command = f"{become_tty}; from wsfanout.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", command, *args],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        start_new_session=True,
        env={**os.environ, "WSFANOUT_DATA_DIR": str(data_dir)},
    )
    os.close(follower)
    shown = b""

    def read() -> bytes:
        assert select.select([leader], [], [], 30)[0], shown
        try:
            return os.read(leader, 4096)
        except OSError:  # EIO: the command is gone and the terminal with it
            return b""

    try:
        for prompt, answer in typed:
            while not shown.endswith(prompt.encode()):
                chunk = read()
                assert chunk, shown
                shown += chunk
            os.write(leader, answer)
        while chunk := read():
            shown += chunk
        return proc.wait(30), shown.decode().replace("\r\n", "\n")
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_passwd_asks_twice_in_a_terminal(tmp_path: Path) -> None:
    """Without --password a terminal is asked twice; two different answers, or Ctrl-D,
    are a one-line error and the old password stays."""
    ok(tmp_path, "user", "add", "bob", "--password", "old-password")
    asked = [("password for bob: ", b"s3cret-password\n"), ("again: ", b"s3cret-password\n")]
    code, shown = on_terminal(tmp_path, ["user", "passwd", "bob"], asked)
    assert code == 0, shown
    assert "password of 'bob' changed" in shown and "s3cret-password" not in shown  # never echoed
    mismatch = [("password for bob: ", b"one\n"), ("again: ", b"two\n")]
    code, shown = on_terminal(tmp_path, ["user", "passwd", "bob"], mismatch)
    assert code == 1 and "wsfanout: error: the passwords were empty or did not match" in shown
    code, shown = on_terminal(
        tmp_path, ["user", "passwd", "bob"], [("password for bob: ", b"\x04")]
    )
    assert code == 1 and shown.endswith("wsfanout: error: no password given\n"), shown
    assert "Traceback" not in shown

    async def password_hash() -> str:
        store = await Store.open(tmp_path / "wsfanout.sqlite3")
        try:
            bob = await store.user_by_name("bob")
            assert bob is not None
            return bob.password_hash
        finally:
            await store.close()

    assert passwords.verify_password("s3cret-password", asyncio.run(password_hash()))


@pytest.fixture(scope="module")
def refused_port() -> Iterator[int]:
    """A port that is bound but not listening: connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["user", "delete", "zed"], "no user named 'zed'"),
        (["user", "passwd", "zed"], "no user named 'zed'"),  # asked before the password
        (["user", "passwd", "bob"], "give --password"),
        (["user", "passwd", "bob", "--password", ""], "must not be empty"),
        (["user", "passwd", "bob", "--password", "short"], "a password has at least 8 characters"),
        (["user", "join", "zed", "chess"], "no user named 'zed'"),
        (["user", "join", "bob", "nope"], "no group named 'nope'"),
        (["user", "leave", "zed", "chess"], "no user named 'zed'"),
        (["user", "leave", "bob", "nope"], "no group named 'nope'"),
        (["user", "disconnect", "zed"], "no user named 'zed'"),
        (["group", "delete", "nope"], "no group named 'nope'"),
        (["user", "list", "--url", "notaurl", "--key", "k"], "--url 'notaurl'"),
        (["group", "list", "--url", "http://127.0.0.1:REFUSED"], "give --key"),
        (
            ["user", "delete", "bob", "--url", "http://127.0.0.1:REFUSED", "--key", "k"],
            "cannot reach http://127.0.0.1:REFUSED: [Errno 111]",
        ),
    ],
)
def test_mistakes_are_one_line_errors(
    accounts: Path, refused_port: int, args: list[str], message: str
) -> None:
    """An unknown user or group, a missing password, a bad or dead URL, no key: one line,
    exit 1, and nothing changed."""
    args = [a.replace("REFUSED", str(refused_port)) for a in args]
    message = message.replace("REFUSED", str(refused_port))
    result = run(accounts, *args)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.startswith("wsfanout: error: ") and message in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and result.stdout == ""
    assert ok(accounts, "user", "list").stdout == "bob\tBob\n"
    assert ok(accounts, "group", "list").stdout == "chess\t1\n"


@pytest.fixture
def node(tmp_path: Path, demo_db: Path) -> Iterator[Server]:
    """A running node with the demo users and the admin API on."""
    data_dir = tmp_path / "node"
    data_dir.mkdir()
    env = {"WSFANOUT_API_KEYS": KEY, "WSFANOUT_RATE_LIMIT": "0"}
    with demo_server(data_dir, demo_db, env) as running:
        yield running


async def live(node: Server, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a verb through the node's API, from a data dir of its own: the CLI cannot
    reach the node's database, only its URL. The event loop goes on meanwhile."""
    elsewhere = node.data_dir.parent / "cli"
    return await asyncio.to_thread(run, elsewhere, *args, "--url", node.http_url, "--key", KEY)


@pytest.mark.parametrize(
    ("args", "line", "effect"),
    [
        (
            ["user", "join", "greg", "girls"],
            "greg is in girls",
            {"type": "joined", "group": "girls"},
        ),
        (
            ["user", "leave", "greg", "boys"],
            "greg is not in boys",
            {"type": "left", "group": "boys"},
        ),
        (["group", "delete", "boys"], "group 'boys' deleted", {"type": "left", "group": "boys"}),
        (["user", "disconnect", "greg"], "'greg' disconnected", 1008),
        (["user", "delete", "greg"], "user 'greg' deleted", 1008),
        (
            ["user", "passwd", "greg", "--password", "greg-password-2"],
            "password of 'greg' changed",
            1008,
        ),
    ],
)
async def test_url_changes_open_connections(
    node: Server, args: list[str], line: str, effect: dict[str, str] | int
) -> None:
    """With --url the change reaches greg's open socket within a second: a membership
    event, or a close with 1008 after which his cookie is refused."""
    cookie = node.login("greg")
    greg = await Client.open(node.ws_url, cookie)
    try:
        assert (await greg.next())["type"] == "welcome"
        result = await live(node, *args)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(line) and result.stderr == ""
        if isinstance(effect, dict):
            assert await greg.next(timeout=1) == effect
        else:
            await asyncio.wait_for(greg.conn.wait_closed(), 1)
            assert greg.conn.close_code == effect
            with pytest.raises(InvalidStatus):
                await Client.open(node.ws_url, cookie)
    finally:
        await greg.close()


async def test_url_join_brings_the_groups_messages(node: Server) -> None:
    """After `user join` through the API greg gets what `publish --group` sends to his
    new group, and after `user leave` no more of it."""
    async with ChatClient(node.ws_url, username="greg", password="Greg-demo") as chat:
        greg = Listener(chat)
        assert (await live(node, "user", "join", "greg", "girls")).returncode == 0
        await greg.until(lambda: bool(greg.of("joined")), timeout=1)
        assert greg.of("joined") == [{"type": "joined", "group": "girls"}]
        sent = await live(node, "publish", "hi girls", "--group", "girls")
        assert sent.stdout == "published (1 accepted)\n", sent.stderr
        await greg.got("hi girls", "group:girls", timeout=1)

        assert (await live(node, "user", "leave", "greg", "girls")).returncode == 0
        await greg.until(lambda: bool(greg.of("left")), timeout=1)
        assert greg.of("left") == [{"type": "left", "group": "girls"}]
        assert (await live(node, "publish", "again", "--group", "girls")).returncode == 0
        await asyncio.sleep(0.5)  # what would have come by now
        assert [e["type"] for e in greg.events] == ["welcome", "joined", "message", "left"]


def test_url_lists_and_errors(node: Server) -> None:
    """user list and group list through the API print what the database holds; the key and
    URL may come from the environment; the API's refusals are one line with the status."""
    elsewhere = node.data_dir.parent / "cli"  # an empty database: only the API knows the users
    api = {"WSFANOUT_URL": node.http_url}
    users = ok(elsewhere, "user", "list", "--prefix", "a", **api, WSFANOUT_API_KEY=KEY)
    assert users.stdout == "amanda\tAmanda\nanny\tAnny\n"
    assert ok(node.data_dir, "user", "list", "--prefix", "a").stdout == users.stdout
    groups = ok(elsewhere, "group", "list", **api, WSFANOUT_API_KEYS=f"{KEY},another")
    assert groups.stdout == "boys\t3\ngirls\t3\n"
    assert ok(node.data_dir, "group", "list").stdout == groups.stdout
    assert ok(elsewhere, "group", "list").stdout == ""

    cases = [
        (["user", "join", "zed", "boys"], {}, "the server answered 404: no user named 'zed'"),
        (["user", "join", "greg", "nope"], {}, "the server answered 404: no group named 'nope'"),
        (["group", "delete", "nope"], {}, "the server answered 404: no group named 'nope'"),
        (["user", "passwd", "zed", "--password", "x"], {}, "answered 404: no user named 'zed'"),
        (["group", "list"], {"WSFANOUT_API_KEY": "wrong"}, "the server answered 401: a valid"),
    ]
    for args, env, message in cases:
        result = run(elsewhere, *args, **{**api, "WSFANOUT_API_KEY": KEY, **env})
        assert result.returncode == 1, args
        assert result.stderr.startswith("wsfanout: error: ") and message in result.stderr, (
            result.stderr
        )
        assert result.stderr.count("\n") == 1


async def test_user_list_says_when_it_stops(tmp_path: Path) -> None:
    """Past 1000 users, both ways list the first 1000 and say how to see the rest."""
    store = await Store.open(tmp_path / "wsfanout.sqlite3")
    try:
        for number in range(1001):
            await store.add_user(f"u{number:04}", "not-a-hash")
    finally:
        await store.close()
    with Server(tmp_path, {"WSFANOUT_API_KEYS": KEY}).running() as node:
        direct = ok(tmp_path, "user", "list")
        through = ok(tmp_path, "user", "list", "--url", node.http_url, "--key", KEY)
    for result in (direct, through):
        lines = result.stdout.splitlines()
        assert (len(lines), lines[0], lines[-1]) == (1000, "u0000\t", "u0999\t")
        assert result.stderr == "note: only the first 1000 are listed: narrow with --prefix\n"
    narrowed = ok(tmp_path, "user", "list", "--prefix", "u100")
    assert (narrowed.stdout, narrowed.stderr) == ("u1000\t\n", "")


def test_db_status_says_which_database_and_version(tmp_path: Path) -> None:
    """db status names the database and its schema version, and changes nothing: a file
    not made yet is not made, an old schema is not upgraded."""
    fresh = run(tmp_path / "none", "db", "status")
    assert fresh.returncode == 0, fresh.stderr
    assert "not created yet" in fresh.stdout
    assert not (tmp_path / "none").exists()
    assert run(tmp_path, "demo").returncode == 0
    status = run(tmp_path, "db", "status")
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0] == f"database: SQLite {tmp_path / 'wsfanout.sqlite3'}"
    assert lines[1] == f"schema: version {VERSION} (up to date)"
    assert lines[2] == "6 users, 2 groups, 0 sessions"
    with contextlib.closing(sqlite3.connect(tmp_path / "wsfanout.sqlite3")) as db, db:
        db.execute("UPDATE wsfanout_schema SET version = 1")
    old = run(tmp_path, "db", "status")
    kept = run(tmp_path, "user", "list")  # only db init, serve and demo upgrade
    assert kept.returncode == 1
    assert "has schema version 1; this wsfanout needs" in kept.stderr
    assert "run `wsfanout db init` to upgrade it" in kept.stderr
    assert (
        f"schema: version 1; `wsfanout db init` (or the next start) brings it to version {VERSION}"
        in old.stdout
    )
    with contextlib.closing(sqlite3.connect(tmp_path / "wsfanout.sqlite3")) as db, db:
        db.execute("UPDATE wsfanout_schema SET version = ?", (VERSION + 1,))
    newer = run(tmp_path, "db", "status")
    assert newer.returncode == 1
    assert newer.stderr == (
        f"wsfanout: error: schema version {VERSION + 1} is newer than this wsfanout knows "
        f"({VERSION}): upgrade wsfanout\n"
    )
    refused = run(tmp_path, "user", "list")
    assert refused.returncode == 1 and "newer than this wsfanout" in refused.stderr


def test_db_status_on_postgres(tmp_path: Path, pg_url: str) -> None:
    """With a database URL, db status and db init speak of PostgreSQL (no password shown),
    and no SQLite file is written."""
    url = pg_url.replace("postgres@", "postgres:hunter2@")  # trust auth ignores it
    before = run(tmp_path, "db", "status", WSFANOUT_DATABASE_URL=url)
    assert before.returncode == 0, before.stderr
    assert "postgres:***@" in before.stdout and "hunter2" not in before.stdout
    assert (
        f"schema: none yet; `wsfanout db init` (or the next start) brings it to version {VERSION}"
        in before.stdout
    )
    init = run(tmp_path, "db", "init", WSFANOUT_DATABASE_URL=url)
    assert init.returncode == 0, init.stderr
    assert f"schema version {VERSION}" in init.stdout
    after = run(tmp_path, "db", "status", WSFANOUT_DATABASE_URL=url)
    assert after.stdout.splitlines()[1:] == [
        f"schema: version {VERSION} (up to date)",
        "0 users, 0 groups, 0 sessions",
    ]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("verb", [("db", "status"), ("db", "init"), ("user", "list"), ("serve",)])
def test_an_unreachable_database_is_one_line(tmp_path: Path, verb: tuple[str, ...]) -> None:
    """Every command that needs the database says in one line that it cannot reach it
    (naming it, without the password), and exits 1."""
    url = "postgresql://app:secret@127.0.0.1:9/wsfanout"
    result = run(tmp_path, *verb, WSFANOUT_DATABASE_URL=url)
    assert result.returncode == 1
    assert result.stderr.startswith("wsfanout: error: PostgreSQL postgresql://app:***@127.0.0.1:9/")
    assert result.stderr.count("\n") == 1 and "secret" not in result.stderr


def test_a_misspelled_variable_is_named_at_start(tmp_path: Path, demo_db: Path) -> None:
    """A server started with misspelled WSFANOUT_* variables logs one line for each, naming
    the variable it reads; a command says the same on stderr (not the API_KEY hint: the
    commands read WSFANOUT_API_KEY)."""
    env = {
        "WSFANOUT_REDIS": "redis://127.0.0.1:6379",
        "WSFANOUT_DATABSE_URL": "postgresql://127.0.0.1/x",
        "WSFANOUT_API_KEY": "k",
    }
    with demo_server(tmp_path, demo_db, env) as server:
        log = server.log_path.read_text()
    for line in [
        "WSFANOUT_REDIS is not a wsfanout setting and is ignored; did you mean WSFANOUT_REDIS_URL?",
        "WSFANOUT_DATABSE_URL is not a wsfanout setting and is ignored; did you mean "
        "WSFANOUT_DATABASE_URL?",
        "WSFANOUT_API_KEY is set, but the server reads WSFANOUT_API_KEYS",
    ]:
        assert log.count(line) == 1, log
    status = run(tmp_path, "db", "status", **env)
    assert status.returncode == 0, status.stderr
    assert status.stderr.splitlines() == [
        "wsfanout: warning: WSFANOUT_DATABSE_URL is not a wsfanout setting and is ignored; "
        "did you mean WSFANOUT_DATABASE_URL?",
        "wsfanout: warning: WSFANOUT_REDIS is not a wsfanout setting and is ignored; "
        "did you mean WSFANOUT_REDIS_URL?",
    ]


def test_an_allowed_origin_without_a_scheme_stops_the_start(tmp_path: Path) -> None:
    """WSFANOUT_ALLOWED_ORIGINS=app.example.com (no scheme: it would never match a
    browser's Origin) is refused with one line before anything is opened."""
    result = run(
        tmp_path, "serve", "--bind", "127.0.0.1:0", WSFANOUT_ALLOWED_ORIGINS="app.example.com"
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "wsfanout: error: WSFANOUT_ALLOWED_ORIGINS='app.example.com': expected origins as "
        "browsers send them, comma-separated: scheme, host and any port, such as "
        "https://app.example.com"
    ]
    assert not (tmp_path / "wsfanout.sqlite3").exists()
