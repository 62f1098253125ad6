"""wsfanout: a pure-ASGI websocket fan-out service.

``create_app(settings)`` builds the ASGI app. The module-level ``app`` (for
``hypercorn wsfanout:app``) reads its settings from ``WSFANOUT_*`` environment
variables when the server first calls it, not at import.
"""

from __future__ import annotations

from .app import App, create_app
from .config import Settings
from .types import Receive, Scope, Send

__all__ = ["App", "Settings", "app", "create_app"]
__version__ = "0.1.0"


class EnvApp:
    """An ASGI app built from ``Settings.from_env()`` on its first call."""

    def __init__(self) -> None:
        self._app: App | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._app is None:
            from .cli import configure_logging

            settings = Settings.from_env()
            configure_logging(settings.log_level)
            self._app = create_app(settings)
        await self._app(scope, receive, send)


# Shadows the ``wsfanout.app`` submodule on purpose: ``wsfanout:app`` is the ASGI app.
app = EnvApp()
