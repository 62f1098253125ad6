"""What every ``wsfanout`` command shares: its one error, logging, and opening the store."""

from __future__ import annotations

import json
import logging
import urllib.parse
from collections.abc import Awaitable, Callable
from importlib import metadata
from typing import Final, TypeVar

from ..config import Settings
from ..database import VERSION, SchemaError
from ..store import DatabaseError, Store

T = TypeVar("T")

# wsfanout is not on a package index: it is installed from a clone or from the git URL of
# the copy a team keeps (the docs show it as https://git.example.com/you/wsfanout.git)
GIT_URL: Final = "<the git URL of your wsfanout>"


class CommandError(Exception):
    """A command that cannot go on; the message is printed, the exit code is 1."""


def version() -> str:
    """This wsfanout's version, as installed."""
    try:
        return metadata.version("wsfanout")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def install_extra(extra: str) -> str:
    """The pip command that adds ``extra`` to this wsfanout: into the clone it was
    installed from, else from a clone or the git URL."""
    try:
        origin = json.loads(metadata.distribution("wsfanout").read_text("direct_url.json") or "{}")
    except (metadata.PackageNotFoundError, ValueError):
        origin = {}
    url = str(origin.get("url", ""))
    if url.startswith("file://") and origin.get("dir_info", {}).get("editable"):
        return f"pip install -e '{urllib.parse.unquote(url[len('file://') :])}[{extra}]'"
    return (
        f"pip install -e '.[{extra}]' in a clone of wsfanout, or "
        f"pip install 'wsfanout[{extra}] @ git+{GIT_URL}'"
    )


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
