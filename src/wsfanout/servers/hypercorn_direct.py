"""The hypercorn adapter's direct write: ``WSStream.write_now``, outbox.py's ``DirectWriter``,
added to hypercorn's class once, when this module is imported (hypercorn.py imports it).

Theory of operation. Under hypercorn one frame to one client is the app's ``send`` (a
coroutine), ``WSStream.app_send``, wsproto building the frame, ``H11Protocol.stream_send``
and ``TCPServer.protocol_send``, which takes the connection's send lock, writes, and awaits
``drain``: four coroutines and a lock, per recipient of every message, most of a delivery's
server CPU. When nothing can be in the way, the same bytes can go to the transport at once:
the stream connected and not closed, wsproto's connection open with no extension in use
(permessage-deflate declined, as wsfanout declines it unless compression is on) and no
fragmented message under way, an HTTP/1.1 connection (under HTTP/2 a stream's frames are
the h2 connection's to write), its send lock free (nothing half-sent), its transport open
with nothing buffered (``drain`` would not wait). Then ``write_now`` writes the frame
(``frames.frame_of``: built once for the recipients of the same message) and says True;
else False, and the outbox sends through ``send`` as before, whose wait its writer bounds.
``ServerReach.direct`` gives it only to connections whose app ``send`` is the stream's own.

What it reads of hypercorn and wsproto is checked at import (``check``: the problem, or "");
a connection whose parts are not where they were is sent through ``send``.
"""

from __future__ import annotations

from typing import Any, Final

from ..types import Message
from .frames import frame_of


def _install() -> str:
    """Give ``WSStream`` its ``write_now``. Returns the problem, or "" when done."""
    try:
        from hypercorn.protocol.h11 import H11Protocol
        from hypercorn.protocol.ws_stream import ASGIWebsocketState, WSStream
        from wsproto import ConnectionType
        from wsproto.connection import Connection, ConnectionState
    except ImportError as exc:
        return str(exc)
    probe = Connection(ConnectionType.SERVER)
    proto = getattr(probe, "_proto", None)
    if getattr(probe, "_state", None) is not ConnectionState.OPEN or proto is None:
        return "wsproto's Connection has no _state or _proto"
    if getattr(proto, "_outbound_opcode", 0) is not None or getattr(proto, "extensions", 0) != []:
        return "wsproto's FrameProtocol has no _outbound_opcode or extensions"
    connected, open_ = ASGIWebsocketState.CONNECTED, ConnectionState.OPEN

    def write_now(stream: Any, message: Message) -> bool:
        try:
            if stream.closed or stream.state is not connected:
                return False
            connection = stream.connection
            proto = connection._proto
            if (
                connection._state is not open_
                or proto.extensions
                or proto._outbound_opcode is not None
            ):
                return False
            protocol = stream.send.__self__
            if not isinstance(protocol, H11Protocol):
                return False
            sender: Any = protocol.send  # TCPServer.protocol_send
            server = sender.__self__
            if server.send_lock.locked():
                return False
            transport = server.writer.transport
        except AttributeError:
            return False
        if transport.is_closing() or transport.get_write_buffer_size():
            return False
        frame = frame_of(message)
        if frame is None:
            return False
        transport.write(frame)
        return True

    WSStream.write_now = write_now  # type: ignore[attr-defined]
    return ""


def check() -> str:
    """Why hypercorn's streams have no ``write_now`` ("": they have)."""
    return _INSTALLED


_INSTALLED: Final = _install()
