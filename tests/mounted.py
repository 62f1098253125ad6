"""A Starlette app that mounts wsfanout under /chat, as an ASGI developer would.

Starlette does not forward lifespan events to mounted apps, so wsfanout starts
itself on its first request.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from wsfanout import Settings, create_app


async def home(request: Request) -> PlainTextResponse:
    return PlainTextResponse("the host application")


app = Starlette(routes=[Route("/", home), Mount("/chat", app=create_app(Settings.from_env()))])
