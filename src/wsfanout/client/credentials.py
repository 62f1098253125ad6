"""What a client shows at each handshake: a token (given, or from ``get_token()`` before every
attempt), or the session cookie it got by logging in with a username and password.

After an auth refusal the connection renews once: ``get_token()`` again, or a new login.
A client given a fixed token, or nothing, has nothing to renew.
"""

from __future__ import annotations

import inspect
import ssl
from collections.abc import Awaitable, Callable

from .login import log_in

TokenSource = Callable[[], "str | Awaitable[str | None] | None"]


class NoCredential(Exception):
    """``get_token()`` gave no token: the application has none to give."""


class Credentials:
    """One client's way of proving who it is."""

    def __init__(
        self,
        url: str,
        *,
        username: str | None,
        password: str | None,
        token: str | None,
        get_token: TokenSource | None,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        if (username is None) != (password is None):
            raise ValueError("give username and password together")
        if sum(given is not None for given in (username, token, get_token)) > 1:
            raise ValueError("give one of username and password, token, get_token")
        self._url = url
        self._username, self._password = username, password
        self._token, self._get_token = token, get_token
        self._ssl = ssl_context
        self._cookie: str | None = None

    @property
    def renewable(self) -> bool:
        """Whether a refused credential can be replaced by a new one."""
        return self._get_token is not None or self._username is not None

    async def handshake(self, renew: bool, timeout: float) -> tuple[dict[str, str], dict[str, str]]:
        """The handshake's headers and query parameters; ``renew``: the last credential was
        refused, get a new one.

        Raises:
            NoCredential: ``get_token()`` returned no token.
            LoginError: the login was refused, or the server was not reached.
            Exception: whatever ``get_token()`` raised.
        """
        if self._get_token is not None:
            token = self._get_token()
            if inspect.isawaitable(token):
                token = await token
            if not token:
                raise NoCredential("get_token() gave no token")
            return {}, {"token": token}
        if self._token is not None:
            return {}, {"token": self._token}
        if self._username is not None and self._password is not None:
            if renew or self._cookie is None:
                self._cookie = None
                self._cookie = await log_in(
                    self._url,
                    self._username,
                    self._password,
                    timeout=timeout,
                    ssl_context=self._ssl,
                )
            return {"Cookie": self._cookie}, {}
        return {}, {}
