"""The marks wsfanout puts on ASGI messages for its server's adapter (servers ignore keys
they do not know, and middleware passes them on), and the messages an adapter hands the app
on the server's behalf."""

from __future__ import annotations

from typing import Final

from ..types import Message

ACCEPT_KEY: Final = "wsfanout.server"
"""The key in wsfanout's ``websocket.accept`` messages that carries its hypercorn adapter."""

STREAM_KEY: Final = "wsfanout.stream"
"""Set by the wrapped hypercorn accept in the accept message it was given: the app's handle
for ``ServerReach.abort`` (absent when middleware copied the message, or not under hypercorn)."""

TOO_LARGE_KEY: Final = "wsfanout.too_large"
"""Marks the ``websocket.receive`` that stands for a frame over the limit (its data dropped)."""

TOO_LARGE: Final[Message] = {
    "type": "websocket.receive",
    "bytes": None,
    "text": None,
    TOO_LARGE_KEY: True,
}
"""What the app receives instead of a message over the limit (hand it on as a copy)."""

GONE: Final[Message] = {"type": "websocket.disconnect", "code": 1006}
"""What the app receives when the server ended a connection without telling it (a copy)."""
