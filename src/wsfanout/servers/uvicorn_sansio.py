"""uvicorn's websockets-sansio protocol, taught what hypercorn's connections are taught by
``Frames``, and to let go of a client that does not read. ``wsfanout serve`` passes it to
``uvicorn.Config(ws=...)``; under plain ``uvicorn wsfanout:app`` the uvicorn adapter makes
each of wsfanout's connections one at accept (see uvicorn.py). It needs ``websockets``.

uvicorn's websockets protocol refuses a message over ``ws_max_size`` itself (its close,
1009, is queued before the app hears of it): the app's ``too_large`` error frame is put
before that close. A message may come in at most ``Frames.MAX_PIECES`` fragments (uvicorn
keeps every one, empty ones too, until the last), else it is refused the same way. A client
with UNSENT_MAX unread is reset when it pings (uvicorn writes every pong) and when uvicorn
closes it after a refusal or an unanswered ping (uvicorn's closes are graceful: what the
client was sent would stay in the kernel, for minutes).

uvicorn parses every read whole (uvloop reads up to 256 KiB at a time) and queues every
message in it for the app, without bound and without letting other tasks run: a flood of
one-byte frames became some 37,000 queued messages per read, hundreds of MiB over a hundred
sockets and seconds of a blocked loop. Here a read is parsed ``SLICE`` bytes at a time: once
a slice has given the app a message, the rest is held (and reading stays paused) until the
app has taken every queued message (``_Inbox``, which stands in for uvicorn's queue).

Until the app has accepted the connection (``wsfanout`` is None), it is uvicorn's protocol
unchanged.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Final

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import PayloadTooBig
from websockets.frames import Frame, Opcode

from .frames import Frames
from .resets import UNSENT_MAX, unsent

if TYPE_CHECKING:
    from .reach import ServerReach

log = logging.getLogger(__package__)  # one logger for the servers package: "wsfanout.servers"

PARTS: Final = (
    "handle_parser_exception",
    "handle_cont",
    "handle_ping",
    "keepalive_timeout",
    "data_received",
)
"""The methods of uvicorn's protocol this class extends (checked at start)."""

STATE: Final = ("conn", "frames", "close_sent", "transport", "disconnected", "queue", "read_paused")
"""What it reads of a connection's state (checked per connection)."""

SLICE: Final = 4096  # bytes of a read parsed at a time, once the app has accepted


class _Inbox(asyncio.Queue):  # type: ignore[type-arg]
    """uvicorn's queue of a connection's ASGI events, which asks its protocol to parse more of
    what it holds each time the app has taken the last queued event."""

    def __init__(self, protocol: ExplainingSansIOProtocol) -> None:
        super().__init__()
        self.protocol = protocol

    def get_nowait(self) -> object:
        message = super().get_nowait()
        if not self.qsize() and self.protocol.held:
            self.protocol.parse_held()
        return message


class ExplainingSansIOProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol that explains its refusals and resets clients
    that leave too much unread, once the app's reach has accepted the connection."""

    wsfanout: ServerReach | None = None  # the app that accepted this connection
    held = b""  # what a read brought that is not parsed yet
    held_at = 0  # how much of it is parsed

    def adopt(self, reach: ServerReach) -> None:
        """The app has accepted this connection: serve it as its own."""
        inbox = _Inbox(self)
        queue = self.queue
        while not queue.empty():
            inbox.put_nowait(queue.get_nowait())
        self.queue = inbox
        self.wsfanout = reach
        # Plain uvicorn built this protocol as its own class (the adapter has just changed
        # it): uvloop's transport keeps the ``data_received`` it found at the start, and
        # takes this class's once given the protocol again.
        self.transport.set_protocol(self)

    def data_received(self, data: bytes) -> None:
        if self.wsfanout is None:
            super().data_received(data)
            return
        if self.held:
            self.held = self.held[self.held_at :] + data
            self.held_at = 0
        else:
            self.held = data
        self.parse_held()

    def parse_held(self) -> None:
        """Parse what is held, a slice at a time, until a slice queues an event for the app;
        hold the rest, with reading paused, until the app has taken every queued event."""
        data, start = self.held, self.held_at
        queue, transport = self.queue, self.transport
        while start < len(data):
            end = start + SLICE
            self.held_at = end
            super().data_received(data[start:end])
            start = end
            if queue.qsize() or transport.is_closing():
                break
        if start >= len(data) or transport.is_closing():
            self.held, self.held_at = b"", 0
        elif not self.read_paused:
            self.read_paused = True
            transport.pause_reading()

    def handle_parser_exception(self) -> None:
        reach = self.wsfanout
        if reach is not None and isinstance(self.conn.parser_exc, PayloadTooBig):
            self._explain(reach)
        super().handle_parser_exception()
        if reach is not None:
            self._reset_if_unread(reach)

    def handle_cont(self, event: Frame) -> None:
        reach = self.wsfanout
        if reach is None or len(self.frames) < Frames.MAX_PIECES or self.close_sent:
            super().handle_cont(event)
            return
        self.frames = []
        conn = self.conn
        conn.fail(1009, f"a message in more than {Frames.MAX_PIECES} fragments")
        if conn.close_sent is not None:  # else the client's close came first
            self._explain(reach)
            super().handle_parser_exception()
            self._reset_if_unread(reach)

    def handle_ping(self) -> None:
        reach = self.wsfanout
        if reach is not None:
            # websockets queued the pong; uvicorn writes it whatever the client leaves unread.
            if self.transport.is_closing():
                return
            if unsent(self.transport) > UNSENT_MAX:
                log.info("reset a connection that pings but does not read")
                reach.abort(self)
                return
        super().handle_ping()

    def keepalive_timeout(self) -> None:
        super().keepalive_timeout()
        reach = self.wsfanout
        if reach is not None:
            self._reset_if_unread(reach)

    def _reset_if_unread(self, reach: ServerReach) -> None:
        """uvicorn's closes are graceful: what a client that does not read was sent stays
        in the kernel, for minutes. Past UNSENT_MAX, reset instead."""
        if unsent(self.transport) > UNSENT_MAX:
            reach.abort(self)

    def _explain(self, reach: ServerReach) -> None:
        """Put the app's ``too_large`` frame before the 1009 close uvicorn queued."""
        if not reach.too_large:
            return
        try:
            conn = self.conn
            frame = Frame(Opcode.TEXT, reach.too_large.encode())
            conn.writes.insert(0, frame.serialize(mask=False, extensions=conn.extensions))
        except Exception as exc:  # websockets changed: the close goes out alone
            reach.broke("frames", exc)
