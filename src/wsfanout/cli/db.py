"""The commands that work on the database directly: ``db init``, ``db status``,
``user add``, ``group add``, ``demo`` (and the demo's users, which tests seed too)."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from pathlib import Path
from typing import Final

from .. import passwords
from ..config import Settings
from ..database import VERSION, SchemaError
from ..store import DatabaseError, DuplicateError, Store
from .command import CommandError, with_store

DEMO_GROUPS: Final = {"boys": ("Greg", "Chuck", "Mike"), "girls": ("Amanda", "Lisa", "Anny")}


def demo_password(username: str) -> str:
    """A demo user's password: the first name and ``-demo`` (greg: Greg-demo)."""
    return f"{username.capitalize()}-demo"


def cmd_db_init(settings: Settings, args: argparse.Namespace) -> None:
    async def work(store: Store) -> None:
        print(f"database ready: {store.kind} {store.where}, schema version {VERSION}")

    asyncio.run(with_store(settings, work, upgrade=True))


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

    asyncio.run(with_store(settings, work))


def ask_password(settings: Settings, args: argparse.Namespace) -> str:
    """``--password``, else asked for twice at the terminal; long enough to be set."""
    password = _typed_password(args)
    problem = passwords.length_problem(password, settings.min_password_length)
    if problem is not None:
        raise CommandError(problem)
    return password


def _typed_password(args: argparse.Namespace) -> str:
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

    asyncio.run(with_store(settings, check))
    password = ask_password(settings, args)

    async def work(store: Store) -> None:
        hashed = await asyncio.to_thread(passwords.hash_password, password)
        await store.add_user(
            args.name, hashed, first_name=args.first_name or "", groups=tuple(args.group or ())
        )
        groups = f" in {', '.join(args.group)}" if args.group else ""
        print(f"user {args.name!r} created{groups}")

    asyncio.run(with_store(settings, work))


async def create_demo(store: Store) -> list[str]:
    """The seed's two groups and six users (password: ``demo_password``); safe to rerun.

    Returns:
        The usernames created now (empty when they all existed).
    """
    created = []
    for group, members in DEMO_GROUPS.items():
        await store.add_group(group, exist_ok=True)
        for first_name in members:
            if await store.user_by_name(first_name.lower()) is not None:
                continue
            password = demo_password(first_name.lower())
            hashed = await asyncio.to_thread(passwords.hash_password, password)
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
            print(
                f"demo users created: {', '.join(created)} "
                f"(each password is the first name and -demo: {demo_password('greg')})"
            )
        else:
            print("demo users already exist")
        for group, members in DEMO_GROUPS.items():
            print(f"  {group}: {', '.join(members)}")

    asyncio.run(with_store(settings, work, upgrade=True))
