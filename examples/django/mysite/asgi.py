"""The ASGI application: wsfanout under /ws/, Django for the rest.

Serve it with ``hypercorn mysite.asgi:application`` (README.md).
"""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

from wsfanout.types import Receive, Scope, Send

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
django_app = get_asgi_application()  # sets Django up: import models and views after it

from mysite.chat import chat  # noqa: E402

MOUNT = "/ws"


async def application(scope: Scope, receive: Receive, send: Send) -> None:
    """Lifespan and everything under /ws/ to wsfanout; other http requests to Django."""
    if scope["type"] == "lifespan":  # Django's handler refuses lifespan; wsfanout starts on it
        await chat(scope, receive, send)
        return
    # As Starlette's Mount does: the path stays whole, and root_path grows by the mount, so
    # that wsfanout sees its websocket at /ws/ and its files at /ws/static/.
    root = scope.get("root_path", "")
    below = scope["path"].removeprefix(root)
    if below == MOUNT or below.startswith(MOUNT + "/"):
        await chat({**scope, "root_path": root + MOUNT}, receive, send)
    elif scope["type"] == "http":
        await django_app(scope, receive, send)
    else:  # a websocket elsewhere: Django's handler would raise; refuse it before accept (403)
        await send({"type": "websocket.close", "code": 1008})
