"""``wsfanout listen``: a running service's events as JSON lines on stdout, through the Python
client, so reconnecting and resuming are the client's (DESIGN 11).

What it prints: every event the client yields (``welcome``, ``message``, ``resumed``,
``joined``, …), one JSON object a line; with ``--stream``, messages of the other streams are
left out. Where it is: ``--positions FILE`` is read at start (to resume where an earlier run
stopped) and written at exit (SIGINT or SIGTERM) once every event received was printed.
State changes go to stderr, so stdout stays JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import Settings
from .command import CommandError

if TYPE_CHECKING:
    from ..client import Client


def cmd_listen(settings: Settings, args: argparse.Namespace) -> None:
    """Print a service's events until interrupted."""
    try:
        from ..client import Client, ClientError
    except ImportError:  # websockets is the client's extra
        raise CommandError(
            "wsfanout listen needs the client extra (websockets): pip install '.[client]' "
            "in wsfanout's source"
        ) from None
    password = _password(args)
    positions = _read_positions(args.positions) if args.positions else None

    async def listen() -> None:
        def on_state(state: str, reason: str | None) -> None:
            if state != "connecting":
                why = f" ({chat.detail})" if chat.detail else ""
                print(
                    f"wsfanout listen: {state}{': ' + reason if reason else ''}{why}",
                    file=sys.stderr,
                )

        try:
            chat = Client(
                args.url,
                username=args.username,
                password=password,
                token=args.token,
                positions=positions,
                on_state=on_state,
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        stopping = asyncio.create_task(_close_on(stop, chat))
        try:
            await chat.connect()
            async for event in chat:
                if _shown(event, args.stream):
                    sys.stdout.write(json.dumps(event, ensure_ascii=False) + "\n")
                    sys.stdout.flush()
        except ClientError as exc:
            if not stop.is_set():  # refused for good, not interrupted while connecting
                raise CommandError(f"{args.url}: {exc.detail or exc.code}") from None
        finally:
            stopping.cancel()
            await chat.close()
            if args.positions:
                _write_positions(args.positions, chat.positions)
        if chat.reason != "closed":  # refused for good while listening
            raise CommandError(f"{args.url}: {chat.detail or chat.reason}")

    asyncio.run(listen())


async def _close_on(stop: asyncio.Event, chat: Client) -> None:
    await stop.wait()
    await chat.close()


def _shown(event: dict[str, Any], streams: list[str] | None) -> bool:
    return not streams or event.get("type") != "message" or event.get("stream") in streams


def _password(args: argparse.Namespace) -> str | None:
    if args.username is None:
        if args.password is not None:
            raise CommandError("--password goes with --username")
        return None
    if args.token is not None:
        raise CommandError("give --username or --token, not both")
    if args.password is not None:
        return str(args.password)
    if not sys.stdin.isatty():
        raise CommandError("give --password, or run in a terminal to be asked for one")
    try:
        return getpass.getpass(f"password for {args.username}: ")
    except EOFError:
        print(file=sys.stderr)
        raise CommandError("no password given") from None


def _read_positions(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None  # the first run: written at exit
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}") from None
    try:
        positions = json.loads(text) if text.strip() else {}
    except ValueError:
        raise CommandError(f"{path} is not JSON: delete it to start afresh") from None
    if not isinstance(positions, dict):
        raise CommandError(f'{path} must hold {{"<stream>": {{"epoch", "offset"}}}}')
    return positions


def _write_positions(path: Path, positions: dict[str, Any]) -> None:
    """Written whole or not at all: a new file renamed over the old one."""
    part = path.with_name(path.name + ".part")
    try:
        part.write_text(json.dumps(positions, indent=1) + "\n")
        os.replace(part, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            part.unlink()
        raise CommandError(f"cannot write {path}: {exc.strerror}") from None


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``wsfanout listen``'s command line."""
    listen = commands.add_parser(
        "listen",
        help="print a service's events as JSON lines, reconnecting and resuming",
        description="Print the events of a running service as JSON lines on stdout "
        "(state changes on stderr), reconnecting and resuming by itself.",
    )
    listen.add_argument("url", help="the websocket URL, e.g. ws://127.0.0.1:8000/")
    listen.add_argument("--username", "-u", help="log in as this user")
    listen.add_argument("--password", help="the user's password (asked for if omitted)")
    listen.add_argument("--token", help="a connection token (JWT) instead of a login")
    listen.add_argument(
        "--stream",
        action="append",
        metavar="STREAM",
        help="print only this stream's messages: all, group:NAME, user:NAME (repeatable)",
    )
    listen.add_argument(
        "--positions",
        type=Path,
        metavar="FILE",
        help="resume from the positions in FILE, and save them there at exit",
    )
    listen.set_defaults(func=cmd_listen)
