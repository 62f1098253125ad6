"""service: what a node says as it starts, in its log, under a real server."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.server import Server

NO_USERS = "no users yet: run `wsfanout demo` or `wsfanout user add`"


@pytest.mark.parametrize(
    ("demo", "env", "said"),
    [
        (False, {}, 1),
        (True, {}, 0),
        (False, {"WSFANOUT_JWT_SECRET": "s" * 32}, 0),  # users may come with tokens
    ],
)
def test_a_store_without_users_says_how_to_make_some(
    tmp_path: Path, demo_db: Path, demo: bool, env: dict[str, str], said: int
) -> None:
    """A node whose store has no users says once how to create some, unless tokens make
    the store's users optional; a store with users says nothing of it."""
    if demo:
        shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    with Server(tmp_path, env).running() as server:
        log = server.log_path.read_text()
    assert log.count(NO_USERS) == said, log
