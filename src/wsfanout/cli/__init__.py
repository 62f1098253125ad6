"""The ``wsfanout`` command: ``db init``, ``db status``, ``user …``, ``group …``, ``demo``,
``publish``, ``listen``, ``serve``. This module builds the command line; the commands live
in ``db.py`` (the database directly), ``admin.py`` (a running node's API, or the database),
``listen.py`` (a node's events, through the Python client) and ``serve.py`` (``wsfanout
serve``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from ..config import ConfigError, Settings, variable_warnings
from ..store import DatabaseError, StoreError
from .admin import (
    KEY_VARIABLE,
    URL_VARIABLE,
    cmd_group_delete,
    cmd_group_list,
    cmd_publish,
    cmd_user_delete,
    cmd_user_disconnect,
    cmd_user_list,
    cmd_user_member,
    cmd_user_passwd,
)
from .command import CommandError, configure_logging, version
from .db import (
    DEMO_GROUPS,
    cmd_db_init,
    cmd_db_status,
    cmd_demo,
    cmd_group_add,
    cmd_user_add,
    create_demo,
    demo_password,
)
from .listen import add_parser as add_listen
from .serve import DEFAULT_BIND, PING_INTERVAL, SERVER_VARIABLE, SERVERS, cmd_serve, uvicorn_options

__all__ = [
    "DEMO_GROUPS",
    "PING_INTERVAL",
    "CommandError",
    "build_parser",
    "configure_logging",
    "create_demo",
    "demo_password",
    "main",
    "uvicorn_options",
]


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
    parser.add_argument("--version", action="version", version=f"wsfanout {version()}")
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

    add_listen(commands)

    serve = commands.add_parser("serve", help="serve with hypercorn or uvicorn")
    serve.add_argument("--bind", default=DEFAULT_BIND, help=f"address (default {DEFAULT_BIND})")
    serve.add_argument(
        "--server",
        default=os.environ.get(SERVER_VARIABLE, "hypercorn"),
        help=(
            f"{' or '.join(SERVERS)} (default: ${SERVER_VARIABLE}, else hypercorn); uvicorn "
            "needs the extra of that name: pip install -e '.[uvicorn]' in the clone"
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
        if args.command != "serve":  # a server says these in its log
            configure_logging("warning" if settings.log_level == "info" else settings.log_level)
            for line in variable_warnings(serving=False):
                print(f"wsfanout: warning: {line}", file=sys.stderr)
        if getattr(args, "workers", 1) < 1:
            raise CommandError("--workers must be at least 1")
        args.func(settings, args)
    except (ConfigError, StoreError, CommandError, DatabaseError) as exc:
        print(f"wsfanout: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
