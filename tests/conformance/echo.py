"""A test-only ASGI echo app for the Autobahn|Testsuite fuzzingclient, accepting websockets as
wsfanout's endpoint does: through ``ServerReach`` (servers/), so that every frame goes through
wsfanout's reaches into the server that runs it (hypercorn's bounded ``Frames`` buffer and
closing wsproto connection, uvicorn's explaining websockets-sansio protocol with its sliced
parsing, the bounded permessage-deflate, the declined or accepted offer, the resets).

Every message comes back as it came (text as text, binary as binary). A message over the
frame limit is answered as wsfanout answers it: the ``too_large`` error frame, then 1009.
Settings are wsfanout's own, from the environment (``WSFANOUT_COMPRESSION``,
``WSFANOUT_MAX_FRAME_BYTES``); ``GET /healthz`` answers 200 once the app has started.
"""

from __future__ import annotations

from typing import Any

from wsfanout import protocol
from wsfanout.config import Settings
from wsfanout.servers import TOO_LARGE_KEY, ServerReach
from wsfanout.types import Message, Receive, Scope, Send


class EchoApp:
    """Echoes every websocket message; one ``ServerReach`` per app start (lifespan)."""

    def __init__(self) -> None:
        self.reach: ServerReach | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await self._echo(receive, send)
        elif kind == "http":
            ready = self.reach is not None and scope["path"] == "/healthz"
            await send(
                {
                    "type": "http.response.start",
                    "status": 200 if ready else 404,
                    "headers": [(b"content-type", b"text/plain")],
                }
            )
            await send({"type": "http.response.body", "body": b"ok\n" if ready else b""})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                settings = Settings.from_env()
                limit = settings.max_frame_bytes
                reach = ServerReach(
                    compression=settings.compression,
                    on_stopping=_nothing,
                    frame_limit=limit,
                    too_large=protocol.too_large(limit),
                )
                reach.start()
                self.reach = reach
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.reach is not None:
                    await self.reach.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _echo(self, receive: Receive, send: Send) -> None:
        reach = self.reach
        assert reach is not None, "a websocket before the lifespan startup"
        if (await receive())["type"] != "websocket.connect":
            return
        accept = reach.accept_message()
        await send(accept)
        reach.accepted(accept, receive)
        while True:
            message: Message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            if message["type"] != "websocket.receive":
                continue
            if TOO_LARGE_KEY in message:  # the server dropped a message over the limit
                await send({"type": "websocket.send", "text": reach.too_large})
                await send({"type": "websocket.close", "code": int(protocol.CloseCode.TOO_LARGE)})
                return
            echo: dict[str, Any] = {"type": "websocket.send"}
            if message.get("text") is not None:
                echo["text"] = message["text"]
            else:
                echo["bytes"] = message.get("bytes") or b""
            await send(echo)


async def _nothing() -> None:
    return None


app = EchoApp()
