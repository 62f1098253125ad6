"""uvicorn's websockets-sansio protocol, taught what hypercorn's connections are taught by
``Frames``, and to let go of a client that does not read. ``wsfanout serve`` passes it to
``uvicorn.Config(ws=...)``; under plain ``uvicorn wsfanout:app`` the uvicorn adapter makes
each of wsfanout's connections one at accept (see uvicorn.py). It needs ``websockets``.

uvicorn's websockets protocol refuses a message over ``ws_max_size`` itself (its close,
1009, is queued before the app hears of it): the app's ``too_large`` error frame is put
before that close. A message may come in no more fragments than ``too_many_pieces`` allows
(frames.py; uvicorn keeps every one, empty ones too, until the last), else it is refused the
same way. A client with UNSENT_MAX unread is reset when it pings (uvicorn writes every pong)
and when uvicorn closes it after a refusal or an unanswered ping (uvicorn's closes are
graceful: what the client was sent would stay in the kernel, for minutes). A text message
that is not UTF-8 is closed with 1007 as uvicorn closes it, but logged in one line
(frames.py's ``FAILED``) where uvicorn logged a traceback per message. A client's close
between two fragments of a message is taken as a close, its code echoed (websockets failed
the connection with 1002, where RFC 6455 allows control frames between fragments).

uvicorn parses every read whole (uvloop reads up to 256 KiB at a time) and queues every
message in it for the app, without bound and without letting other tasks run: a flood of
one-byte frames became some 37,000 queued messages per read, hundreds of MiB over a hundred
sockets and seconds of a blocked loop. Here a read is parsed a slice at a time: once a slice
has given the app a message, the rest is held (and reading stays paused) until the app has
taken every queued message (``_Inbox``, which stands in for uvicorn's queue). A slice is
``SLICE`` bytes (a few dozen of a flood's 7-byte frames: 4 KiB held 585, 2 ms of parsing per
connection, and a hundred flooding connections made one turn of the loop 200 ms), doubled
for each slice that gave no message, up to ``SLICE_MAX`` (a large message is not parsed in
hundreds of pieces). A connection whose messages average ``TINY`` bytes or more gets a
slice twice as large next time, up to ``SLICE_MAX``: held at 256 bytes, a client sending
ordinary messages paused and resumed every message or two (12% more server CPU per
delivery in the groups benchmark). Nothing more is parsed once the connection is closing
(reset: a flood).

Until the app has accepted the connection (``wsfanout`` is None), it is uvicorn's protocol
unchanged, except in two ways. Its 101 answer waits for the welcome (``hold``): the two go out
in one write, as one TCP segment, not two (a send through the kernel's whole loopback path
each: a twentieth of a handshake's CPU, and one read less for the client). And the request
h11 has parsed is handed over parsed (``upgrade``): uvicorn wrote it out as bytes again, for
websockets to parse a second time (a browser's dozen headers: about a tenth of a handshake's
CPU). Where websockets would not take the request as h11 did (not a GET, a body, too many
headers, a line too long, a control character in a value: upgrade.py's ``parsed``), it gets
the bytes and answers as before.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import TYPE_CHECKING, Any, Final

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import PayloadTooBig
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import OPEN, Protocol

from ..protocol import CloseCode
from ..types import Message
from .frames import FAILED, client_text, frame_of, too_many_pieces
from .quiet import logs_accepts
from .resets import UNSENT_MAX, unsent
from .upgrade import parsed, upgrade_head

if TYPE_CHECKING:
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from .reach import ServerReach

log = logging.getLogger(__package__)  # one logger for the servers package: "wsfanout.servers"

PARTS: Final = (
    "connection_lost",
    "handle_parser_exception",
    "handle_cont",
    "handle_ping",
    "keepalive_timeout",
    "data_received",
    "send_receive_event_to_app",
    "send",
    "handle_events",
    "start_keepalive",
)
"""The methods of uvicorn's protocol this class extends (checked at start)."""

STATE: Final = (
    "connections",
    "loop",
    "conn",
    "request",
    "response",
    "frames",
    "close_sent",
    "transport",
    "disconnected",
    "curr_msg_data_type",
    "client",
    "queue",
    "read_paused",
    "writable",
    "disconnected",
    "handshake_complete",
    "initial_response",
    "default_headers",
    "logger",
)
"""What it reads of a connection's state (checked at the first connection)."""

SLICE: Final = 256  # bytes of a read parsed at a time, once the app has accepted ...
SLICE_MAX: Final = 65536  # ... doubled up to this while slices give the app no message
TINY: Final = 64  # bytes per message under which a connection's slices stay at SLICE


class _Held:
    """A connection's transport while its 101 waits for the welcome (``hold``): what is
    written is kept, to go out in one write with the next frame ``write_now`` writes, or at
    the loop's next iteration, whichever comes first (after that iteration's I/O poll: what
    uvicorn writes as it reads meanwhile, a pong, a close, comes here too, behind the 101).
    The rest is the transport's. What is kept when the transport is already closing (the
    client sent its handshake and left) is dropped, in ``close`` as in ``release``."""

    __slots__ = ("data", "transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.data: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.data.append(data)

    def close(self) -> None:
        _write(self.transport, self.data)
        self.transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


def hold(protocol: WebSocketsSansIOProtocol) -> None:
    """Keep what ``protocol`` writes (its 101, about to be sent) until the welcome's frame,
    or the end of this turn of the loop (``release``)."""
    held = _Held(protocol.transport)
    protocol.transport = held  # type: ignore[assignment]  # what uvicorn calls of it
    protocol.loop.call_soon(release, protocol, held)


def release(protocol: WebSocketsSansIOProtocol, held: _Held, frame: bytes = b"") -> None:
    """Write what ``hold`` kept (and ``frame`` after it) in one write; the transport is
    the protocol's own again."""
    current: Any = protocol.transport
    if current is held:
        protocol.transport = held.transport
    if frame:
        held.data.append(frame)
    _write(held.transport, held.data)


def _write(transport: asyncio.Transport, data: list[bytes]) -> None:
    """What ``hold`` kept, in one write (none once the transport is closing), emptied."""
    if data and not transport.is_closing():
        transport.write(data[0] if len(data) == 1 else b"".join(data))
    data.clear()


class _Inbox:
    """uvicorn's queue of a connection's ASGI events (what uvicorn calls of it: ``put_nowait``,
    ``get``, ``empty``), which asks its protocol to parse more of what it holds each time the
    app has taken the last queued event. A list and at most one waiter (the app's
    ``receive``): ``asyncio.Queue`` holds three deques, about 2 KiB per idle connection."""

    __slots__ = ("_events", "_waiter", "protocol")

    def __init__(self, protocol: ExplainingSansIOProtocol) -> None:
        self.protocol: ExplainingSansIOProtocol | None = protocol  # None once the client left
        self._events: list[object] = []  # a few at most: parse_held stops at the first
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, event: object) -> None:
        self._events.append(event)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def qsize(self) -> int:
        return len(self._events)

    def empty(self) -> bool:
        return not self._events

    def get_nowait(self) -> object:
        events = self._events
        if not events:
            raise asyncio.QueueEmpty
        message = events.pop(0)
        protocol = self.protocol
        if not events and protocol is not None and protocol.held:
            protocol.parse_held()
        return message

    async def get(self) -> object:
        while not self._events:
            protocol = self.protocol  # its loop: asyncio's get_running_loop() asks getpid()
            loop = protocol.loop if protocol is not None else asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        return self.get_nowait()


class ExplainingSansIOProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol that explains its refusals and resets clients
    that leave too much unread, once the app's reach has accepted the connection."""

    wsfanout: ServerReach | None = None  # the app that accepted this connection
    held = b""  # what a read brought that is not parsed yet
    held_at = 0  # how much of it is parsed
    slice_size = SLICE  # this connection's next slice: larger while its messages are not tiny
    message_size = 0  # bytes of the fragmented message arriving (from its second fragment)

    @classmethod
    def upgrade_at_once(cls, http: H11Protocol, data: bytes) -> bool:
        """A connection's first read, a browser's handshake whole, upgraded as ``upgrade``
        would upgrade it once h11 had read it, without h11 (``upgrade_head``). False: h11
        must read it (and ``upgrade`` may yet take it)."""
        found = upgrade_head(data)
        return found is not None and cls.upgrade(http, b"GET", *found)

    @classmethod
    def upgrade(
        cls, http: H11Protocol, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]
    ) -> bool:
        """uvicorn's ``H11Protocol.handle_websocket_upgrade``, where websockets would take the
        request as h11 parsed it (``parsed``): a protocol of this class takes the connection
        over, and is handed the request parsed (``take``). False: it was not, and uvicorn's
        own hands it over as bytes, for websockets to parse (and refuse as it does); so too
        where uvicorn's logger logs at DEBUG (its trace of the upgrade, and websockets' of
        the parse, on the same logger)."""
        if http.logger.isEnabledFor(logging.DEBUG):
            return False
        request = parsed(method, target, headers)
        if request is None:
            return False
        http.connections.discard(http)
        protocol = cls(http.config, http.server_state, http.app_state, _loop=http.loop)
        protocol.connection_made(http.transport)
        http.transport.set_protocol(protocol)
        protocol.take(request)
        return True

    def take(self, request: Request) -> None:
        """Handle the handshake request as ``data_received`` does its bytes, parsed."""
        conn = self.conn
        # What websockets' ServerProtocol.parse does once it has parsed a request: the event,
        # then its frame parser (Protocol.parse) for what follows.
        parser = Protocol.parse(conn)
        next(parser)
        conn.parser = parser
        conn.events.append(request)
        self.handle_events()

    async def send(self, message: Any) -> None:
        if (
            message["type"] != "websocket.accept"
            or self.handshake_complete
            or self.initial_response is not None
            or self.disconnected
            or not self.writable.is_set()
            or logs_accepts(self.logger)  # uvicorn's builds the line and logs it
        ):
            await super().send(message)
            return
        # uvicorn's accept, without building its log line's arguments where it is not
        # logged, nor its headers through MutableMapping.update (a fifth of its cost).
        headers = self.response.headers
        del headers["Date"]  # websockets' own: uvicorn's default headers have one
        for name, value in (*self.default_headers, *message.get("headers", ())):
            headers[name.decode("latin-1").lower()] = value.decode("latin-1")
        subprotocol = message.get("subprotocol")
        if subprotocol:
            headers["Sec-WebSocket-Protocol"] = subprotocol
        if not self.transport.is_closing():
            self.handshake_complete = True
            self.conn.send_response(self.response)
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.start_keepalive()

    def adopt(self, reach: ServerReach) -> None:
        """The app has accepted this connection: serve it as its own."""
        inbox = _Inbox(self)
        queue = self.queue
        while not queue.empty():
            inbox.put_nowait(queue.get_nowait())
        self.queue = inbox  # type: ignore[assignment]  # what uvicorn calls of a queue
        self.wsfanout = reach
        # The handshake as websockets parsed it, and the answer sent: uvicorn reads neither
        # once the connection is accepted, and a browser's headers held twice (these, and the
        # scope's) were a fifth of an idle connection's memory. websockets' parser keeps the
        # request for the connection's life (a local of its generator): emptied, its headers
        # (a list per name) go too.
        request = self.request
        if request is not None:
            request.headers.clear()
        self.request = self.response = None  # type: ignore[assignment]
        conn = self.conn
        if hasattr(conn, "current_size"):  # else websockets changed: its own closes
            close = functools.partial(_close_between_fragments, conn, conn.recv_frame)
            conn.recv_frame = close  # type: ignore[method-assign]
        # Plain uvicorn built this protocol as its own class (the adapter has just changed
        # it): uvloop's transport keeps the ``data_received`` it found at the start, and
        # takes this class's once given the protocol again.
        self.transport.set_protocol(self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.wsfanout is not None:
            # What adopt() made refers back to this protocol (and its websockets connection):
            # let go, so that a closed connection is freed as its last reference goes, not at
            # the collector's next full pass (with tens of thousands held, a rare one).
            conn = self.conn
            vars(conn).pop("recv_frame", None)
            failed = getattr(conn, "parser_exc", None)  # its traceback's frame holds conn
            if failed is not None:
                failed.__traceback__ = None
            if isinstance(self.queue, _Inbox):
                self.queue.protocol = None

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
        size = self.slice_size
        while start < len(data) and not transport.is_closing():
            end = start + size
            self.held_at = end
            super().data_received(data[start:end])
            parsed, start = min(end, len(data)) - start, end
            events = queue.qsize()
            if events:
                # A client sending messages of a usual size gets larger slices (fewer pauses
                # per message); a flood of tiny frames stays at SLICE.
                self.slice_size = min(size * 2, SLICE_MAX) if parsed >= TINY * events else SLICE
                break
            size = min(size * 2, SLICE_MAX)
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
        frames = self.frames
        if reach is None or self.close_sent:
            super().handle_cont(event)
            return
        # uvicorn starts a message's list with its first frame: its bytes so far, counted
        # from there (summing the list at every fragment would be quadratic).
        size = len(frames[0]) if len(frames) == 1 else self.message_size
        self.message_size = size = size + len(event.data)
        if not too_many_pieces(len(frames) + 1, size):
            super().handle_cont(event)
            return
        self.frames = []
        conn = self.conn
        conn.fail(1009, f"a message in {len(frames) + 1} fragments of {size} bytes")
        if conn.close_sent is not None:  # else the client's close came first
            self._explain(reach)
            super().handle_parser_exception()
            self._reset_if_unread(reach)

    def send_receive_event_to_app(self) -> None:
        # uvicorn decodes a text message here and answers invalid UTF-8 with 1007 after
        # logging a traceback: one per message. Checked first, the close is the same and
        # the log one line.
        if self.wsfanout is not None and self.curr_msg_data_type == "text" and not self.close_sent:
            problem = _not_utf8(self.frames)
            if problem:
                self.frames = []
                code = CloseCode.INVALID_DATA
                log.info(FAILED, code, client_text(self.client), problem)
                self.conn.fail(code, "invalid UTF-8")
                if self.conn.close_sent is not None:  # else the client's close came first
                    self.handle_parser_exception()
                return
        super().send_receive_event_to_app()

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

    def write_now(self, message: Message) -> bool:
        """Send a ``websocket.send`` text message as ``send`` would, without a coroutine,
        writing the frame the last call built when it is the same message (every recipient of
        a broadcast is sent the same one, one after another: its frame is built once). False
        where the fast way does not apply (deflate negotiated, not open, closing, a
        fragmented message under way, or the transport's buffer full: ``send`` waits for
        it to drain, and the outbox's writer bounds that wait): send it through ``send``."""
        conn = self.conn
        if (
            not self.writable.is_set()
            or self.disconnected
            or self.close_sent
            or conn.extensions
            or conn.expect_continuation_frame
            or conn.state is not OPEN
            or conn.debug
        ):
            return False
        frame = frame_of(message)
        if frame is None:
            return False
        transport: Any = self.transport
        if type(transport) is _Held:  # the 101 waits for this, the welcome
            release(self, transport, frame)
        else:
            transport.write(frame)
        return True

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


def _close_between_fragments(conn: Any, recv_frame: Any, frame: Frame) -> None:
    """websockets' ``recv_frame``, taking a client's close between two fragments of a message
    as a close (its code echoed, the message dropped), as RFC 6455 allows control frames
    there: websockets failed the connection with 1002 (Autobahn's case 7.1.5)."""
    if frame.opcode is Opcode.CLOSE:
        conn.current_size = None  # no message arriving: the close ends it unfinished
    recv_frame(frame)


def _not_utf8(frames: list[Any]) -> str:
    """Why a text message's fragments are not UTF-8 ("" if they are)."""
    data = frames[0] if len(frames) == 1 else b"".join(frames)
    if data.isascii():  # the common case, checked in C without decoding
        return ""
    try:
        bytes(data).decode()
    except UnicodeDecodeError as exc:
        return str(exc)
    return ""
