"""The admin API's handlers: users, groups, memberships and sessions, over HTTP (DESIGN 5.3).

Each route is an ``AdminRoute``: a coroutine of the service, the request's scope (the
router puts the path's parameters in ``path_params``) and the parsed JSON body, returning a
status and a body (or raising ``ApiError`` or one of the store's errors). ``route()``
wraps one into an ASGI handler that does what they all share: the bearer key (the same keys
as ``POST /api/publish``), reading and parsing a bounded body, and turning the store's
refusals into statuses. Every error is ``{"error": text, "code": code}``; the OpenAPI
document (``openapi.json``, served at ``/api/openapi.json``) says which route answers what.

A change takes effect on open connections through ``Control.make``: here at once, and
on every other node through the backplane, within a second.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, Final
from urllib.parse import parse_qs

from . import http, passwords
from .hub import UnavailableError
from .protocol import USERNAME_RE
from .service import Service
from .store import (
    DatabaseError,
    DuplicateError,
    StoreError,
    UnknownGroupError,
    UnknownUserError,
)
from .types import Receive, Scope, Send

log = logging.getLogger(__name__)

BODY_LIMIT: Final = 64 * 1024
MAX_GROUPS: Final = 1000
LIST_LIMIT: Final = 100  # users listed when no limit is given ...
LIST_MAX: Final = 1000  # ... and at most
# What the store's refusals answer (the first that fits)
REFUSALS: Final = (
    (UnknownUserError, 404, "unknown_user"),
    (UnknownGroupError, 404, "unknown_group"),
    (DuplicateError, 409, "conflict"),
    (StoreError, 400, "invalid_name"),
)

Handler = Callable[[Scope, Receive, Send, Service], Awaitable[None]]
AdminRoute = Callable[[Service, Scope, Any], Awaitable[tuple[int, Any]]]


class ApiError(Exception):
    """An answer other than success: its status, its code and a text for people."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


def route(handler: AdminRoute, *, body: bool = False) -> Handler:
    """An ASGI handler for an admin route: key, body (when ``body``), errors."""

    async def serve(scope: Scope, receive: Receive, send: Send, svc: Service) -> None:
        if not await http.api_key_ok(scope, send, svc.settings.api_keys):
            return
        data = None
        if body:
            ok, data = await http.read_json(receive, send, BODY_LIMIT)
            if not ok:
                return
        try:
            status, answer = await handler(svc, scope, data)
        except ApiError as exc:
            await http.api_error(send, exc.status, exc.code, exc.detail)
            return
        except StoreError as exc:
            status, code = next((s, c) for kind, s, c in REFUSALS if isinstance(exc, kind))
            await http.api_error(send, status, code, str(exc))
            return
        except UnavailableError as exc:
            await http.api_error(send, 503, "unavailable", f"done, but not everywhere yet: {exc}")
            return
        except DatabaseError as exc:
            svc.outages.failed(f"{scope['method']} {scope['path']} failed", exc)
            await http.api_error(send, 503, "unavailable", "the database is unavailable, try again")
            return
        if status == 204:
            await http.respond(send, 204, b"", None)
        else:
            await http.json_response(send, status, answer)

    return serve


def _object(data: Any, fields: dict[str, type[Any]], required: tuple[str, ...]) -> dict[str, Any]:
    """The body as an object whose known fields have their types.

    Raises:
        ApiError: 400, not an object, a required field missing, or a field of another type.
    """
    if not isinstance(data, dict):
        raise ApiError(400, "bad_request", "send a JSON object")
    for name in required:
        if name not in data:
            raise ApiError(400, "bad_request", f"{name!r} is required")
    for name, kind in fields.items():
        if name in data and not isinstance(data[name], kind):
            raise ApiError(400, "bad_request", f"{name!r} must be a {_NAMES[kind]}")
    return data


_NAMES: Final[dict[type[Any], str]] = {str: "string", list: "list"}


def _param(scope: Scope, name: str) -> str:
    """A parameter of the route's path (the router puts them in ``path_params``)."""
    value: str = scope["path_params"][name]
    return value


def _password(svc: Service, data: dict[str, Any]) -> str:
    password: str = data["password"]
    problem = passwords.length_problem(password, svc.settings.min_password_length)
    if problem is not None:
        raise ApiError(400, "invalid_name", problem)
    return password


async def _hash(password: str) -> str:
    return await asyncio.to_thread(passwords.hash_password, password)


async def _user_answer(svc: Service, username: str) -> dict[str, Any]:
    user = await svc.store.user_by_name(username)
    if user is None:
        raise UnknownUserError(username)
    groups = await svc.store.groups_of(user.id)
    return {"username": user.username, "first_name": user.first_name, "groups": groups}


# Users


async def create_user(svc: Service, scope: Scope, data: Any) -> tuple[int, Any]:
    fields: dict[str, type[Any]] = {
        "username": str,
        "password": str,
        "first_name": str,
        "groups": list,
    }
    data = _object(data, fields, ("username", "password"))
    groups = data.get("groups", [])
    if len(groups) > MAX_GROUPS or not all(isinstance(g, str) for g in groups):
        raise ApiError(400, "bad_request", f"'groups' is a list of at most {MAX_GROUPS} names")
    password = _password(svc, data)
    username = data["username"]
    if await svc.store.user_by_name(username) is not None:  # before spending on the hash
        raise DuplicateError("user", username)
    await svc.store.add_user(
        username,
        await _hash(password),
        first_name=data.get("first_name", ""),
        groups=tuple(dict.fromkeys(groups)),
    )
    return 201, await _user_answer(svc, username)


async def list_users(svc: Service, scope: Scope, data: Any) -> tuple[int, Any]:
    query = parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1"), True)
    prefix = (query.get("q") or [""])[0][:64]
    raw = (query.get("limit") or [str(LIST_LIMIT)])[0]
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= LIST_MAX:
        raise ApiError(400, "bad_request", f"limit is a whole number from 1 to {LIST_MAX}")
    limit = int(raw)
    users = await svc.store.list_users(prefix, limit + 1)
    return 200, {
        "users": [{"username": u, "first_name": f} for u, f in users[:limit]],
        "truncated": len(users) > limit,
    }


async def get_user(svc: Service, scope: Scope, data: Any) -> tuple[int, Any]:
    return 200, await _user_answer(svc, _param(scope, "username"))


async def delete_user(svc: Service, scope: Scope, data: Any) -> tuple[int, Any]:
    user = await svc.store.delete_user(_param(scope, "username"))
    await svc.control.make({"op": "revoke", "user": user.username, "session": None})
    return 204, None


async def set_password(svc: Service, scope: Scope, data: Any) -> tuple[int, Any]:
    password = _password(svc, _object(data, {"password": str}, ("password",)))
    username = _param(scope, "username")
    if await svc.store.user_by_name(username) is None:  # before spending on the hash
        raise UnknownUserError(username)
    user = await svc.store.set_password(username, await _hash(password))
    await svc.control.make({"op": "revoke", "user": user.username, "session": None})
    return 204, None


async def disconnect(svc: Service, scope: Scope, data: Any) -> tuple[int, Any]:
    """Revoke every session of the user and close their sockets everywhere. With tokens
    on (or the host app's ``authenticate``), a user with no row (a token's ``sub``, the
    host's identity) is disconnected too."""
    username = _param(scope, "username")
    try:
        username = (await svc.store.revoke_user_sessions(username)).username
    except UnknownUserError:
        if not (svc.publishing.outside and USERNAME_RE.fullmatch(username)):
            raise
    await svc.control.make({"op": "revoke", "user": username, "session": None})
    return 204, None


async def set_member(member: bool, svc: Service, scope: Scope, data: Any) -> tuple[int, Any]:
    """PUT (``member``) or DELETE of a membership; both idempotent."""
    group = _param(scope, "group")
    user, changed = await svc.store.set_member(_param(scope, "username"), group, member)
    if changed:  # the lifecycle hooks (DESIGN 12): once, from the node that changed it
        svc.hooks.emit("joined" if member else "left", user.username, group=group)
    await svc.control.make({"op": "member", "user": user.username})
    return 204, None


# Groups


async def create_group(svc: Service, scope: Scope, data: Any) -> tuple[int, Any]:
    name = _object(data, {"name": str}, ("name",))["name"]
    await svc.store.add_group(name)
    return 201, {"name": name, "members": 0}


async def list_groups(svc: Service, scope: Scope, data: Any) -> tuple[int, Any]:
    groups = await svc.store.list_groups()
    return 200, {"groups": [{"name": name, "members": count} for name, count in groups]}


async def delete_group(svc: Service, scope: Scope, data: Any) -> tuple[int, Any]:
    group = _param(scope, "name")
    for member in await svc.store.delete_group(group):
        svc.hooks.emit("left", member, group=group)
    await svc.control.make({"op": "group_deleted", "group": group})
    return 204, None


# The document


@functools.cache
def _openapi() -> bytes:
    return resources.files("wsfanout").joinpath("openapi.json").read_bytes()


async def openapi(scope: Scope, receive: Receive, send: Send, svc: Service) -> None:
    """The OpenAPI 3.1 document of every ``/api/`` route."""
    await http.respond(send, 200, _openapi(), b"application/json")


ROUTES: Final[dict[str, dict[str, Handler]]] = {
    "/api/users": {"GET": route(list_users), "POST": route(create_user, body=True)},
    "/api/users/{username}": {"GET": route(get_user), "DELETE": route(delete_user)},
    "/api/users/{username}/password": {"PUT": route(set_password, body=True)},
    "/api/users/{username}/groups/{group}": {
        "PUT": route(functools.partial(set_member, True)),
        "DELETE": route(functools.partial(set_member, False)),
    },
    "/api/users/{username}/disconnect": {"POST": route(disconnect)},
    "/api/groups": {"GET": route(list_groups), "POST": route(create_group, body=True)},
    "/api/groups/{name}": {"DELETE": route(delete_group)},
    "/api/openapi.json": {"GET": openapi},
}
