"""Small request and response helpers: bounded bodies, cookies, origins, JSON and files."""

from __future__ import annotations

import asyncio
import hmac
import logging
import posixpath
import re
from collections.abc import Iterable
from typing import Any, Final
from urllib.parse import urlsplit

import orjson

from .types import Receive, Scope, Send

Headers = list[tuple[bytes, bytes]]

log = logging.getLogger(__name__)

SECURITY_HEADERS: Final[Headers] = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
]
_CSP: Final = (
    "default-src 'self'; connect-src 'self'{sockets}; img-src 'self' data:; "
    "style-src 'self'; script-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'self'"
)
_HOST_RE: Final = re.compile(r"[A-Za-z0-9.\-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


def page_csp(scope: Scope) -> bytes:
    """The pages' Content-Security-Policy. It names the page's own websocket origin,
    which not every browser counts as ``'self'``."""
    host = header(scope, b"host") or ""
    sockets = f" ws://{host} wss://{host}" if _HOST_RE.fullmatch(host) else ""
    return _CSP.format(sockets=sockets).encode()


class BodyTooLargeError(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than {limit} bytes")
        self.limit = limit


class ClientGoneError(Exception):
    """The client disconnected before its request body arrived."""


class BodyTimeoutError(Exception):
    def __init__(self, seconds: float) -> None:
        super().__init__(f"the request body did not arrive within {seconds:g} seconds")


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of a (lower-case) header, decoded as latin-1."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def cookies(scope: Scope) -> dict[str, str]:
    """The request's cookies; malformed pairs are skipped, the first of a name wins."""
    jar: dict[str, str] = {}
    for key, value in scope.get("headers", ()):
        if key != b"cookie":
            continue
        for pair in bytes(value).decode("latin-1").split(";"):
            name, sep, val = pair.strip().partition("=")
            if sep and name and name not in jar:
                jar[name] = val.strip().strip('"')
    return jar


def route_path(scope: Scope) -> str | None:
    """The path below the app's root, normalised; None if it is not one we could serve.

    ``..`` and ``.`` segments and NUL bytes are refused rather than resolved, so no
    request can name a path outside what the router knows.
    """
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    if not path:
        return ""
    if "\x00" in path or "\\" in path:
        return None
    segments = path.split("/")
    if any(segment in {".", ".."} for segment in segments):
        return None
    # normpath keeps a leading "//" (POSIX allows it a meaning); we do not.
    normal = posixpath.normpath("/" + path.lstrip("/")) if path.startswith("/") else path
    if path.endswith("/") and normal != "/":
        normal += "/"
    return normal if normal.startswith("/") else None


def app_root(scope: Scope) -> str:
    """Where the app is mounted, with a trailing slash: the cookie path."""
    root: str = scope.get("root_path", "")
    return root.rstrip("/") + "/"


def origin_allowed(scope: Scope, allowed: frozenset[str]) -> bool:
    """Whether a browser's ``Origin`` is the request's own origin (scheme, host and port)
    or an allowed origin.

    A request with no ``Origin`` is not from a browser page and passes: the check
    exists because browsers attach cookies to cross-site requests. The request's own
    scheme is what a TLS-terminating proxy says in ``X-Forwarded-Proto`` (a browser page
    cannot set that header on a websocket handshake or a form post), else the server's.
    """
    origin = header(scope, b"origin")
    if origin is None:
        return True
    origin = origin.strip().rstrip("/")
    if origin in allowed:
        return True
    host = header(scope, b"host")
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    if host is None or parts.scheme not in {"http", "https"} or not parts.netloc:
        return False
    same = _same_host(parts.scheme, parts.netloc.lower(), host.strip().lower())
    scheme = request_scheme(scope)
    if same and parts.scheme != scheme:
        _hint_scheme(origin, scheme)
        return False
    return same


_hinted = False


def _hint_scheme(origin: str, scheme: str) -> None:
    """Once per process: a refusal that differs only by scheme is most often a TLS proxy
    that does not say so."""
    global _hinted
    if not _hinted:
        _hinted = True
        log.warning(
            "refused Origin %s: this request came over %s. Behind a proxy that ends TLS, "
            "have it send X-Forwarded-Proto (or list the origin in WSFANOUT_ALLOWED_ORIGINS)",
            origin,
            scheme,
        )


_WEB_SCHEMES: Final = {"http": "http", "https": "https", "ws": "http", "wss": "https"}


def request_scheme(scope: Scope) -> str:
    """``http`` or ``https``: how the browser reached us, through a proxy if it says so
    (``X-Forwarded-Proto``, or ``proto=`` in RFC 7239's ``Forwarded``; the first hop's)."""
    said = header(scope, b"x-forwarded-proto")
    if not said:
        forwarded = header(scope, b"forwarded")
        if forwarded:
            for pair in forwarded.split(",")[0].split(";"):
                name, _, value = pair.partition("=")
                if name.strip().lower() == "proto":
                    said = value.strip().strip('"')
    if said:
        scheme = _WEB_SCHEMES.get(said.split(",")[0].strip().lower())
        if scheme is not None:
            return scheme
    return _WEB_SCHEMES.get(scope.get("scheme", "http"), "http")


def _same_host(scheme: str, origin_netloc: str, host: str) -> bool:
    default = ":443" if scheme == "https" else ":80"
    if origin_netloc == host:
        return True
    # "example.com" and "example.com:80" name the same place.
    return origin_netloc + default == host or origin_netloc == host + default


async def read_body(receive: Receive, limit: int, timeout: float = 10.0) -> bytes:
    """The whole request body.

    Raises:
        BodyTooLargeError: it is longer than ``limit``.
        BodyTimeoutError: it takes longer than ``timeout`` seconds (a trickling client).
        ClientGoneError: the client left first.
    """
    try:
        return await asyncio.wait_for(_read_body(receive, limit), timeout)
    except TimeoutError:
        raise BodyTimeoutError(timeout) from None


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGoneError
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLargeError(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes | None,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """Send a complete response (``content_type`` None: it has no content, and says no
    length either, as a 204 must not)."""
    all_headers: Headers = [
        *(
            [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
            if content_type is not None
            else []
        ),
        *SECURITY_HEADERS,
        *headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body})


async def json_response(
    send: Send, status: int, data: Any, headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    body = orjson.dumps(data)
    await respond(
        send, status, body, b"application/json", [(b"cache-control", b"no-store"), *headers]
    )


async def error_response(
    send: Send, status: int, message: str, headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    """A JSON ``{"error": message}`` answer."""
    await json_response(send, status, {"error": message}, headers)


async def redirect(send: Send, location: str, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    await respond(send, 303, b"", b"text/plain", [(b"location", location.encode()), *headers])


def session_cookie(
    name: str, value: str, *, path: str, max_age: int, secure: bool
) -> tuple[bytes, bytes]:
    """A ``set-cookie`` header; ``max_age=0`` with an empty value clears it."""
    parts = [f"{name}={value}", f"Path={path}", f"Max-Age={max_age}", "HttpOnly", "SameSite=Lax"]
    if secure:
        parts.append("Secure")
    return b"set-cookie", "; ".join(parts).encode("latin-1")


# The API's answers (admin.py and the publish view share them)

UNAUTHORIZED: Final[Headers] = [(b"www-authenticate", b'Bearer realm="wsfanout"')]


async def api_error(
    send: Send, status: int, code: str, detail: str, headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    """The API's error answer: ``{"error": detail, "code": code}``."""
    await json_response(send, status, {"error": detail, "code": code}, headers)


def bearer_ok(authorization: str | None, keys: tuple[str, ...]) -> bool:
    """Whether ``Authorization`` holds one of these keys as a bearer token."""
    scheme, _, given = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return False
    presented = given.strip().encode()
    # Compare against every key, whatever matches, so timing says nothing.
    matches = [hmac.compare_digest(presented, key.encode()) for key in keys]
    return any(matches)


async def api_key_ok(scope: Scope, send: Send, keys: tuple[str, ...]) -> bool:
    """Check the API's bearer key; if it is not good, answer (404: the API is off; 401)."""
    if not keys:
        await api_error(send, 404, "not_found", "the API is off: set WSFANOUT_API_KEYS")
        return False
    if not bearer_ok(header(scope, b"authorization"), keys):
        detail = "a valid 'Authorization: Bearer <key>' is needed"
        await api_error(send, 401, "unauthorized", detail, UNAUTHORIZED)
        return False
    return True


async def read_json(receive: Receive, send: Send, limit: int) -> tuple[bool, Any]:
    """Read and parse a JSON body; on failure answer (400, 408, 413) and return False.
    A client that leaves meanwhile is not answered."""
    try:
        body = await read_body(receive, limit)
    except BodyTooLargeError as exc:
        await api_error(send, 413, "too_large", str(exc))
        return False, None
    except BodyTimeoutError as exc:
        await api_error(send, 408, "timeout", str(exc))
        return False, None
    except ClientGoneError:
        return False, None
    try:
        return True, orjson.loads(body)
    except orjson.JSONDecodeError:
        await api_error(send, 400, "bad_json", "the body is not valid JSON")
        return False, None
