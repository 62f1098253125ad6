"""Bounded frames: a message buffer that never holds more than the app's frame limit, and a
permessage-deflate that never inflates more than it.

Hypercorn buffers a message up to its own limit (16 MiB unless told), answers a larger one
with a bare 1009, and then goes on buffering whatever the client still sends (a frame
declaring 1 TiB grew the server by 1 GB in 5 s). On wsfanout's streams its buffer becomes
``Frames``: past the limit (or past ``MAX_PIECES`` pieces, which uvicorn's adapter applies
to fragments too) it drops everything the client sends and hands the app a
``websocket.receive`` marked with ``TOO_LARGE_KEY``, so the app sends its ``too_large``
error frame and closes with 1009 whatever the frame's size. With compression on, the
connection's ``PerMessageDeflate`` becomes ``bounded_deflate()``'s class, which inflates no
more than that limit per message (a 0.5 MB deflate bomb otherwise inflates 1000-fold first).
"""

from __future__ import annotations

import asyncio
import functools
import zlib
from typing import Any, Final

from ..types import Message
from .keys import TOO_LARGE


class Frames:
    """Stands in for hypercorn's ``WebsocketBuffer`` on a wsfanout stream: the same three
    methods, but it never holds more than ``limit`` (characters of text, bytes of binary)
    in at most ``JOIN_EVERY`` pieces, and a message may come in at most ``MAX_PIECES``.

    Past either bound it drops the message so far and everything the client sends after
    it, and hands the app a ``TOO_LARGE`` receive (the app answers with ``too_large``,
    closes with 1009, and resets the connection if the client goes on; later messages of
    the client end as such receives too, which the closing app drops).
    """

    MAX_PIECES: Final = 4096  # a message arriving in more pieces (fragments, reads) is refused
    JOIN_EVERY: Final = 64  # pieces held before they are joined into one

    __slots__ = ("_stream", "_telling", "length", "limit", "parts", "pieces", "refused", "reset")

    def __init__(self, stream: Any, limit: int) -> None:
        self._stream = stream
        self._telling: asyncio.Task[Any] | None = None
        self.limit = limit
        self.length = 0
        self.pieces = 0
        self.parts: list[Any] = []
        self.refused = False
        self.reset = False  # the app reset the connection: hypercorn is to stop parsing

    def extend(self, event: Any) -> None:
        if self.refused:
            if self.reset:
                # Hypercorn's own way out of its parsing loop (its buffer raises this past
                # its limit): it stops at this frame rather than parse what it had read ahead.
                from hypercorn.protocol.ws_stream import FrameTooLargeError

                raise FrameTooLargeError
            return
        data = event.data
        self.length += len(data)
        self.pieces += 1
        if self.length > self.limit or self.pieces > self.MAX_PIECES:
            self.refuse()
            return
        parts = self.parts
        parts.append(data)
        if len(parts) >= self.JOIN_EVERY:  # tiny fragments: keep one object, not thousands
            parts[:] = [_join(parts)]

    def refuse(self) -> None:
        """Drop the message and all that follows; tell the app."""
        if self.refused:
            return
        self.refused = True
        self.parts = []
        # Called from hypercorn's synchronous parsing; its queue to the app is awaited.
        put = self._stream.app_put(dict(TOO_LARGE))
        self._telling = asyncio.get_running_loop().create_task(put)

    def clear(self) -> None:
        self.parts.clear()
        self.length = self.pieces = 0

    def to_message(self) -> Message:
        if self.refused:
            return dict(TOO_LARGE)
        parts = self.parts
        if not parts:
            return {"type": "websocket.receive", "bytes": None, "text": None}
        data = _join(parts)
        if isinstance(data, str):
            return {"type": "websocket.receive", "bytes": None, "text": data}
        return {"type": "websocket.receive", "bytes": data, "text": None}


def _join(parts: list[Any]) -> Any:
    """One str or bytes from a message's pieces (the piece itself when there is one)."""
    if isinstance(parts[0], str):
        return "".join(parts)
    return b"".join(parts)


@functools.cache
def bounded_deflate() -> type:
    """wsproto's ``PerMessageDeflate``, inflating no more than the frame limit per message."""
    from wsproto.extensions import PerMessageDeflate
    from wsproto.frame_protocol import CloseReason

    class BoundedDeflate(PerMessageDeflate):
        wsfanout_frames: Frames
        wsfanout_left: int

        def frame_inbound_payload_data(self, proto: Any, data: bytes) -> bytes | CloseReason:
            if not self._inbound_compressed or not self._inbound_is_compressible:
                return data
            frames = self.wsfanout_frames
            if frames.refused:
                return b""  # dropped unread: the connection is closing
            decompressor = self._decompressor
            if decompressor is None:  # not set up by frame_inbound_header: wsproto decides
                return super().frame_inbound_payload_data(proto, data)
            left = self.wsfanout_left
            try:
                out = decompressor.decompress(bytes(data), left + 1)
            except zlib.error:
                return CloseReason.INVALID_FRAME_PAYLOAD_DATA
            if len(out) > left:
                frames.refuse()
                return b""
            self.wsfanout_left = left - len(out)
            return out

        def frame_inbound_complete(self, proto: Any, fin: bool) -> bytes | CloseReason | None:
            frames = self.wsfanout_frames
            if frames.refused:
                if fin:  # what was inflated is gone; so is the state a next message would need
                    self._inbound_compressed = None
                    self._decompressor = None
                return None
            result = super().frame_inbound_complete(proto, fin)
            if fin:
                left, self.wsfanout_left = self.wsfanout_left, frames.limit
                if isinstance(result, bytes) and len(result) > left:
                    frames.refuse()
                    return None
            return result

    return BoundedDeflate
