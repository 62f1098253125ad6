"""Bounded frames: a message buffer that never holds more than the app's frame limit, and a
permessage-deflate that never inflates more than it.

Hypercorn buffers a message up to its own limit (16 MiB unless told), answers a larger one
with a bare 1009, and then goes on buffering whatever the client still sends (a frame
declaring 1 TiB grew the server by 1 GB in 5 s). On wsfanout's streams its buffer becomes
``Frames``: past the limit (or in too many pieces, ``too_many_pieces``, which uvicorn's
adapter applies to fragments too) it drops everything the client sends and hands the app a
``websocket.receive`` marked with ``TOO_LARGE_KEY``, so the app sends its ``too_large``
error frame and closes with 1009 whatever the frame's size. With compression on, the
connection's ``PerMessageDeflate`` becomes ``bounded_deflate()``'s class, which inflates no
more than that limit per message (a 0.5 MB deflate bomb otherwise inflates 1000-fold first).

Invalid frames. When a client's data cannot be parsed (invalid UTF-8 in a text message, a
protocol error), wsproto hands hypercorn a close event with the code RFC 6455 asks for
(1007, 1002, ...) but sends nothing itself, and hypercorn sends a close frame only in answer
to a client's: the connection ended without one (the client saw 1006). A connection of
``closing_connection()``'s class puts itself, for such a close, in the state hypercorn
answers: the client gets the code, and the log one line (``FAILED``). uvicorn_sansio.py
does the same under uvicorn, whose own answer to invalid UTF-8 was a traceback per message.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import struct
import weakref
import zlib
from collections.abc import Generator
from typing import Any, Final

from ..types import Message
from .keys import TOO_LARGE

log = logging.getLogger(__package__)  # one logger for the servers package: "wsfanout.servers"

FAILED: Final = "closed a websocket with %d, from %s: %s"  # a client's invalid data, logged
_INVALID_UTF8: Final = bytes([0x81, 0x81, 0, 0, 0, 0, 0xFF])  # a masked text frame: 1 bad byte

# ``frame_of``'s last frame: the message it was built for (kept alive with it) and its bytes.
# One tuple, read and replaced whole: servers in several threads of one process share it.
_last: tuple[Message | None, bytes] = (None, b"")


def frame_of(message: Message) -> bytes | None:
    """A ``websocket.send`` text message as a server writes it (one frame, unmasked, no
    extension), or None (not text). The frame the last call built, when it is the same
    message: every recipient of a broadcast is sent the same one, one after another
    (flusher.py's ``Flusher.batch``), and its frame is built once (the servers' ``write_now``)."""
    global _last
    last, frame = _last
    if message is last:
        return frame
    text = message.get("text")
    if not isinstance(text, str):
        return None
    payload = text.encode()
    size = len(payload)
    if size < 126:
        head = bytes((0x81, size))
    elif size < 65536:
        head = struct.pack("!BBH", 0x81, 126, size)
    else:
        head = struct.pack("!BBQ", 0x81, 127, size)
    frame = head + payload
    _last = (message, frame)
    return frame


class Frames:
    """Stands in for hypercorn's ``WebsocketBuffer`` on a wsfanout stream: the same three
    methods, but it never holds more than ``limit`` (characters of text, bytes of binary)
    in at most ``JOIN_EVERY`` pieces, and a message may come in no more pieces than
    ``too_many_pieces`` allows.

    Past either bound it drops the message so far and everything the client sends after
    it, and hands the app a ``TOO_LARGE`` receive (the app answers with ``too_large``,
    closes with 1009, and resets the connection if the client goes on; later messages of
    the client end as such receives too, which the closing app drops).
    """

    # A message may come in MAX_PIECES pieces (fragments, and reads of a frame), and in one
    # more per PIECE_SIZE characters or bytes of it: empty or one-byte fragments, which cost
    # a frame's parsing each and bring nothing, end at about MAX_PIECES; a large message
    # arriving in small reads or fragments (Autobahn's 4 MiB in 64-byte fragments, 1 MiB
    # read 64 bytes at a time) is not refused for it.
    MAX_PIECES: Final = 4096
    PIECE_SIZE: Final = 16
    JOIN_EVERY: Final = 64  # pieces held before they are joined into one

    __slots__ = ("_stream", "_telling", "length", "limit", "parts", "pieces", "refused", "reset")

    def __init__(self, stream: Any, limit: int) -> None:
        # Weak: the stream holds this buffer, and a cycle is freed only by the collector.
        self._stream = weakref.ref(stream)
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
        if self.length > self.limit or too_many_pieces(self.pieces, self.length):
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
        stream = self._stream()
        if stream is None:  # hypercorn parses only for a stream it holds
            return
        # Called from hypercorn's synchronous parsing; its queue to the app is awaited.
        put = stream.app_put(dict(TOO_LARGE))
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


def too_many_pieces(pieces: int, length: int) -> bool:
    """Whether a message of ``length`` so far (characters of text, bytes of binary) has come
    in too many pieces (fragments, or reads of a frame): see ``Frames.MAX_PIECES``."""
    return pieces > Frames.MAX_PIECES + length // Frames.PIECE_SIZE


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


@functools.cache
def closing_connection() -> type:
    """wsproto's ``Connection`` that sends the close frame wsproto asks for when it cannot
    parse what the client sent (hypercorn sends none): a connection becomes one at accept."""
    from wsproto.connection import Connection, ConnectionState
    from wsproto.events import CloseConnection, Event

    class ClosingConnection(Connection):
        wsfanout_client: object = None  # the client's address, for the log (None: no log)
        # The close code the client sent (or wsproto's, for what it could not parse):
        # hypercorn tells the app 1006 for any close the client starts.
        wsfanout_code: int | None = None

        def events(self) -> Generator[Event, None, None]:
            for event in super().events():
                if isinstance(event, CloseConnection):
                    self.wsfanout_code = event.code
                # Only wsproto's failure to parse yields a close while the connection is
                # still open (a client's close frame changes the state first). Hypercorn
                # answers a close event in REMOTE_CLOSING with the same code: take it there.
                if isinstance(event, CloseConnection) and self._state is ConnectionState.OPEN:
                    if self.wsfanout_client is not None:
                        client = client_text(self.wsfanout_client)
                        log.info(FAILED, event.code, client, event.reason)
                    self._state = ConnectionState.REMOTE_CLOSING
                yield event

    return ClosingConnection


def check_closing_connection() -> str:
    """Does a connection of ``closing_connection()``'s class answer invalid UTF-8 with a
    close hypercorn sends? ("" if so)"""
    try:
        from wsproto.connection import Connection, ConnectionState, ConnectionType
        from wsproto.events import CloseConnection

        connection = Connection(ConnectionType.SERVER)
        connection.__class__ = closing_connection()
        connection.receive_data(_INVALID_UTF8)
        events = list(connection.events())
        if connection.state is not ConnectionState.REMOTE_CLOSING:
            return f"invalid UTF-8 left wsproto's connection {connection.state!r}"
        close = events[0] if len(events) == 1 else None
        if not isinstance(close, CloseConnection) or close.code != 1007:
            return f"invalid UTF-8 made wsproto yield {events!r}"
        connection.send(close.response())  # what hypercorn sends
    except Exception as exc:  # any change in wsproto's Connection is a broken reach
        return f"wsproto's Connection changed: {exc!r}"
    return ""


def client_text(client: object) -> str:
    """A connection's client address (ASGI's ``(host, port)``) for a log line."""
    if isinstance(client, tuple) and len(client) == 2:
        return f"{client[0]}:{client[1]}"
    return str(client)
