"""wsfanout: a pure-ASGI websocket fan-out service.

``create_app(settings)`` builds the ASGI app. The module-level ``app`` (for
``hypercorn wsfanout:app``) reads its settings from ``WSFANOUT_*`` environment
variables when the server first calls it, not at import.
"""

from __future__ import annotations

import logging

from .admission import Identity
from .app import App, create_app
from .config import ConfigError, Settings, variable_warnings
from .protocol import CloseCode
from .publishing import (
    MessageTooLargeError,
    PublishError,
    ServiceUnavailableError,
    UnknownGroupError,
    UnknownUserError,
)
from .types import Receive, Scope, Send
from .webhooks import verify as verify_webhook

__all__ = [
    "App",
    "Identity",
    "MessageTooLargeError",
    "PublishError",
    "ServiceUnavailableError",
    "Settings",
    "UnknownGroupError",
    "UnknownUserError",
    "app",
    "create_app",
    "verify_webhook",
]
__version__ = "0.1.0"


class EnvApp:
    """An ASGI app built from ``Settings.from_env()`` on its first call."""

    def __init__(self) -> None:
        self._app: App | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._app is None:
            from .cli import configure_logging

            try:
                settings = Settings.from_env()
            except ConfigError as exc:
                await _refuse_to_start(str(exc), scope, receive, send)
                return
            configure_logging(settings.log_level)
            for line in variable_warnings():
                logging.getLogger("wsfanout").warning("%s", line)
            self._app = create_app(settings)
            self._app.owns_process = True  # WSFANOUT_GC=auto tunes the collector (collector.py)
        await self._app(scope, receive, send)


async def _refuse_to_start(problem: str, scope: Scope, receive: Receive, send: Send) -> None:
    """A setting is unusable: fail lifespan startup with it (the server stops and says
    why), or answer 500 where the server does not run lifespan."""
    logging.getLogger("wsfanout").error("cannot start: %s", problem)
    if scope["type"] == "lifespan":
        await receive()  # lifespan.startup
        await send({"type": "lifespan.startup.failed", "message": f"wsfanout: {problem}"})
    elif scope["type"] == "http":
        body = b'{"error":"the service is misconfigured"}'
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 500, "headers": headers})
        await send({"type": "http.response.body", "body": body})
    elif scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": CloseCode.INTERNAL_ERROR})


# Shadows the ``wsfanout.app`` submodule on purpose: ``wsfanout:app`` is the ASGI app.
app = EnvApp()
