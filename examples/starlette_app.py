"""A Starlette app that embeds wsfanout: its own users log in, and wsfanout believes it.

The host app owns the users, the groups, the login form and the session. wsfanout, mounted
at ``/chat``, asks the host who each websocket belongs to (``authenticate``), tells the host
when users come and go (``on_event``), and takes what the host's views publish
(``chat.publish``). The browser never holds a wsfanout cookie or token.

Run it from the repository's root, wsfanout installed (``pip install . starlette
itsdangerous python-multipart``, or ``just install``), then open http://127.0.0.1:8000/ and
log in as greg (password ``Greg``) or amanda (``Amanda``)::

    WSFANOUT_PAGES=off hypercorn --bind 127.0.0.1:8000 examples/starlette_app:app

``WSFANOUT_PAGES=off``: the host has its own pages, so wsfanout serves no page and no
``/login`` of its own; its socket (``/chat/``), its script (``/chat/static/wsfanout.js``),
its ``/chat/api/...`` and ``/chat/healthz`` stay. ``WSFANOUT_*`` variables configure it as
usual (``WSFANOUT_DATA_DIR``, ``WSFANOUT_REDIS_URL`` for several processes); ``SESSION_SECRET``
signs the host's session cookie.
"""

from __future__ import annotations

import contextlib
import hmac
import html
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.types import Scope

from wsfanout import (
    Identity,
    MessageTooLargeError,
    PublishError,
    ServiceUnavailableError,
    Settings,
    UnknownGroupError,
    UnknownUserError,
    create_app,
)


# The host's users and groups. Plain demo passwords, to keep the example short: a real app
# keeps password hashes (argon2, bcrypt) in its database and compares those.
@dataclass(frozen=True)
class User:
    password: str
    groups: tuple[str, ...]


USERS = {
    "greg": User(password="Greg", groups=("boys", "staff")),
    "amanda": User(password="Amanda", groups=("girls", "staff")),
}

# Signs the session cookie. The default is for trying the example only: set your own.
SESSION_SECRET = os.environ.get("SESSION_SECRET", "dev-only-session-secret-change-me")
SESSION_MAX_AGE = 14 * 24 * 3600  # seconds, Starlette's default; sockets end with the session


# --- wsfanout, told who the user is, and telling who comes and goes -----------------------


async def authenticate(scope: Scope) -> Identity | None:
    """Who opens this websocket (or asks ``/chat/api/directory``): the host's session user.

    SessionMiddleware wraps the whole app, the mount included, so the websocket's scope
    holds the session too. ``None`` falls through to wsfanout's own cookie and token, which
    this app does not hand out: the handshake is refused. Async, as it only reads the scope;
    a plain ``def`` (one that queries a database) would run in a worker thread.
    """
    session = scope.get("session") or {}
    username = session.get("user")
    if not isinstance(username, str) or username not in USERS:
        return None
    since = float(session.get("since", 0))
    return Identity(username, groups=USERS[username].groups, expires=since + SESSION_MAX_AGE)


# Who is online, as the hooks heard it. One process keeps it in memory; with several
# processes (WSFANOUT_REDIS_URL), each user's online and offline are told to one process
# only, so keep this in a shared store, or ask ``chat.online()`` as GET /online does too.
ONLINE: set[str] = set()


async def on_event(event: dict[str, Any]) -> None:
    """wsfanout's lifecycle events, one at a time and in order, off the message path."""
    if event["type"] == "online":  # the user's first connection, over all tabs
        ONLINE.add(event["user"])
    elif event["type"] == "offline":  # the last one closed
        ONLINE.discard(event["user"])


chat = create_app(Settings.from_env(), authenticate=authenticate, hooks=on_event)


# --- the host's own views ------------------------------------------------------------------


def current_user(request: Request) -> str | None:
    username = request.session.get("user")
    return username if username in USERS else None


def refuse(status: int, code: str, detail: str) -> JSONResponse:
    """An error answer shaped as wsfanout's API shapes its own."""
    return JSONResponse({"error": detail, "code": code}, status)


LOGIN_PAGE = """<!DOCTYPE html>
<meta charset="utf-8">
<title>Log in</title>
<h1>Log in</h1>
<p role="alert">{error}</p>
<form method="post" action="/login">
  <input name="username" aria-label="Username" placeholder="Username" autocomplete="username">
  <input name="password" aria-label="Password" placeholder="Password" type="password">
  <button type="submit">Log in</button>
</form>
"""


async def login(request: Request) -> Response:
    """GET: the form. POST: check the credentials and put the user in the session."""
    if request.method == "GET":
        return HTMLResponse(LOGIN_PAGE.format(error=""))
    form = await request.form()
    username = str(form.get("username", "")).strip().lower()
    password = str(form.get("password", ""))
    user = USERS.get(username)
    if user is None or not hmac.compare_digest(password.encode(), user.password.encode()):
        return HTMLResponse(LOGIN_PAGE.format(error="Wrong username or password."), 401)
    request.session.clear()
    request.session.update({"user": username, "since": time.time()})
    return RedirectResponse("/", 303)


async def logout(request: Request) -> Response:
    """Forget the session. (A socket already open stays until it closes: the page that
    posts this navigates away, which closes it.)"""
    request.session.clear()
    return RedirectResponse("/login", 303)


PAGE = """<!DOCTYPE html>
<meta charset="utf-8">
<title>Announcements</title>
<p>Signed in as <strong id="whoami">{username}</strong>
  · <span id="state">connecting</span></p>
<form method="post" action="/logout"><button type="submit">Log out</button></form>
<form id="announce">
  <select name="group" aria-label="To"><option value="">Everyone</option>{options}</select>
  <input name="text" aria-label="Announcement" required>
  <button type="submit">Announce</button>
</form>
<p id="error" role="alert"></p>
<ol id="messages"></ol>
<script type="module">
  import {{ Client }} from "/chat/static/wsfanout.js";

  // The socket at /chat/; the host's session cookie goes with it, and authenticate() reads it.
  const chat = new Client("/chat/");
  chat.on("state", (state, reason) => {{
    document.getElementById("state").textContent = state;
    if (state === "closed" && reason === "unauthorized") location.assign("/login");
  }});
  chat.on("message", (message) => {{
    const line = document.createElement("li");
    line.textContent = `${{message.from}}: ${{message.text}}`;  // text, never HTML
    document.getElementById("messages").append(line);
  }});
  chat.connect();

  // The form posts to the host's view, which publishes; the message comes back on the socket.
  const form = document.getElementById("announce");
  form.addEventListener("submit", async (event) => {{
    event.preventDefault();
    const fields = Object.fromEntries(new FormData(form));
    const response = await fetch("/announce", {{
      method: "POST",
      headers: {{ "content-type": "application/json" }},
      body: JSON.stringify(fields),
    }});
    const answer = await response.json();
    document.getElementById("error").textContent = response.ok ? "" : answer.error;
    if (response.ok) form.elements.text.value = "";
  }});
</script>
"""


async def home(request: Request) -> Response:
    """The page: login required."""
    username = current_user(request)
    if username is None:
        return RedirectResponse("/login", 303)
    options = "".join(
        f'<option value="{html.escape(g)}">{html.escape(g)}</option>'
        for g in USERS[username].groups
    )
    return HTMLResponse(PAGE.format(username=html.escape(username), options=options))


# What each refusal of chat.publish() becomes in this app's answers (PublishError itself: a
# bad message, 400). With authenticate, this app's own code may name any group or user, online
# or not (kept for resume): unknown_group is a name no group can have.
PUBLISH_STATUS: dict[type[PublishError], int] = {
    UnknownGroupError: 404,
    UnknownUserError: 404,
    MessageTooLargeError: 413,
    ServiceUnavailableError: 503,
}


async def announce(request: Request) -> Response:
    """POST ``{"text": ..., "group": ...}`` (JSON or a form; no group: everyone).

    The session cookie is SameSite=Lax, so another site's page cannot post here as the user.
    """
    username = current_user(request)
    if username is None:
        return refuse(401, "unauthorized", "Log in first")
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            fields = await request.json()
        except ValueError:
            fields = None
    else:
        fields = dict(await request.form())
    if not isinstance(fields, dict) or not isinstance(fields.get("text"), str):
        return refuse(400, "bad_request", 'Send {"text": "...", "group": "..."}')
    group = fields.get("group") or ""
    if not isinstance(group, str):
        return refuse(400, "bad_request", "'group' is a name")
    if group and group not in USERS[username].groups:  # the host decides who may post where
        return refuse(403, "forbidden", f"You are not in the group {group!r}")
    item: dict[str, Any] = {"type": "broadcast", "text": fields["text"], "from": username}
    if group:
        item.update(type="group", group=group)
    try:
        accepted = await chat.publish(item)
    except PublishError as exc:
        return refuse(PUBLISH_STATUS.get(type(exc), 400), exc.code, exc.detail)
    return JSONResponse({"accepted": accepted}, 202)


async def online(request: Request) -> Response:
    """Who is online: as the hooks heard it, and as wsfanout counts connections now."""
    if current_user(request) is None:
        return refuse(401, "unauthorized", "Log in first")
    try:
        connections = await chat.online(list(USERS))
    except ServiceUnavailableError as exc:  # the backplane cannot say just now
        return refuse(503, exc.code, exc.detail)
    return JSONResponse({"online": sorted(ONLINE), "connections": connections})


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    """Mount does not pass lifespan on to the mounted app: start and stop wsfanout here."""
    await chat.startup()
    try:
        yield
    finally:
        await chat.shutdown()


app = Starlette(
    routes=[
        Route("/", home),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/announce", announce, methods=["POST"]),
        Route("/online", online),
        Mount("/chat", app=chat),
    ],
    # Outside the routes, so that it wraps the mount: websockets get scope["session"] too.
    middleware=[Middleware(SessionMiddleware, secret_key=SESSION_SECRET, max_age=SESSION_MAX_AGE)],
    lifespan=lifespan,
)
