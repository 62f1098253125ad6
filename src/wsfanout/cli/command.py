"""What every ``wsfanout`` command shares: its one error, logging, and opening the store."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ..config import Settings
from ..database import VERSION, SchemaError
from ..store import DatabaseError, Store

T = TypeVar("T")


class CommandError(Exception):
    """A command that cannot go on; the message is printed, the exit code is 1."""


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # hypercorn logs through its own handlers; passing its records up would print them twice.
    logging.getLogger("hypercorn").propagate = False


async def with_store(
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
