"""http: path normalisation, cookies, origin checks, bodies."""

from __future__ import annotations

import asyncio

import pytest

from wsfanout import http
from wsfanout.types import Scope


@pytest.mark.parametrize(
    ("path", "root", "expected"),
    [
        ("/", "", "/"),
        ("/login", "", "/login"),
        ("//login", "", "/login"),
        ("/static/app.js", "", "/static/app.js"),
        ("/static/../setup.cfg", "", None),
        ("/static/./app.js", "", None),
        ("/a\x00b", "", None),
        ("/static\\..\\x", "", None),
        ("/chat/", "/chat", "/"),
        ("/chat/login", "/chat", "/login"),
        ("/chat", "/chat", ""),
        ("/login/", "", "/login/"),
    ],
)
def test_route_path(path: str, root: str, expected: str | None) -> None:
    """Paths are taken relative to root_path and dot segments are refused."""
    assert http.route_path({"path": path, "root_path": root}) == expected


def test_cookies_parse_leniently() -> None:
    """Cookies from several headers parse; junk pairs are skipped; first wins."""
    scope: Scope = {
        "headers": [(b"cookie", b'a=1; junk; b="2"'), (b"cookie", b"a=3; c=")],
    }
    assert http.cookies(scope) == {"a": "1", "b": "2", "c": ""}


def scope_with(
    origin: str | None,
    host: str = "chat.example:8000",
    scheme: str = "http",
    forwarded: str | None = None,
) -> Scope:
    headers = [(b"host", host.encode())]
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    if forwarded is not None:
        headers.append((b"x-forwarded-proto", forwarded.encode()))
    return {"headers": headers, "scheme": scheme}


@pytest.mark.parametrize(
    ("origin", "host", "scheme", "allowed"),
    [
        (None, "chat.example:8000", "http", True),
        ("http://chat.example:8000", "chat.example:8000", "http", True),
        ("http://chat.example:8000", "chat.example:8000", "ws", True),
        ("https://chat.example:8000/", "chat.example:8000", "wss", True),
        ("https://chat.example:8000", "chat.example:8000", "http", False),  # scheme differs
        ("http://chat.example:8000", "chat.example:8000", "https", False),
        ("http://chat.example:8000", "chat.example:8000", "wss", False),
        ("http://chat.example", "chat.example:80", "http", True),
        ("https://chat.example", "chat.example", "https", True),
        ("https://chat.example", "chat.example:443", "wss", True),
        ("https://chat.example", "chat.example:80", "https", False),  # port differs
        ("http://chat.example:8001", "chat.example:8000", "http", False),
        ("http://evil.example", "chat.example:8000", "http", False),
        ("http://chat.example:8000.evil", "chat.example:8000", "http", False),
        ("null", "chat.example:8000", "http", False),
        ("file://", "chat.example:8000", "http", False),
        ("https://friend.example", "chat.example:8000", "http", True),
    ],
)
def test_origin_allowed(origin: str | None, host: str, scheme: str, allowed: bool) -> None:
    """Same scheme, host and port (or an allowed origin) passes; anything else from a
    browser fails."""
    extra = frozenset({"https://friend.example"})
    assert http.origin_allowed(scope_with(origin, host, scheme), extra) is allowed


def test_origin_behind_a_tls_terminating_proxy_says_so_in_forwarded() -> None:
    """RFC 7239's Forwarded header works as X-Forwarded-Proto does (the first hop's)."""
    scope = scope_with("https://chat.example", "chat.example", "ws")
    scope["headers"].append((b"forwarded", b'for=1.2.3.4;proto="https", for=5.6.7.8;proto=http'))
    assert http.origin_allowed(scope, frozenset())


def test_a_scheme_mismatch_is_hinted_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refusal that differs only by scheme logs one hint about TLS proxies."""
    monkeypatch.setattr(http, "_hinted", False)
    scope = scope_with("https://chat.example", "chat.example")
    for _ in range(3):
        assert not http.origin_allowed(scope, frozenset())
    hints = [r.getMessage() for r in caplog.records if "X-Forwarded-Proto" in r.getMessage()]
    assert len(hints) == 1


@pytest.mark.parametrize(
    ("origin", "forwarded", "allowed"),
    [
        ("https://chat.example", "https", True),
        ("https://chat.example", "wss", True),
        ("https://chat.example", "HTTPS, http", True),  # the first proxy's word counts
        ("http://chat.example", "https", False),  # a page on plain http, the socket on TLS
        ("https://chat.example", "gopher", False),  # nonsense: the server's own scheme
    ],
)
def test_origin_behind_a_tls_terminating_proxy(origin: str, forwarded: str, allowed: bool) -> None:
    """Behind a proxy that ends TLS, X-Forwarded-Proto says the scheme the browser used."""
    scope = scope_with(origin, "chat.example", "ws", forwarded)
    assert http.origin_allowed(scope, frozenset()) is allowed


async def test_read_body_is_bounded() -> None:
    """A body over the limit raises BodyTooLargeError before reading it all."""
    parts = [{"type": "http.request", "body": b"x" * 10, "more_body": True}] * 5

    async def receive() -> dict[str, object]:
        return parts.pop()

    with pytest.raises(http.BodyTooLargeError):
        await http.read_body(receive, 25)


def test_session_cookie_attributes() -> None:
    """The cookie is HttpOnly, SameSite=Lax, scoped to the root, Secure on request."""
    name, value = http.session_cookie("s", "v", path="/chat/", max_age=60, secure=True)
    assert name == b"set-cookie"
    assert value == b"s=v; Path=/chat/; Max-Age=60; HttpOnly; SameSite=Lax; Secure"


async def test_read_body_times_out_on_a_trickle() -> None:
    """A body that does not finish arriving in time raises BodyTimeoutError."""

    async def receive() -> dict[str, object]:
        await asyncio.sleep(0.05)
        return {"type": "http.request", "body": b"x", "more_body": True}

    with pytest.raises(http.BodyTimeoutError):
        await http.read_body(receive, 10_000, timeout=0.3)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        (
            "chat.example:8000",
            b"connect-src 'self' ws://chat.example:8000 wss://chat.example:8000;",
        ),
        ("[::1]:8000", b"connect-src 'self' ws://[::1]:8000 wss://[::1]:8000;"),
        ("evil; script-src *", b"connect-src 'self';"),
        ("", b"connect-src 'self';"),
    ],
)
def test_page_csp_names_the_socket_origin(host: str, expected: bytes) -> None:
    """The CSP allows the page's own websocket origin, and nothing injected via Host."""
    assert expected in http.page_csp({"headers": [(b"host", host.encode())]})
