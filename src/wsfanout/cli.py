"""The ``wsfanout`` command: ``db init``, ``user …``, ``group …``, ``demo``, ``publish``,
``serve``.

The user and group verbs that change an existing account work in one of two ways. With
``--url`` (or ``WSFANOUT_URL``) they ask that running node's admin API, which changes the
database and every node's open connections at once. Without one they change the database
directly: the nodes' caches let a running node see that only at new handshakes, within
``store.CACHE_SECONDS``, and no open connection is touched, so those commands say so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import getpass
import json
import logging
import math
import os
import signal
import socket
import stat
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

from . import passwords
from .config import ConfigError, Settings
from .database import VERSION, SchemaError
from .store import (
    CACHE_SECONDS,
    DatabaseError,
    DuplicateError,
    Store,
    StoreError,
    UnknownUserError,
)
from .tokens import KeyConfigError, TokenVerifier

T = TypeVar("T")

DEMO_GROUPS: Final = {"boys": ("Greg", "Chuck", "Mike"), "girls": ("Amanda", "Lisa", "Anny")}
DEFAULT_BIND: Final = "127.0.0.1:8000"
PING_INTERVAL: Final = 20.0
GRACEFUL_TIMEOUT: Final = 10.0
BACKLOG: Final = 2048  # pending connections: a reconnect storm must not be refused
SERVERS: Final = ("hypercorn", "uvicorn")
SERVER_VARIABLE: Final = "WSFANOUT_SERVER"
URL_VARIABLE: Final = "WSFANOUT_URL"
KEY_VARIABLE: Final = "WSFANOUT_API_KEY"
API_TIMEOUT: Final = 10.0  # seconds for one admin API request
LIST_MAX: Final = 1000  # users listed at most, as the admin API allows
OFFLINE_NOTE: Final = (
    f"note: changed in the database only: running nodes apply it at new handshakes within "
    f"about {CACHE_SECONDS:g} s (revoked sessions are refused then), but open connections are "
    f"untouched; pass --url for a live change"
)


class CommandError(Exception):
    """A command that cannot go on; the message is printed, the exit code is 1."""


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # hypercorn logs through its own handlers; passing its records up would print them twice.
    logging.getLogger("hypercorn").propagate = False


async def _with_store(
    settings: Settings, work: Callable[[Store], Awaitable[T]], *, upgrade: bool = False
) -> T:
    """Do ``work`` on the store. A new database gets its schema; an older schema is brought
    up to date only by the commands that ``upgrade`` (``db init``, ``serve``, ``demo``):
    the others refuse, so that nobody upgrades a shared database under older nodes by
    adding a user."""
    store = await Store.open(settings.database_target, pool_size=2, migrate=False)
    try:
        try:
            version = await store.version()
        except (DatabaseError, SchemaError) as exc:
            raise CommandError(str(exc)) from None
        if 0 < version < VERSION and not upgrade:
            raise CommandError(
                f"{store.kind} {store.where} has schema version {version}; this wsfanout "
                f"needs {VERSION}: run `wsfanout db init` to upgrade it (nodes of an older "
                "wsfanout then refuse to start)"
            )
        if version != VERSION:
            await store.close()
            store = await Store.open(settings.database_target, pool_size=2)
        return await work(store)
    finally:
        await store.close()


def cmd_db_init(settings: Settings, args: argparse.Namespace) -> None:
    async def work(store: Store) -> None:
        print(f"database ready: {store.kind} {store.where}, schema version {VERSION}")

    asyncio.run(_with_store(settings, work, upgrade=True))


def cmd_db_status(settings: Settings, args: argparse.Namespace) -> None:
    """Which database, which schema version, what it holds; changes nothing."""
    target = settings.database_target
    if isinstance(target, Path) and not target.exists():
        print(f"database: SQLite {target} (not created yet: `wsfanout db init` or a start does)")
        return

    async def work() -> None:
        store = await Store.open(target, pool_size=1, migrate=False)
        try:
            print(f"database: {store.kind} {store.where}")
            version = await store.version()
            if version > VERSION:
                raise CommandError(
                    f"schema version {version} is newer than this wsfanout knows ({VERSION}): "
                    "upgrade wsfanout"
                )
            if version < VERSION:
                state = "none yet" if version == 0 else f"version {version}"
                print(
                    f"schema: {state}; `wsfanout db init` (or the next start) brings it to "
                    f"version {VERSION}"
                )
                return
            print(f"schema: version {version} (up to date)")
            counts = await store.counts()
            print(", ".join(f"{count} {what}" for what, count in counts.items()))
        except (DatabaseError, SchemaError) as exc:
            raise CommandError(str(exc)) from None
        finally:
            await store.close()

    asyncio.run(work())


def cmd_group_add(settings: Settings, args: argparse.Namespace) -> None:
    async def work(store: Store) -> None:
        await store.add_group(args.name)
        print(f"group {args.name!r} created")

    asyncio.run(_with_store(settings, work))


def _password(args: argparse.Namespace) -> str:
    if args.password is not None:
        if not args.password:
            raise CommandError("the password must not be empty")
        return str(args.password)
    if not sys.stdin.isatty():
        raise CommandError("give --password, or run in a terminal to be asked for one")
    try:
        first = getpass.getpass(f"password for {args.name}: ")
        if not first or first != getpass.getpass("again: "):
            raise CommandError("the passwords were empty or did not match")
    except EOFError:  # Ctrl-D at a prompt
        print(file=sys.stderr)  # the prompt's line, ended
        raise CommandError("no password given") from None
    return first


def cmd_user_add(settings: Settings, args: argparse.Namespace) -> None:
    async def check(store: Store) -> None:
        # Before asking for a password: nothing typed should be lost to a typo'd group.
        if await store.user_by_name(args.name) is not None:
            raise DuplicateError("user", args.name)
        for group in args.group or ():
            if not await store.group_exists(group):
                hint = " (or `wsfanout demo` for the demo groups)" if group in DEMO_GROUPS else ""
                raise CommandError(
                    f"no group named {group!r}: create it first with "
                    f"`wsfanout group add {group}`{hint}"
                )

    asyncio.run(_with_store(settings, check))
    password = _password(args)

    async def work(store: Store) -> None:
        hashed = await asyncio.to_thread(passwords.hash_password, password)
        await store.add_user(
            args.name, hashed, first_name=args.first_name or "", groups=tuple(args.group or ())
        )
        groups = f" in {', '.join(args.group)}" if args.group else ""
        print(f"user {args.name!r} created{groups}")

    asyncio.run(_with_store(settings, work))


async def create_demo(store: Store) -> list[str]:
    """The seed's two groups and six users (password: the first name); safe to rerun.

    Returns:
        The usernames created now (empty when they all existed).
    """
    created = []
    for group, members in DEMO_GROUPS.items():
        await store.add_group(group, exist_ok=True)
        for first_name in members:
            if await store.user_by_name(first_name.lower()) is not None:
                continue
            hashed = await asyncio.to_thread(passwords.hash_password, first_name)
            try:
                await store.add_user(
                    first_name.lower(), hashed, first_name=first_name, groups=(group,)
                )
            except DuplicateError:
                continue  # created meanwhile by another process
            created.append(first_name.lower())
    return created


def cmd_demo(settings: Settings, args: argparse.Namespace) -> None:
    async def work(store: Store) -> None:
        created = await create_demo(store)
        if created:
            print(f"demo users created: {', '.join(created)} (each password is the first name)")
        else:
            print("demo users already exist")
        for group, members in DEMO_GROUPS.items():
            print(f"  {group}: {', '.join(members)}")

    asyncio.run(_with_store(settings, work, upgrade=True))


def cmd_serve(settings: Settings, args: argparse.Namespace) -> None:
    if not 0 <= args.ping_interval < math.inf:
        raise CommandError("--ping-interval must be 0 (no pings) or a positive number of seconds")
    if args.server not in SERVERS:
        choices = ", ".join(SERVERS)
        raise CommandError(
            f"--server {args.server!r} (or ${SERVER_VARIABLE}): expected one of {choices}"
        )
    if args.forwarded_allow_ips is not None and not args.proxy_headers:
        raise CommandError("--forwarded-allow-ips means nothing without --proxy-headers")
    if args.proxy_headers and args.server != "uvicorn":
        raise CommandError("--proxy-headers needs --server uvicorn (hypercorn has no such setting)")
    run = _serve_hypercorn
    if args.server == "uvicorn":
        _need_uvicorn()
        run = _serve_uvicorn
    _preflight(settings)
    if args.workers > 1 and not settings.redis_url:
        print(
            "warning: --workers > 1 without WSFANOUT_REDIS_URL: each worker fans out only to its "
            "own connections",
            file=sys.stderr,
        )
    bind, listening = _listen(args.bind, BACKLOG)
    if listening is not None:
        host, port = listening.getsockname()[:2]
        print(
            f"wsfanout serving on http://{_url_host(host)}:{port}/ with {args.server}", flush=True
        )
    try:
        code = run(settings, args, bind)
    finally:
        if listening is not None:
            with contextlib.suppress(OSError):  # the server may have closed it already
                listening.close()
    if code:
        raise CommandError(f"the server stopped with exit code {code}: its log says why")


def _serve_hypercorn(settings: Settings, args: argparse.Namespace, bind: str) -> int:
    from hypercorn.config import Config
    from hypercorn.run import run

    config = Config()
    config.application_path = "wsfanout:app"
    config.bind = [bind]
    config.backlog = BACKLOG
    config.workers = args.workers
    config.websocket_ping_interval = args.ping_interval or None
    config.graceful_timeout = GRACEFUL_TIMEOUT  # time to close every socket with 1001
    # wsfanout bounds its streams' messages itself (servers.py); should that reach fail,
    # hypercorn's own limit is ours.
    config.websocket_max_message_size = settings.max_frame_bytes
    config.accesslog = "-" if args.access_log else None
    config.errorlog = "-"
    config.loglevel = settings.log_level.upper()
    return int(run(config))


def uvicorn_options(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """What ``wsfanout serve --server uvicorn`` tells uvicorn, as ``uvicorn.Config``
    arguments; the README lists the same as command-line flags."""
    ping = args.ping_interval or None
    return {
        "ws": "websockets-sansio",
        "ws_per_message_deflate": settings.compression,
        "ws_max_size": settings.max_frame_bytes,
        "ws_ping_interval": ping,
        "ws_ping_timeout": ping,
        "loop": "auto",  # uvloop where installed
        "http": "h11",  # httptools bounds neither a request head's size nor its time
        "lifespan": "on",
        "proxy_headers": args.proxy_headers,
        "forwarded_allow_ips": args.forwarded_allow_ips or "127.0.0.1",
        "server_header": False,
        "timeout_graceful_shutdown": GRACEFUL_TIMEOUT,
        "backlog": BACKLOG,
        "workers": args.workers,
        "access_log": args.access_log,
        "log_level": settings.log_level,
    }


def _need_uvicorn() -> None:
    """One line naming what to install, if uvicorn or its websockets protocol is missing."""
    try:
        import uvicorn  # noqa: F401
        import websockets  # noqa: F401  (uvicorn's websockets-sansio protocol needs it)
    except ImportError as exc:
        raise CommandError(
            f"--server uvicorn needs uvicorn and websockets ({exc}): "
            "pip install 'wsfanout[uvicorn]'"
        ) from None


def _serve_uvicorn(settings: Settings, args: argparse.Namespace, bind: str) -> int:
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    config = uvicorn.Config(
        "wsfanout:app",
        log_config=_uvicorn_log_config(args.access_log),
        **uvicorn_options(settings, args),
    )
    path = None
    if bind.startswith("unix:"):
        path = Path(bind[len("unix:") :])
        sock = _listen_unix(path)
    else:  # fd://N, ours from _listen or the caller's: uvicorn closes what it is given
        sock = socket.socket(fileno=os.dup(int(bind[len("fd://") :])))
    server = uvicorn.Server(config)
    # uvicorn re-raises the SIGTERM it handled once it has stopped, to die of it; stopping
    # on SIGTERM is a success here, as under hypercorn: exit 0. Before uvicorn takes the
    # signal (while it starts), the same handler asks it to stop once started.
    previous = signal.signal(signal.SIGTERM, server.handle_exit)
    try:
        if args.workers > 1:
            Multiprocess(config, sockets=[sock]).run()  # a Server of its own per worker
        else:
            server.run(sockets=[sock])
    except SystemExit as exc:  # uvicorn's own way to fail, e.g. a failed lifespan startup
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()
    if args.workers == 1 and not server.started:
        return 3  # uvicorn's STARTUP_FAILURE
    return 0


def _listen_unix(path: Path) -> socket.socket:
    """A unix socket for uvicorn at ``path`` (a stale one from an earlier run replaced, as
    hypercorn does); a path that cannot be bound is one line."""
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(path.stat().st_mode):
            path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise CommandError(f"cannot listen on unix:{path}: {exc.strerror or exc}") from None
    return sock


def _uvicorn_log_config(access_log: bool) -> dict[str, Any]:
    """uvicorn's logging; without --access-log, without a line per websocket (three, with
    its open and close), as hypercorn's."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    if not access_log:
        config.setdefault("filters", {})["connections"] = {"()": QuietConnections}
        config["loggers"]["uvicorn.error"]["filters"] = ["connections"]
    return config


class QuietConnections(logging.Filter):
    """Drops uvicorn's log lines of websockets opened, refused and closed."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg
        return record.levelno > logging.INFO or not (
            message in ("connection open", "connection closed")
            or (isinstance(message, str) and message.startswith('%s - "WebSocket %s"'))
        )


def _preflight(settings: Settings) -> None:
    """What the workers will open, checked once here: a problem is one line, not a worker's
    traceback."""
    from .service import secret_keys

    asyncio.run(_with_store(settings, _nothing, upgrade=True))
    try:
        secret_keys(settings.secret_keys, settings.data_dir)
    except (OSError, RuntimeError) as exc:
        raise CommandError(f"cannot read or create the secret key: {exc}") from None
    try:
        TokenVerifier(settings.jwt_secret, settings.jwt_public_key)
    except KeyConfigError as exc:
        raise CommandError(str(exc)) from None


async def _nothing(store: Store) -> None:
    return None


def _listen(bind: str, backlog: int) -> tuple[str, socket.socket | None]:
    """Bind HOST:PORT here (so a bad address or a taken port is one clear line) and hand
    the server the socket; ``unix:`` and ``fd://`` binds go to the server as they are."""
    if bind.startswith(("unix:", "fd://")):
        return bind, None
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise CommandError(f"--bind {bind!r}: expected HOST:PORT, unix:PATH or fd://N")
    host = host.strip("[]") or "127.0.0.1"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise CommandError(f"cannot listen on {bind}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise CommandError(f"cannot listen on {bind}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return f"fd://{sock.fileno()}", sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _call(
    settings: Settings, args: argparse.Namespace, method: str, path: str, body: Any = None
) -> Any:
    """One request to the HTTP API of the node at ``args.url``, with the API key.

    Returns:
        The JSON answer, or None when there is none (204).

    Raises:
        CommandError: no key, a URL that is not http(s), the node cannot be reached, or
            it answered an error (its ``error`` text and the status are in the message).
    """
    key = args.key or os.environ.get(KEY_VARIABLE) or next(iter(settings.api_keys), "")
    if not key:
        raise CommandError(f"give --key, or set {KEY_VARIABLE} or WSFANOUT_API_KEYS")
    if not args.url.startswith(("http://", "https://")):
        raise CommandError(f"--url {args.url!r}: expected the server's http:// or https:// URL")
    request = urllib.request.Request(  # noqa: S310 - the operator gives the URL
        args.url.rstrip("/") + path,
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"content-type": "application/json", "authorization": f"Bearer {key}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=API_TIMEOUT) as response:  # noqa: S310
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        try:
            detail = json.loads(err.read()).get("error", "")
        except (ValueError, AttributeError):
            detail = ""
        raise CommandError(f"the server answered {err.code}: {detail or err.reason}") from None
    except (urllib.error.URLError, OSError) as err:
        raise CommandError(f"cannot reach {args.url}: {getattr(err, 'reason', err)}") from None


def cmd_publish(settings: Settings, args: argparse.Namespace) -> None:
    """Publish one message through a running server's HTTP API."""
    message: dict[str, str] = {"text": args.text, "from": args.sender}
    if args.group:
        message.update(type="group", group=args.group)
    elif args.user:
        message.update(type="direct", user_name=args.user)
    else:
        message["type"] = "broadcast"
    answer = _call(settings, args, "POST", "/api/publish", message)
    print(f"published ({answer.get('accepted', 0)} accepted)")


def _path(*parts: str) -> str:
    """An admin API path, each name quoted (``a@b`` stays one segment)."""
    return "/api/" + "/".join(urllib.parse.quote(part, safe="") for part in parts)


def _change(
    settings: Settings,
    args: argparse.Namespace,
    request: tuple[str, str, Any],
    work: Callable[[Store], Awaitable[object]],
    done: str,
) -> None:
    """Make a change through the node at ``--url`` (``request``: method, path, body), or
    without one in the database (``work``), saying that open connections keep the old."""
    if args.url:
        _call(settings, args, *request)
        print(done)
    else:
        asyncio.run(_with_store(settings, work))
        print(done)
        print(OFFLINE_NOTE, file=sys.stderr)


def cmd_user_list(settings: Settings, args: argparse.Namespace) -> None:
    if args.url:
        query = urllib.parse.urlencode({"q": args.prefix, "limit": LIST_MAX})
        answer = _call(settings, args, "GET", f"{_path('users')}?{query}")
        users = [(user["username"], user["first_name"]) for user in answer["users"]]
        truncated = bool(answer["truncated"])
    else:
        users = asyncio.run(
            _with_store(settings, lambda store: store.list_users(args.prefix, LIST_MAX + 1))
        )
        truncated = len(users) > LIST_MAX
    for username, first_name in users[:LIST_MAX]:
        print(f"{username}\t{first_name}")
    if truncated:
        print(f"note: only the first {LIST_MAX} are listed: narrow with --prefix", file=sys.stderr)


def cmd_user_delete(settings: Settings, args: argparse.Namespace) -> None:
    _change(
        settings,
        args,
        ("DELETE", _path("users", args.name), None),
        lambda store: store.delete_user(args.name),
        f"user {args.name!r} deleted",
    )


def cmd_user_passwd(settings: Settings, args: argparse.Namespace) -> None:
    # Before asking for a password: nothing typed should be lost to a typo'd name.
    if args.url:
        _call(settings, args, "GET", _path("users", args.name))
    elif asyncio.run(_with_store(settings, lambda store: store.user_by_name(args.name))) is None:
        raise UnknownUserError(args.name)
    password = _password(args)

    async def work(store: Store) -> None:
        hashed = await asyncio.to_thread(passwords.hash_password, password)
        await store.set_password(args.name, hashed)

    _change(
        settings,
        args,
        ("PUT", _path("users", args.name, "password"), {"password": password}),
        work,
        f"password of {args.name!r} changed; their sessions are revoked",
    )


def cmd_user_member(settings: Settings, args: argparse.Namespace) -> None:
    """``user join`` (``args.member``) and ``user leave``: both idempotent, so the line
    says where the user stands, which is true whether or not this changed it."""
    _change(
        settings,
        args,
        ("PUT" if args.member else "DELETE", _path("users", args.name, "groups", args.group), None),
        lambda store: store.set_member(args.name, args.group, args.member),
        f"{args.name} is {'' if args.member else 'not '}in {args.group}",
    )


def cmd_user_disconnect(settings: Settings, args: argparse.Namespace) -> None:
    _change(
        settings,
        args,
        ("POST", _path("users", args.name, "disconnect"), None),
        lambda store: store.revoke_user_sessions(args.name),
        f"{args.name!r} disconnected: sessions revoked, open connections closed"
        if args.url
        else f"stored sessions of {args.name!r} revoked; open connections are not closed",
    )


def cmd_group_list(settings: Settings, args: argparse.Namespace) -> None:
    if args.url:
        answer = _call(settings, args, "GET", _path("groups"))
        groups = [(group["name"], group["members"]) for group in answer["groups"]]
    else:
        groups = asyncio.run(_with_store(settings, lambda store: store.list_groups()))
    for name, members in groups:
        print(f"{name}\t{members}")


def cmd_group_delete(settings: Settings, args: argparse.Namespace) -> None:
    _change(
        settings,
        args,
        ("DELETE", _path("groups", args.name), None),
        lambda store: store.delete_group(args.name),
        f"group {args.name!r} deleted",
    )


def _api_options(parser: argparse.ArgumentParser, url_help: str, url: str | None = None) -> None:
    """``--url`` (default: $WSFANOUT_URL, else ``url``) and ``--key``."""
    parser.add_argument("--url", default=os.environ.get(URL_VARIABLE) or url, help=url_help)
    parser.add_argument(
        "--key",
        "--api-key",
        dest="key",
        help=f"an API key (default: ${KEY_VARIABLE}, else the first of $WSFANOUT_API_KEYS)",
    )


def _admin_verb(
    verbs: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    text: str,
    func: Callable[[Settings, argparse.Namespace], None],
    *positionals: str,
) -> argparse.ArgumentParser:
    """A user or group verb that runs through a node's admin API or on the database."""
    command = verbs.add_parser(name, help=text)
    for positional in positionals:
        command.add_argument(positional)
    _api_options(
        command,
        f"a running node's URL, to change it live (default: ${URL_VARIABLE}; "
        "without one the database is changed directly)",
    )
    command.set_defaults(func=func)
    return command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsfanout",
        description="Websocket fan-out service. Settings come from WSFANOUT_* variables.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    db = commands.add_parser("db", help="database commands").add_subparsers(
        dest="db_command", required=True, metavar="DB_COMMAND"
    )
    db.add_parser(
        "init", help="create the database and its schema, or bring the schema up to date"
    ).set_defaults(func=cmd_db_init)
    db.add_parser(
        "status", help="which database, its schema version, what it holds (changes nothing)"
    ).set_defaults(func=cmd_db_status)

    user = commands.add_parser("user", help="user commands").add_subparsers(
        dest="user_command", required=True, metavar="USER_COMMAND"
    )
    user_add = user.add_parser("add", help="create a user")
    user_add.add_argument("name", help="the username (letters, digits, _ . @ + -)")
    user_add.add_argument("--password", help="the password (asked for if omitted)")
    user_add.add_argument("--first-name", help="the name shown to others")
    user_add.add_argument(
        "--group", action="append", metavar="GROUP", help="an existing group (repeatable)"
    )
    user_add.set_defaults(func=cmd_user_add)
    _admin_verb(user, "list", "list users: username, tab, first name", cmd_user_list).add_argument(
        "--prefix", default="", help="only the usernames that start with this"
    )
    _admin_verb(user, "delete", "delete a user", cmd_user_delete, "name")
    _admin_verb(
        user, "passwd", "change a user's password (ends their sessions)", cmd_user_passwd, "name"
    ).add_argument("--password", help="the new password (asked for if omitted)")
    join = _admin_verb(user, "join", "add a user to a group", cmd_user_member, "name", "group")
    join.set_defaults(member=True)
    leave = _admin_verb(
        user, "leave", "take a user out of a group", cmd_user_member, "name", "group"
    )
    leave.set_defaults(member=False)
    _admin_verb(
        user,
        "disconnect",
        "end a user's sessions (live: close their sockets)",
        cmd_user_disconnect,
        "name",
    )

    group = commands.add_parser("group", help="group commands").add_subparsers(
        dest="group_command", required=True, metavar="GROUP_COMMAND"
    )
    group_add = group.add_parser("add", help="create a group")
    group_add.add_argument("name")
    group_add.set_defaults(func=cmd_group_add)
    _admin_verb(group, "list", "list groups: name, tab, member count", cmd_group_list)
    _admin_verb(group, "delete", "delete a group", cmd_group_delete, "name")

    commands.add_parser("demo", help="create the demo groups and users").set_defaults(func=cmd_demo)

    publish = commands.add_parser("publish", help="publish a message through the HTTP API")
    publish.add_argument("text", help="the message")
    target = publish.add_mutually_exclusive_group()
    target.add_argument("--all", action="store_true", help="to everyone (the default)")
    target.add_argument("--group", help="to the members of a group")
    target.add_argument("--user", help="to every connection of one user")
    publish.add_argument("--from", dest="sender", default="system", help="the sender shown")
    default_url = f"http://{DEFAULT_BIND}"
    url_help = f"the server's URL (default: ${URL_VARIABLE}, else {default_url})"
    _api_options(publish, url_help, default_url)
    publish.set_defaults(func=cmd_publish)

    serve = commands.add_parser("serve", help="serve with hypercorn or uvicorn")
    serve.add_argument("--bind", default=DEFAULT_BIND, help=f"address (default {DEFAULT_BIND})")
    serve.add_argument(
        "--server",
        default=os.environ.get(SERVER_VARIABLE, "hypercorn"),
        help=(
            f"{' or '.join(SERVERS)} (default: ${SERVER_VARIABLE}, else hypercorn); uvicorn "
            "needs pip install 'wsfanout[uvicorn]'"
        ),
    )
    serve.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    serve.add_argument(
        "--ping-interval",
        type=float,
        default=PING_INTERVAL,
        help=f"seconds between websocket pings, 0 for none (default {PING_INTERVAL:g})",
    )
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.add_argument(
        "--proxy-headers",
        action="store_true",
        help="uvicorn only: take the client's address from X-Forwarded-For, when sent by "
        "--forwarded-allow-ips (off: login throttling counts by the address that connects)",
    )
    serve.add_argument(
        "--forwarded-allow-ips",
        default=None,
        help="with --proxy-headers: the proxies trusted, comma-separated (default 127.0.0.1)",
    )
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        if args.command != "serve":
            configure_logging("warning" if settings.log_level == "info" else settings.log_level)
        if getattr(args, "workers", 1) < 1:
            raise CommandError("--workers must be at least 1")
        args.func(settings, args)
    except (ConfigError, StoreError, CommandError, DatabaseError) as exc:
        print(f"wsfanout: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
