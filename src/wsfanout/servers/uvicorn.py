"""The uvicorn adapter: every reach into uvicorn. Where ``wsfanout serve`` builds the server
it is configured, not patched: ``uvicorn.Config(http=HeadTimedH11Protocol,
ws=ExplainingSansIOProtocol)`` and ``DrainingServer`` (a ``uvicorn.Server`` that drains
the app before its own shutdown). Under plain ``uvicorn wsfanout:app`` the same is done to
the running server at the app's start, as uvicorn offers no other door: its config's h11
protocol class is replaced, its ``shutdown`` wrapped on the instance, and each connection
becomes an ``ExplainingSansIOProtocol`` at accept. The drain of each worker of ``wsfanout
serve --workers N`` is the runtime one too: uvicorn's ``Multiprocess`` builds a plain
``uvicorn.Server`` per worker and takes no server class (the config's classes reach the
workers as they are).

Theory of operation. The running ``uvicorn.Server`` is found through the SIGTERM handler
it installs while it serves (a bound method of the server), at app start:

- Its config is read by every new connection, so the app writes its own settings there:
  ``ws_per_message_deflate`` follows ``WSFANOUT_COMPRESSION`` and ``ws_max_size`` is the frame
  limit. uvicorn's websockets protocol (websockets' sans-I/O core) then declines deflate,
  refuses a larger message from its header alone, and inflates no more than the limit.
- On SIGTERM, before uvicorn's own shutdown (which closes every websocket with 1012 at
  once): stop listening, drain each app started in it (1001), reset its websockets still
  open a second later (clients that do not read: uvicorn would wait for them). uvicorn's
  handlers only record a signal; a SIGINT repeated during the drain is the same stop, not
  uvicorn's "force exit", which would skip the app's lifespan shutdown.
- Its h11 protocol is ``HeadTimedH11Protocol``: a connection gets ``WSFANOUT_HEAD_TIMEOUT``
  to send a whole request head (uvicorn waits forever), and the body's time is bounded too
  (uvicorn reads a body for as long as it trickles, after the answer too); it is counted in
  the per-address caps of the ``Peers`` the app leaves in the config (peers.py): from
  ``connection_made`` (over a cap it is reset there) to ``connection_lost``, or, once
  upgraded, to its websocket protocol's ``connection_lost`` (wrapped on that instance: the
  transport tells only the protocol it was handed to). It waits, for the caps, until h11
  has read its request whole, head and body. Under httptools (no bound on a head at all,
  and no count) a warning says so.
- Pings are uvicorn's (``ws_ping_interval``, a timer per connection, gone with it).
- Per connection, under the ``websockets-sansio`` protocol, ``receive`` is a method of the
  connection's protocol object: ``accepted`` takes it as the handle for ``abort`` (its
  transport) and tells it which app it serves (uvicorn_sansio.py: the ``too_large`` frame
  before uvicorn's 1009, the bound on fragments, the resets of clients that do not read).
  A client that sends data before the handshake's answer leaves no ghost there: uvicorn
  tells the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import TYPE_CHECKING, Any, Final

import h11
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import Server

from .checks import is_method
from .peers import Peer, PeerLimits, Peers
from .resets import reset

if TYPE_CHECKING:
    from .reach import ServerReach
    from .uvicorn_sansio import ExplainingSansIOProtocol

log = logging.getLogger(__package__)  # one logger for the servers package: "wsfanout.servers"

PEERS: Final = "_wsfanout_peers"  # on uvicorn's config: the Peers of its connections
H11_PARTS: Final = (
    "connection_made",
    "connection_lost",
    "data_received",
    "handle_websocket_upgrade",
    "on_response_complete",
)
"""The methods of uvicorn's h11 protocol ``HeadTimedH11Protocol`` extends (checked at start)."""
STRAGGLERS_WAIT: Final = 1.0  # seconds after a drain for closes to be answered
_DRAINS: Final = "__wsfanout_drains__"  # on a wrapped uvicorn shutdown: the apps to drain
_LEFT_TO_UVICORN: Final = (
    "frames over the limit get a bare 1009, and clients that do not read keep their TCP "
    "connection after their close"
)

Drain = Callable[[], Awaitable[None]]


class HeadTimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection that has not sent a whole request head
    in time (uvicorn waits forever: a few thousand half-sent requests would hold every file
    descriptor of the process), and counting each connection in the per-address caps of the
    ``Peers`` the app left in the server's config (peers.py): over a cap it is reset at once;
    it waits until its request is whole, head and body, and a body has its own timeout."""

    head_timer: asyncio.TimerHandle | None = None
    peer: Peer | None = None  # this connection's place in its address's counts
    first_read = True  # no byte of the connection read yet

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        peers: Peers | None = getattr(self.config, PEERS, None)  # None until the app starts
        if peers is not None:
            self.peer = peers.arrive(transport.get_extra_info("peername"), transport)
            if self.peer is None:  # its address holds too much already
                reset(transport)
                return
        self._wait_for_head(self._head_timeout(peers))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
        if self.peer is not None:
            self.peer.left()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.first_read:
            self.first_read = False
            # A browser's handshake, whole in its first read: upgraded without h11 where h11
            # would read it so (ExplainingSansIOProtocol's; upgrade.py's upgrade_head).
            at_once = getattr(self.ws_protocol_class, "upgrade_at_once", None)
            if at_once is not None and at_once(self, data):
                self._upgraded()
                return
        super().data_received(data)
        self._request_read()

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        upgrade = getattr(self.ws_protocol_class, "upgrade", None)  # ExplainingSansIOProtocol's
        if upgrade is None or not upgrade(self, event.method, event.target, self.headers):
            super().handle_websocket_upgrade(event)
        self._upgraded()

    def _upgraded(self) -> None:
        """After a websocket upgrade (or uvicorn's answer to a failed one)."""
        protocol = self.transport.get_protocol()
        if protocol is self:
            return
        if self.head_timer is not None:
            # Upgraded: this protocol hears no connection_lost, so its timer would keep it
            # (and its buffers) alive for a head timeout per handshake.
            self.head_timer.cancel()
            self.head_timer = None
        peer = self.peer
        if peer is None:
            return
        peer.started()
        # From now on the transport tells the websocket protocol, not this one, that the
        # connection is gone; its class may be any of uvicorn's (the app has not accepted
        # yet, and may never): this instance's method is wrapped.
        lost = functools.partial(_left, peer, protocol)
        protocol.connection_lost = lost  # type: ignore[method-assign]

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._request_read()  # kept alive, unless a pipelined request came, or a body is due
        # A head begun on a kept-alive connection: uvicorn's keep-alive timer stops at its
        # first byte. Whichever is longer, so that a longer --timeout-keep-alive holds.
        peers = getattr(self.config, PEERS, None)
        self._wait_for_head(max(self._head_timeout(peers), self.timeout_keep_alive))

    def _request_read(self) -> None:
        """Tell the peer how much of its request h11 has read: the head (it waits for the
        body, which may never come: the app may answer without reading it, and uvicorn goes
        on reading and discarding it), or all of it."""
        peer = self.peer
        if peer is None or self.transport.get_protocol() is not self:  # a websocket now
            return
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            peer.reading()
        elif state is h11.IDLE:
            peer.waiting()  # a body uvicorn discarded is whole: the next head may come
        else:
            peer.started()

    @staticmethod
    def _head_timeout(peers: Peers | None) -> float:
        return (peers.limits if peers is not None else PeerLimits()).head_timeout

    def _wait_for_head(self, timeout: float) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
        self.head_timer = self.loop.call_later(timeout, self._head_late, self.cycle)

    def _head_late(self, cycle: Any) -> None:
        transport = self.transport
        # No request head since (h11 makes a cycle per head, and is IDLE until a head
        # is whole), not upgraded to a websocket, not closing already.
        if (
            self.cycle is cycle
            and self.conn.their_state is h11.IDLE
            and transport.get_protocol() is self
            and not transport.is_closing()
        ):
            transport.close()


def _left(peer: Peer, protocol: asyncio.BaseProtocol, exc: Any) -> None:
    """An upgraded connection is gone: its place in the counts too. The wrapper goes first
    (it and the protocol refer to each other: a cycle only the collector would free), then
    the protocol's own ``connection_lost`` runs (its class's: the app may have changed it)."""
    vars(protocol).pop("connection_lost", None)
    peer.left()
    protocol.connection_lost(exc)


class DrainingServer(Server):
    """uvicorn's ``Server`` that, when it stops, stops listening and drains each wsfanout
    app started in it before its own shutdown (which would close every websocket with 1012)."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.drains: list[Drain] = []

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """uvicorn's (it only records), but a repeated SIGINT does not force the exit,
        which would skip the app's lifespan shutdown: one Ctrl-C reaches the process from
        the terminal and again from a runner that forwards it (``just``), and the stop is
        bounded anyway."""
        super().handle_exit(sig, frame)
        self.force_exit = False

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await _drain(self, self.drains)
        finally:
            await super().shutdown(sockets=sockets)


async def _drain(server: Server, drains: list[Drain]) -> None:
    for listener in getattr(server, "servers", ()):
        listener.close()  # no new connections meanwhile (uvicorn's shutdown repeats it)
    for drain in drains:
        await drain()
    # A SIGINT repeated meanwhile (a terminal's Ctrl-C, forwarded again by a runner such as
    # `just`) is the same stop: uvicorn would take it as "force exit" and skip the app's
    # lifespan shutdown, then end in a traceback.
    server.force_exit = False


def running_server() -> Server | None:
    """The uvicorn ``Server`` running this process, or None. It is found through the
    SIGTERM handler it set for the time it serves (``Server.capture_signals``), so plain
    ``uvicorn wsfanout:app`` and its workers are found as ``wsfanout serve`` is."""
    with contextlib.suppress(ValueError):  # not the main thread: no signal handlers
        owner = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
        if isinstance(owner, Server):
            return owner
    return None


class UvicornAdapter:
    """What one app needs of the uvicorn server that runs it, per connection and when it
    stops."""

    def __init__(self, reach: ServerReach) -> None:
        self.reach = reach
        self.explains = False  # connections of ours can be ExplainingSansIOProtocol
        # uvicorn's protocol class, and ours
        self._classes: tuple[type, type[ExplainingSansIOProtocol]] | None = None
        self._connections: set[Any] | None = None  # uvicorn's (its server state's) set
        self._hold: Callable[[Any], None] = _no_hold  # uvicorn_sansio.hold, once imported

    def accepting(self, receive: Any) -> None:
        """Before its accept is sent: the connection's 101 waits for the welcome (one write
        for both), where the connection is uvicorn's protocol (or ours)."""
        protocol = getattr(receive, "__self__", None)
        classes = self._classes or self._check(protocol)
        if classes is not None and self.explains and type(protocol) in classes:
            self._hold(protocol)

    def accepted(self, receive: Any) -> Any:
        """The connection's protocol object (for ``abort``), now serving this app; or None."""
        protocol = getattr(receive, "__self__", None)
        classes = self._classes or self._check(protocol)
        if classes is None or not self.explains:
            return None
        plain, ours = classes
        if type(protocol) is plain:  # plain uvicorn built its own
            protocol.__class__ = ours
        if not isinstance(protocol, ours):  # someone else's subclass
            return None
        protocol.adopt(self.reach)
        return protocol

    def _check(self, protocol: Any) -> tuple[type, type[ExplainingSansIOProtocol]] | None:
        """uvicorn's protocol class and ours, imported (they need websockets) and checked
        once, at the first connection that is uvicorn's; None until then, or if uvicorn
        changed (its own limits and closes from now on)."""
        if not self.explains:
            return None
        from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

        from .uvicorn_sansio import STATE, ExplainingSansIOProtocol, hold

        if not isinstance(protocol, WebSocketsSansIOProtocol):
            return None
        missing = [name for name in STATE if not hasattr(protocol, name)]
        if missing:
            self.explains = False
            problem = AttributeError(f"its protocol has no {', '.join(missing)}")
            self.reach.broke("frames", problem)
            self.reach.broke("abort", problem)
            return None
        self._classes = (WebSocketsSansIOProtocol, ExplainingSansIOProtocol)
        self._connections = protocol.connections
        self._hold = hold
        return self._classes

    def transport(self, stream: Any) -> Any:
        """The asyncio transport of a connection ``accepted`` returned.

        Raises:
            AttributeError: it has none.
        """
        return stream.transport

    def aborted(self, stream: Any) -> None:
        """Nothing more to do after a reset: uvicorn's protocol stops reading with its
        transport, and drops what it parsed once the app has sent its close."""

    async def stopping(self) -> None:
        """uvicorn stops: drain the app (1001); give the closes a moment to be answered,
        then reset the websockets still open, whose clients do not read (uvicorn would
        wait for them, forever without --timeout-graceful-shutdown)."""
        await self.reach.stopping()
        deadline = time.monotonic() + STRAGGLERS_WAIT
        while True:
            open_ = [
                p
                for p in list(self._connections or ())
                if getattr(p, "wsfanout", None) is self.reach and not p.disconnected
            ]
            if not open_ or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        for protocol in open_:
            self.reach.abort(protocol)

    async def close(self) -> None:
        """Nothing to stop: uvicorn's shutdown calls the drain."""


def _no_hold(protocol: Any) -> None:
    """Before uvicorn_sansio is imported, nothing is held."""


def attach(reach: ServerReach, server: Server) -> UvicornAdapter:
    """Tell uvicorn's config what the app needs, and drain before uvicorn stops; set what
    the reach can do and warn once about what it cannot."""
    adapter = UvicornAdapter(reach)
    config = server.config
    # Read by each new connection's protocol: the app's settings are the server's.
    config.ws_per_message_deflate = reach.compression
    reach.can_decline = True
    if reach.frame_limit > 0:
        config.ws_max_size = reach.frame_limit
    lost = []
    if isinstance(server, DrainingServer):  # wsfanout serve's: the drain is its own
        server.drains.append(adapter.stopping)
        problem = ""
    else:
        problem = _drain_before_uvicorn_stops(server, adapter.stopping)
    reach.can_watch = not problem
    if problem:
        lost.append(
            f"cannot drain before uvicorn stops ({problem}): on SIGTERM, clients get "
            "uvicorn's 1012 instead of 1001"
        )
    http = getattr(config, "http_protocol_class", None)
    if http is H11Protocol:
        config.http_protocol_class = http = HeadTimedH11Protocol
    if http is not None and http is _httptools():
        log.warning(
            "uvicorn parses HTTP with httptools, which bounds neither the size nor the "
            "time of a request's head (a client can grow this process without end), and "
            "wsfanout cannot count its connections per address: pass --http h11, as "
            "wsfanout serve does"
        )
    elif http is not None and not (
        isinstance(http, type) and issubclass(http, HeadTimedH11Protocol)
    ):
        log.warning(
            "uvicorn's HTTP protocol is %r, not h11: wsfanout cannot bound the time of a "
            "request's head nor count connections per address",
            http,
        )
    elif not _h11_unchanged():
        lost.append(
            "uvicorn's H11Protocol changed: request heads may take forever, and "
            "connections are not counted per address"
        )
    peers = getattr(config, PEERS, None)  # an earlier app in this server made them
    if isinstance(peers, Peers):
        peers.limits = reach.peer_limits
    else:
        setattr(config, PEERS, Peers(reach.peer_limits))
    if getattr(config, "proxy_headers", False):
        log.warning(
            "uvicorn takes client addresses from X-Forwarded-For sent by %s: any client "
            "there can name a new address for each login attempt; pass --no-proxy-headers "
            "unless that is your proxy",
            getattr(config, "forwarded_allow_ips", "?"),
        )
    ws = getattr(config, "ws_protocol_class", None)
    if reach.compression and ws is not None and ws is _wsproto():
        config.ws_per_message_deflate = False  # wsproto inflates a message in full first
        reach.compression = False
        log.warning(
            "WSFANOUT_COMPRESSION=on needs uvicorn's --ws websockets-sansio: under "
            "wsproto a small compressed frame inflates without bound, so deflate is declined"
        )
    if not _serves_sansio(ws):
        log.warning(
            "uvicorn runs websockets with %s, not websockets-sansio (--ws websockets-sansio): %s",
            getattr(ws, "__name__", ws),
            _LEFT_TO_UVICORN,
        )
    elif not _sansio_unchanged():
        lost.append(f"uvicorn's WebSocketsSansIOProtocol changed: {_LEFT_TO_UVICORN}")
    else:
        adapter.explains = True
        reach.can_abort = reach.can_bound = True
    if lost:
        log.warning("%s is not a release wsfanout was tested with: %s", reach.name, "; ".join(lost))
    return adapter


def _drain_before_uvicorn_stops(server: Server, drain: Drain) -> str:
    """Make this uvicorn server (not ``wsfanout serve``'s) stop listening and drain each app
    started in it before its own shutdown, by wrapping ``shutdown`` on the instance. "" if
    done."""
    shutdown: Any = getattr(server, "shutdown", None)
    drains = getattr(shutdown, _DRAINS, None)
    if drains is not None:  # an earlier app in this server wrapped it: drain this one too
        drains.append(drain)
        return ""
    if not is_method(shutdown, ["sockets"]):
        return "Server.shutdown(sockets) is gone"
    drains = [drain]

    async def draining(sockets: Any = None) -> None:
        try:
            await _drain(server, drains)
        finally:
            await shutdown(sockets=sockets)

    setattr(draining, _DRAINS, drains)
    server.shutdown = draining  # type: ignore[method-assign]
    return ""


def _serves_sansio(ws: Any) -> bool:
    """Whether this websocket protocol class is uvicorn's websockets-sansio one (or ours)."""
    try:
        from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

        from .uvicorn_sansio import ExplainingSansIOProtocol
    except ImportError:  # websockets is not installed
        return False
    return ws is WebSocketsSansIOProtocol or ws is ExplainingSansIOProtocol


def _sansio_unchanged() -> bool:
    """Whether uvicorn's websockets-sansio protocol has every method ours extends."""
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    from .uvicorn_sansio import PARTS

    return all(hasattr(WebSocketsSansIOProtocol, name) for name in PARTS)


def _h11_unchanged() -> bool:
    """Whether uvicorn's h11 protocol has every method ``HeadTimedH11Protocol`` extends."""
    return all(hasattr(H11Protocol, name) for name in H11_PARTS)


def _httptools() -> type | None:
    """uvicorn's httptools protocol, or None where httptools is not installed (then uvicorn
    cannot be running it)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None
    return HttpToolsProtocol


def _wsproto() -> type | None:
    """uvicorn's wsproto protocol, or None where wsproto is not installed."""
    try:
        from uvicorn.protocols.websockets.wsproto_impl import WSProtocol
    except ImportError:
        return None
    return WSProtocol
