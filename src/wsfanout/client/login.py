"""Logging in as a browser does, for a client that has a username and a password: ``POST
/login`` on the service's HTTP URL, keeping the session cookie for the websocket handshake.

The request is blocking ``urllib`` run in a thread: one small POST per login does not earn
an HTTP client dependency.
"""

from __future__ import annotations

import asyncio
import http.cookies
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Final

from .reconnect import parse_retry_after

LOGIN_PATH: Final = "login"
_SCHEMES: Final = {"ws": "http", "wss": "https"}


class LoginError(Exception):
    """A login that did not give a session: the server's ``status`` (None: it was not
    reached), its ``error`` text and ``Retry-After`` in seconds, if any."""

    def __init__(self, status: int | None, detail: str, retry_after: float | None = None) -> None:
        super().__init__(f"login failed ({status}): {detail}" if status else detail)
        self.status = status
        self.detail = detail
        self.retry_after = retry_after


def login_url(ws_url: str) -> str:
    """The HTTP URL of ``/login`` beside a websocket URL: same host, same path prefix
    (``ws://host/chat/`` logs in at ``http://host/chat/login``)."""
    parts = urllib.parse.urlsplit(ws_url)
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    return urllib.parse.urlunsplit(
        (_SCHEMES[parts.scheme], parts.netloc, path + LOGIN_PATH, "", "")
    )


async def log_in(
    ws_url: str,
    username: str,
    password: str,
    *,
    timeout: float,
    ssl_context: ssl.SSLContext | None = None,
) -> str:
    """Log in; the ``Cookie`` header value that carries the session.

    Raises:
        LoginError: refused (401 wrong credentials, 429 throttled with ``retry_after``, …),
            or the server was not reached (``status`` None).
    """
    return await asyncio.to_thread(_post, ws_url, username, password, timeout, ssl_context)


def _post(
    ws_url: str, username: str, password: str, timeout: float, context: ssl.SSLContext | None
) -> str:
    url = login_url(ws_url)
    body = json.dumps({"username": username, "password": password}).encode()
    request = urllib.request.Request(  # noqa: S310 - the scheme is http(s), from ws(s)
        url, data=body, method="POST", headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:  # noqa: S310
            cookies = response.headers.get_all("set-cookie") or []
    except urllib.error.HTTPError as err:
        with err:
            try:
                detail = str(json.loads(err.read()).get("error", ""))
            except (ValueError, AttributeError, OSError):
                detail = ""
            retry_after = parse_retry_after(err.headers.get("retry-after"))
        raise LoginError(err.code, detail or str(err.reason), retry_after) from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise LoginError(None, f"cannot reach {url}: {reason}") from None
    jar: http.cookies.SimpleCookie = http.cookies.SimpleCookie()
    for header in cookies:
        jar.load(header)
    if not jar:
        raise LoginError(None, f"{url} answered without a session cookie")
    return "; ".join(f"{name}={morsel.value}" for name, morsel in jar.items())
