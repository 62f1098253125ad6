"""store: schema, users and groups, name resolution, directory."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from wsfanout.store import (
    DuplicateError,
    InvalidNameError,
    Store,
    StoreError,
    UnknownGroupError,
    UnknownUserError,
)
from wsfanout.throttle import DatabaseCounts


@pytest.fixture
async def store(database: Path | str) -> AsyncIterator[Store]:
    """A store on each backend (``database``), with a few users and groups."""
    opened = await Store.open(database)
    await opened.add_group("boys")
    await opened.add_group("chess")
    await opened.add_user("mike", "h1", first_name="Mike", groups=("boys", "chess"))
    await opened.add_user("mikey", "h2", first_name="Mikey")
    await opened.add_user("m.smith", "h3", first_name="Sam")
    await opened.add_user("sam2", "h4", first_name="sam")
    yield opened
    await opened.close()


async def test_schema_is_created_in_wal_mode(tmp_path: Path) -> None:
    """Opening a new path creates the folder, the file and WAL journaling."""
    path = tmp_path / "a" / "b" / "x.sqlite3"
    store = await Store.open(path)
    try:
        assert path.exists()
        with contextlib.closing(sqlite3.connect(path)) as other:  # WAL is kept in the file
            assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        await store.close()


async def test_open_a_bad_path_says_so(tmp_path: Path) -> None:
    """A database path under a regular file is a StoreError naming the path."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="cannot open database"):
        await Store.open(tmp_path / "file" / "db.sqlite3")


async def test_users_and_groups(store: Store) -> None:
    """Users are found case-insensitively with their groups; several groups each."""
    user = await store.user_by_name("MIKE")
    assert user is not None and user.username == "mike" and user.first_name == "Mike"
    assert await store.groups_of(user.id) == ["boys", "chess"]
    assert await store.user_by_id(user.id) == user
    assert await store.group_exists("boys")
    assert not await store.group_exists("Boys")


async def test_duplicates_and_unknown_groups(store: Store) -> None:
    """Duplicate users (any case) and groups, and unknown groups, are refused cleanly."""
    with pytest.raises(DuplicateError, match="user named 'MIKE'"):
        await store.add_user("MIKE", "h")
    with pytest.raises(DuplicateError, match="group named 'boys'"):
        await store.add_group("boys")
    await store.add_group("boys", exist_ok=True)
    with pytest.raises(UnknownGroupError, match="no group named 'nope'"):
        await store.add_user("new", "h", groups=("boys", "nope"))
    assert await store.user_by_name("new") is None  # nothing half-created


@pytest.mark.parametrize("name", ["", "has space", "x" * 65, "-lead", "semi;colon"])
async def test_invalid_usernames(store: Store, name: str) -> None:
    """Usernames outside the allowed pattern are refused with the rule."""
    with pytest.raises(InvalidNameError):
        await store.add_user(name, "h")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mike", "mike"),
        ("MIKE", "mike"),
        ("Mikey", "mikey"),
        ("m.smith", "m.smith"),
        ("sam2", "sam2"),
    ],
)
async def test_resolve_user(store: Store, name: str, expected: str) -> None:
    """A username, or a unique first name, resolves; case-insensitively."""
    assert await store.resolve_user(name) == expected


@pytest.mark.parametrize("name", ["mik", "ike", "mike%", "_ike", "nobody"])
async def test_resolve_never_matches_parts(store: Store, name: str) -> None:
    """Prefixes, substrings and LIKE wildcards never resolve."""
    with pytest.raises(UnknownUserError, match="no user named"):
        await store.resolve_user(name)


async def test_ambiguous_first_name(store: Store) -> None:
    """A first name shared by several users asks for a username instead."""
    with pytest.raises(UnknownUserError, match="first name of 2 users"):
        await store.resolve_user("SAM")


async def test_directory_filters_by_prefix(store: Store) -> None:
    """The directory lists groups and users, filtered by a literal prefix."""
    groups, users = await store.directory("", 10)
    assert groups == ["boys", "chess"]
    assert [u for u, _ in users] == ["m.smith", "mike", "mikey", "sam2"]
    groups, users = await store.directory("mik", 10)
    assert groups == [] and [u for u, _ in users] == ["mike", "mikey"]
    assert (await store.directory("%", 10)) == ([], [])
    assert len((await store.directory("", 2))[1]) == 2


async def test_identity_is_cached(store: Store, database: Path | str) -> None:
    """identity() answers repeated handshakes without the database: a change made by
    another process shows there only once the cache expires (or is told to forget)."""
    user = await store.user_by_name("mike")
    assert user is not None
    first = await store.identity(user.id)
    assert first is not None and first[1] == ["boys", "chess"]
    other = await Store.open(database)
    try:
        await other.set_member("mike", "boys", False)
    finally:
        await other.close()
    assert await store.identity(user.id) == first
    assert await store.groups_of(user.id) == ["chess"]
    store.forget()
    again = await store.identity(user.id)
    assert again is not None and again[1] == ["chess"]
    assert await store.identity(123456) is None


async def test_new_users_invalidate_name_cache(store: Store) -> None:
    """A cached first-name answer is dropped when a new user makes it ambiguous."""
    await store.add_user("bobby", "h", first_name="Bob")
    assert await store.resolve_user("bob") == "bobby"
    await store.add_user("robert", "h", first_name="Bob")
    with pytest.raises(UnknownUserError, match="first name of 2 users"):
        await store.resolve_user("bob")


async def test_concurrent_writes_neither_undo_each_other_nor_lock_others_out(
    store: Store, database: Path | str
) -> None:
    """Many writes at once on one connection (the API's requests), failing ones among
    them, each commit or roll back whole: the end state is what was asked, and another
    process can write at once afterwards (no transaction is left open)."""
    user = await store.user_by_name("mike")
    assert user is not None
    sessions = [await store.create_session(user.id, 3600) for _ in range(5)]

    async def bad_user(n: int) -> None:
        with contextlib.suppress(StoreError):
            await store.add_user(f"new{n}", "h", groups=("chess", "nope"))

    work = [store.set_member("mike", "boys", False), store.set_password("mike", "changed")]
    work += [bad_user(n) for n in range(20)]
    work += [store.set_member("mikey", "chess", True), store.revoke_session("x")]
    await asyncio.gather(*work)
    assert [await store.session_user(s) for s in sessions] == [None] * 5
    changed = await store.user_by_name("mike")
    assert changed is not None and changed.password_hash == "changed"
    assert await store.groups_of(user.id) == ["chess"]
    assert await store.user_by_name("new0") is None
    other = await Store.open(database)
    try:
        await asyncio.wait_for(other.add_group("other"), 2)
    finally:
        await other.close()


async def test_a_session_for_a_user_deleted_meanwhile(store: Store) -> None:
    """A login racing the deletion of its user gets UnknownUserError, and the database
    takes the next write (nothing left half done)."""
    user = await store.user_by_name("mikey")
    assert user is not None
    await store.delete_user("mikey")
    with pytest.raises(UnknownUserError):
        await store.create_session(user.id, 3600)
    await asyncio.wait_for(store.add_group("after"), 2)


async def test_a_cached_answer_read_before_a_revocation_is_not_kept(store: Store) -> None:
    """A session lookup that started before a revocation does not put the old answer
    back into the cache after it."""
    user = await store.user_by_name("mike")
    assert user is not None
    session = await store.create_session(user.id, 3600)
    lookup = asyncio.ensure_future(store.session_user(session))
    await asyncio.sleep(0)  # the lookup has started reading
    await store.revoke_session(session)
    await lookup
    assert await store.session_user(session) is None


async def test_names_fold_alike_on_both_backends(store: Store) -> None:
    """Names match case-insensitively in ASCII, and exactly beyond it, on SQLite and
    PostgreSQL alike (whatever the server's collation)."""
    await store.add_user("emile", "h", first_name="Émile Zoë")
    assert await store.resolve_user("ÉMILE zoë") == "emile"
    with pytest.raises(UnknownUserError):
        await store.resolve_user("émile zoë")
    assert (await store.directory("Ém", 10))[1] == [("emile", "Émile Zoë")]
    assert (await store.directory("ém", 10))[1] == []


@pytest.mark.parametrize("name", ["mi\x00ke", "\x00", "%\x00"])
async def test_a_nul_in_a_name_finds_nothing(store: Store, name: str) -> None:
    """A name with a NUL character (PostgreSQL's text cannot hold one) is simply nobody's,
    on both backends, never a database failure."""
    assert await store.user_by_name(name) is None
    assert not await store.group_exists(name)
    assert await store.directory(name, 10) == ([], [])
    with pytest.raises(UnknownUserError):
        await store.resolve_user(name)
    assert await DatabaseCounts(store).count_failure({f"user:{name}": 5}, 60, 1.0, "a") == 0
