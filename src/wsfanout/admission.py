"""Who may connect: seats, deadlines, and who a request or a handshake is.

A handshake (``Admission.admit``) is checked in this order: the service still open, the
``Origin``, the host app's ``authenticate`` (when it was given one: ``identify``), else the
credentials as far as they go without the store (a connection token, else the session
cookie: ``credentials``), the ``resume`` query, then a seat (``Seats``); nothing after the
host's answer awaits until the seat is taken, so the connection limits hold however many
handshakes run at once. Only then is the store asked whether the session is still live
(``confirm``). What fails is a ``Refusal``: an HTTP status, a label for the metrics, a
reason. An HTTP request asks the same questions through ``login``.

A connection's seat is given back only once it is closed. Its session's (or token's) end
is kept in ``Deadlines``: one task for them all, checked once a second.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from . import http, protocol
from .config import Settings
from .hub import Hub
from .metrics import Refused
from .outage import OutageLog
from .protocol import GROUP_RE, MAX_FIRST_NAME, USERNAME_RE, Position
from .sessions import COOKIE_NAME, Session, SessionCodec
from .store import DatabaseError, Store
from .tokens import Claims, TokenError, TokenVerifier
from .types import Scope, Send

log = logging.getLogger(__name__)

TOKEN_QUERY: Final = b"token="
AUTHENTICATE_TIMEOUT: Final = 10.0  # seconds the host's ``authenticate`` may take


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a handshake (or request) is, as the host app's ``authenticate(scope)`` says.

    ``username`` is case-insensitive in wsfanout (``Alice`` and ``alice`` are one user):
    give it something unique that way (a user id, with the display name as ``name``).
    ``groups`` are the user's groups (they need no row in wsfanout's store, and the admin
    API's membership changes leave them alone); ``name`` is shown to others (default: the
    username); ``expires`` (seconds since the epoch) is when the host's session ends: the
    connection is closed then with 1008, and the clients try once more (``authenticate``
    decides again); None: never.

    Raises:
        ValueError: a username, group or name wsfanout cannot carry.
    """

    username: str
    groups: Sequence[str] = ()
    name: str | None = None
    expires: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.username, str) or not USERNAME_RE.fullmatch(self.username):
            raise ValueError(
                f"Identity: {self.username!r} is not a username wsfanout takes (1 to 64 "
                "letters, digits and _.@+-, starting with a letter or digit)"
            )
        if isinstance(self.groups, str):
            raise ValueError(f"Identity: groups is a list of names, not the string {self.groups!r}")
        groups = tuple(dict.fromkeys(self.groups))
        for group in groups:
            if not isinstance(group, str) or not GROUP_RE.fullmatch(group):
                raise ValueError(
                    f"Identity: {group!r} is not a group name wsfanout takes (1 to 64 "
                    "letters, digits and _.-, starting with a letter or digit)"
                )
        object.__setattr__(self, "groups", groups)
        if self.name is not None and (
            not isinstance(self.name, str) or not 0 < len(self.name) <= MAX_FIRST_NAME
        ):
            raise ValueError(f"Identity: name must be 1 to {MAX_FIRST_NAME} characters")
        if self.expires is not None and not math.isfinite(self.expires):
            raise ValueError("Identity: expires is seconds since the epoch, or None")

    def login(self) -> Login:
        expires = math.inf if self.expires is None else float(self.expires)
        return Login(self.username, self.name or self.username, tuple(self.groups), expires, None)


Authenticate = Callable[[Scope], Awaitable["Identity | None"]]
"""The host app's ``authenticate``, made async (``App`` runs a plain function in a thread)."""


@dataclass(frozen=True, slots=True)
class Login:
    """Who a request or a connection is: a live cookie session, or a connection token."""

    username: str
    first_name: str
    groups: tuple[str, ...]
    expires_at: float
    session_id: str | None  # None: a token, or the host app's identity


class Refusal(Exception):
    """A handshake we turn down before accepting; ``label`` names it in metrics."""

    def __init__(self, status: int, label: Refused, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.label = label
        self.reason = reason


class Seats:
    """Connections this process holds, in all and per user.

    A seat is taken during the handshake before anything is awaited, and given back only
    once the connection is closed, so the limits hold however many handshakes run at once
    and count the connections still being closed.
    """

    def __init__(self, total: int, per_user: int) -> None:
        self.total = total
        self.per_user = per_user
        self.taken = 0
        self._users: dict[str, int] = {}

    def take(self, user: str) -> str | None:
        """Take a seat for this user; or say which limit is full ("total", "user")."""
        if self.taken >= self.total:
            return "total"
        key = user.lower()
        held = self._users.get(key, 0)
        if held >= self.per_user:
            return "user"
        self.taken += 1
        self._users[key] = held + 1
        return None

    def give_back(self, user: str) -> None:
        key = user.lower()
        held = self._users.get(key, 0)
        if held <= 0:
            raise RuntimeError(f"no seat of {user!r} to give back")
        self.taken -= 1
        if held == 1:
            del self._users[key]
        else:
            self._users[key] = held - 1


class Deadlines:
    """Things to expire at a time, checked once a second by one task.

    Kept in buckets of whole seconds, so tens of thousands of connections cost one task
    and no timer, handle or context each (every object a connection keeps is walked at
    each full garbage collection). An item's ``expire()`` is called at most once, about a
    second late at most.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._buckets: dict[int, set[Any]] = {}
        self._due: list[int] = []  # a heap of the buckets' seconds
        self._task: asyncio.Task[None] | None = None

    def add(self, when: float, item: Any) -> None:
        if when == math.inf:
            return  # never expires
        second = math.ceil(when)
        bucket = self._buckets.get(second)
        if bucket is None:
            bucket = self._buckets[second] = set()
            heapq.heappush(self._due, second)
        bucket.add(item)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="wsfanout-deadlines"
            )

    def discard(self, when: float, item: Any) -> None:
        if when == math.inf:
            return
        second = math.ceil(when)
        bucket = self._buckets.get(second)
        if bucket is not None:
            bucket.discard(item)
            if not bucket:
                del self._buckets[second]  # its second stays in the heap until it is due

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = self.clock()
            while self._due and self._due[0] <= now:
                for item in self._buckets.pop(heapq.heappop(self._due), ()):
                    try:
                        item.expire()
                    except Exception:
                        log.exception("expiring %r failed", item)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class Admission:
    """Who connects, and whether there is room: for the websocket handshake and for the
    HTTP handlers that need to know who asks."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        hub: Hub,
        codec: SessionCodec,
        tokens: TokenVerifier,
        outages: OutageLog,
        authenticate: Authenticate | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.hub = hub
        self.codec = codec
        self.tokens = tokens
        self.outages = outages
        self.authenticate = authenticate
        self.seats = Seats(settings.max_connections, settings.max_connections_per_user)
        self.deadlines = Deadlines(codec.clock)

    def credentials(self, scope: Scope) -> Session | Claims | None:
        """What the request presents, checked as far as it can be without the store: a
        connection token (``?token=`` or ``Authorization: Bearer``) when tokens are on and
        one is given, else the session cookie; None: neither (or a bad cookie).

        Raises:
            TokenError: a token is given, and it is refused.
        """
        session = self.codec.verify(http.cookies(scope).get(COOKIE_NAME))
        if self.tokens.enabled:
            token, in_query = _token(scope)
            if token is not None:
                try:
                    return self.tokens.verify(token)
                except TokenError:
                    # A header may be a proxy's, not the client's: a good cookie wins.
                    if in_query or session is None:
                        raise
        return session

    async def identify(self, scope: Scope) -> Login | None:
        """Who the host app's ``authenticate`` says this is; None: it does not say (or the
        app was given no ``authenticate``), and wsfanout's own credentials decide.

        Raises:
            Refusal: ``authenticate`` raised (500, logged with its traceback), answered
            something other than an ``Identity`` or None (500), or took longer than
            ``AUTHENTICATE_TIMEOUT`` (503).
        """
        authenticate = self.authenticate
        if authenticate is None:
            return None
        try:
            async with asyncio.timeout(AUTHENTICATE_TIMEOUT):
                found = await authenticate(scope)
        except TimeoutError:
            log.error("authenticate(scope) took over %g s: refused", AUTHENTICATE_TIMEOUT)
            raise Refusal(
                503, Refused.AUTHENTICATE_TIMEOUT, "could not tell who you are in time"
            ) from None
        except Exception:
            log.exception("authenticate(scope) raised: refused")
            raise Refusal(500, Refused.AUTHENTICATE_FAILED, "could not tell who you are") from None
        if found is None:
            return None
        if not isinstance(found, Identity):
            log.error("authenticate(scope) answered %r, not an Identity or None: refused", found)
            raise Refusal(500, Refused.AUTHENTICATE_FAILED, "could not tell who you are")
        if found.expires is not None and found.expires <= self.codec.clock():
            raise Refusal(403, Refused.EXPIRED, "the session has expired: log in again")
        return found.login()

    async def confirm(self, found: Session | Claims | Login) -> Login | None:
        """The login behind checked credentials; None if its session was revoked (or
        expired and pruned) or its user is gone. A token or the host's identity needs no
        store.

        Raises:
            DatabaseError: the database failed.
        """
        if isinstance(found, Login):
            return found
        if isinstance(found, Claims):
            return Login(found.username, found.name, found.groups, found.expires_at, None)
        if await self.store.session_user(found.session_id) != found.user_id:
            return None
        identity = await self.store.identity(found.user_id)
        if identity is None or identity[0].username != found.username:
            return None
        user, groups = identity
        expires_at = found.expires_at(self.settings.session_max_age)
        return Login(user.username, user.first_name, tuple(groups), expires_at, found.session_id)

    async def login(self, scope: Scope) -> Login | None:
        """Who makes this HTTP request; None: anonymous (no, a refused or a revoked login).

        Raises:
            DatabaseError: the database failed.
            Refusal: the host app's ``authenticate`` failed (``identify``).
        """
        host = await self.identify(scope)
        if host is not None:
            return host
        try:
            found = self.credentials(scope)
        except TokenError as exc:
            log.info("token refused: %s", exc.reason)
            return None
        return await self.confirm(found) if found is not None else None

    async def admit(
        self, scope: Scope
    ) -> tuple[Login, dict[str, Position] | None, tuple[str, ...], float]:
        """Check the handshake; on success a seat is taken for the login's user.

        Returns who connects (a live session's user and their groups, or a token's), what
        the client asks to resume (None: it does not), the groups to tell of the user's
        presence, and when (``time.monotonic()``) the login was checked: a revocation from
        then on must still reach the connection (``Control.changed_since``).

        Everything up to taking the seat runs without awaiting, so the connection limits
        hold however many handshakes run at once.
        """
        if self.hub.closed:
            raise Refusal(503, Refused.SHUTTING_DOWN, "the server is shutting down")
        if not http.origin_allowed(scope, self.settings.allowed_origins):
            raise Refusal(403, Refused.ORIGIN, "origin not allowed")
        found: Session | Claims | Login | None = None
        if self.authenticate is not None:
            if self.seats.taken >= self.seats.total:  # ask the host nothing when full
                raise Refusal(503, Refused.FULL, "too many connections, try again later")
            found = await self.identify(scope)
            if self.hub.closed:
                raise Refusal(503, Refused.SHUTTING_DOWN, "the server is shutting down")
        try:
            found = found or self.credentials(scope)
        except TokenError as exc:
            log.info("token refused: %s", exc.reason)  # the client is told no more than this:
            raise Refusal(403, Refused.BAD_TOKEN, "invalid token") from None
        if found is None:
            raise Refusal(403, Refused.NO_SESSION, "log in first")
        seen = resume(scope)
        username = found.username
        full = self.seats.take(username)
        if full == "total":
            raise Refusal(503, Refused.FULL, "too many connections, try again later")
        if full == "user":
            limit = self.seats.per_user
            raise Refusal(
                429, Refused.USER_FULL, f"at most {limit} connections per user: close one first"
            )
        since = time.monotonic()
        try:
            login = await self.confirm(found)
            if login is None:
                raise Refusal(403, Refused.REVOKED, "the session was revoked, or its user deleted")
            largest = self.settings.presence_events_max
            groups = list(login.groups)
            sizes = await self.store.group_sizes(groups) if largest and groups else {}
            announce = tuple(group for group in groups if sizes.get(group, largest + 1) <= largest)
        except DatabaseError as exc:
            self.seats.give_back(username)
            self.outages.failed("a websocket handshake was refused", exc)
            raise Refusal(503, Refused.DATABASE, "the database is unavailable") from None
        except BaseException:
            self.seats.give_back(username)
            raise
        return login, seen, announce, since

    async def close(self) -> None:
        """Stop checking deadlines."""
        await self.deadlines.close()


def resume(scope: Scope) -> dict[str, Position] | None:
    """The positions in the handshake's ``resume`` query parameter, if it has one.

    Raises:
        Refusal: 400, a malformed ``resume``.
    """
    query = scope.get("query_string", b"")
    if not query:
        return None
    # Other parameters are not ours to judge: decoding never fails, and only a resume
    # whose bytes were not UTF-8 (replaced by U+FFFD) is refused.
    pairs = urllib.parse.parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    values = [value for name, value in pairs if name == "resume"]
    try:
        if len(values) > 1:
            raise protocol.ResumeError("give resume once")
        if values and "\ufffd" in values[0]:
            raise protocol.ResumeError("resume is not URL-encoded UTF-8")
        return protocol.parse_resume(values[0]) if values else None
    except protocol.ResumeError as exc:
        raise Refusal(400, Refused.BAD_RESUME, str(exc)) from None


def _token(scope: Scope) -> tuple[str | None, bool]:
    """A connection token from the query (``token=``) or an ``Authorization: Bearer``, and
    whether it came from the query."""
    query: bytes = scope.get("query_string", b"")
    if TOKEN_QUERY in query:
        pairs = urllib.parse.parse_qsl(query.decode("latin-1"))
        for name, value in pairs:
            if name == "token":
                return value, True
    scheme, _, given = (http.header(scope, b"authorization") or "").strip().partition(" ")
    if scheme.lower() == "bearer" and given.strip():
        return given.strip(), False
    return None, False


async def refuse(scope: Scope, send: Send, status: int, reason: str) -> None:
    """Turn a handshake down with an HTTP status and a JSON body where the server can;
    otherwise with a close before accept (an HTTP 403)."""
    if "websocket.http.response" in scope.get("extensions", {}):
        body = protocol.encode({"error": reason}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": protocol.CloseCode.POLICY})
