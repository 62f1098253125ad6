"""The commands that change a running node through its HTTP API (``publish``, and the user
and group verbs given ``--url``), or, without one, the database directly.

The user and group verbs that change an existing account work in one of two ways. With
``--url`` (or ``WSFANOUT_URL``) they ask that running node's admin API, which changes the
database and every node's open connections at once. Without one they change the database
directly: the nodes' caches let a running node see that only at new handshakes, within
``store.CACHE_SECONDS``, and no open connection is touched, so those commands say so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any, Final

from .. import passwords
from ..config import Settings
from ..store import CACHE_SECONDS, Store, UnknownUserError
from .command import CommandError, with_store
from .db import ask_password

URL_VARIABLE: Final = "WSFANOUT_URL"
KEY_VARIABLE: Final = "WSFANOUT_API_KEY"
API_TIMEOUT: Final = 10.0  # seconds for one admin API request
LIST_MAX: Final = 1000  # users listed at most, as the admin API allows
OFFLINE_NOTE: Final = (
    f"note: changed in the database only: running nodes apply it at new handshakes within "
    f"about {CACHE_SECONDS:g} s (revoked sessions are refused then), but open connections are "
    f"untouched; pass --url for a live change"
)


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
        asyncio.run(with_store(settings, work))
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
            with_store(settings, lambda store: store.list_users(args.prefix, LIST_MAX + 1))
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
    elif asyncio.run(with_store(settings, lambda store: store.user_by_name(args.name))) is None:
        raise UnknownUserError(args.name)
    password = ask_password(settings, args)

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
        groups = asyncio.run(with_store(settings, lambda store: store.list_groups()))
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
