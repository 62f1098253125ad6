"""The only module that knows which ASGI server runs us (hypercorn or uvicorn): every reach
into its internals.

Theory of operation. wsfanout needs these things from its server, which ASGI has no words for.

1. Declining permessage-deflate. Every browser offers it, and hypercorn accepts any offer (it
   has no setting: pgjones/hypercorn#307). Then every frame is compressed again for every
   connection, with about 100 KiB of zlib state each, which costs more than the rest of the
   fan-out path together (DESIGN section 10). ASGI's ``websocket.accept`` cannot say "no
   extensions", so wsfanout marks its own accept messages with ``ACCEPT_KEY`` (servers ignore
   keys they do not know), and hypercorn's ``WSStream._accept`` is wrapped once per process:
   for a marked accept it hands the stream to that app's ``ServerReach``, which forgets the
   client's offer (``handshake.extensions = None``) before hypercorn builds its answer. The
   marker travels with the message, so it works through any middleware that passes messages
   on (a Starlette ``Mount``); accepts from other apps in the same process pass untouched.

2. Hypercorn's stop signal. On SIGTERM hypercorn stops listening, waits its graceful timeout
   for connections to end by themselves, cancels them (the client sees 1011), and only then
   sends lifespan shutdown. Its worker context's ``terminated`` event is set when stopping
   starts; the first marked accept gives the reach that context, and the reach waits on the
   event and calls ``on_stopping`` (the app's drain: every socket gets 1001 in time).

3. Hypercorn's pings end with the connection. With ``--websocket-ping-interval`` (as
   ``wsfanout serve`` and the Containerfile set it), hypercorn pings each connection from a
   task that sleeps the whole interval and only then notices the connection is gone; the
   connection's task group waits for it, so every closed connection lingers up to 20 s,
   and on SIGTERM hypercorn waits its graceful timeout and then cancels them (with
   tracebacks). The wrapped ``WSStream._send_pings`` pings wsfanout's connections the same
   way but stops as soon as the app's handler for that connection has returned.

4. Bounded frames. Hypercorn buffers a message up to its own limit (16 MiB unless told),
   answers a larger one with a bare 1009, and then goes on buffering whatever the client
   still sends (a frame declaring 1 TiB grew the server by 1 GB in 5 s). On wsfanout's
   streams, ``accepting`` swaps the stream's ``buffer`` for ``_Frames``: it holds at most the
   app's frame limit (a message in more than 4096 pieces counts as over it), and past it
   drops everything the client sends and hands the app a ``websocket.receive`` marked
   with ``TOO_LARGE_KEY``, so the app sends its ``too_large``
   error frame and closes with 1009 whatever the frame's size. With compression on, the
   connection's ``PerMessageDeflate`` becomes ``_BoundedDeflate``, which inflates no more than
   that limit per message (a 0.5 MB deflate bomb otherwise inflates 1000-fold first).

5. Aborting a connection. Hypercorn closes a TCP connection gracefully: its unsent data
   (for a client that does not read, megabytes in the kernel and in hypercorn's buffer)
   stays until the client reads it, for minutes. ASGI has no way to say "reset"; the wrapped
   accept hands the app its stream (``STREAM_KEY`` in the accept message), and ``abort``
   resets that connection (SO_LINGER 0, then ``transport.abort()``): the kernel drops what it
   held. The app calls it when a client has not answered its close in time. Under HTTP/2
   (a stream of a connection that carries others) nothing is reset: hypercorn's own close
   applies.

6. Ghost connections. A client that sends data before the handshake's answer gets a 400
   from hypercorn, which marks the stream closed without telling the app: the app waits
   on ``receive()`` forever and its connection stays counted. The wrapped
   ``WSStream._send_error_response`` hands the app a ``websocket.disconnect`` then.

The first three are checked once, at start, against hypercorn's own classes (a handshake that
offers deflate must come back without it). If a hypercorn release moved something, one
warning names what is lost and the service runs on: compression stays as the server
decides, draining waits for lifespan shutdown, and pings run as hypercorn runs them.
``setup.cfg`` bounds hypercorn to the releases this was tested with, and tests against real
hypercorn fail when a reach stops working. The last two are used per connection and warn
once, the first time one fails: without them, a frame over the limit gets hypercorn's bare
1009, and a client that does not read keeps its TCP connection until it reads or leaves.

Under uvicorn (``wsfanout serve --server uvicorn``, or plain ``uvicorn wsfanout:app``) the
same needs are met differently. The running ``uvicorn.Server`` is found through the SIGTERM
handler it installs while it serves (a bound method of the server), at app start:

- Its config is read by every new connection, so the app writes its own settings there:
  ``ws_per_message_deflate`` follows ``WSFANOUT_COMPRESSION`` and ``ws_max_size`` is the frame
  limit. uvicorn's websockets protocol (websockets' sans-I/O core) then declines deflate,
  refuses a larger message from its header alone, and inflates no more than the limit.
- Its ``shutdown`` is wrapped on that instance: stop listening, drain each app started in
  it (1001), reset its websockets still open a second later (clients that do not read:
  uvicorn would wait for them), then uvicorn's own, which closes whatever is left with 1012.
- Its h11 protocol becomes ``HeadTimedH11Protocol``: a connection gets REQUEST_HEAD_TIMEOUT
  to send a whole request head (uvicorn waits forever). Under httptools (no bound on a
  head at all) a warning says so.
- Pings are uvicorn's (``ws_ping_interval``, a timer per connection, gone with it).
- Per connection, under the ``websockets-sansio`` protocol, ``receive`` is a method of the
  connection's protocol object: ``accepted`` takes it as the handle for ``abort`` (its
  transport), and ``_explain_refusals`` puts the app's ``too_large`` frame before the 1009
  close that uvicorn sends for a message over the limit, and refuses a message in more than
  ``_Frames.MAX_PIECES`` fragments (uvicorn keeps every piece, empty ones too). A client that
  pings but does not read, or is refused or timed out with UNSENT_MAX unread, is reset
  (uvicorn writes every pong, and closes gracefully: the kernel would keep what it holds).
  A client that sends data before the handshake's answer leaves no ghost there: uvicorn
  tells the app.

Under another server nothing here applies, and the start-up log says so.

It also knows how servers run workers: ``warn_if_workers_are_islands`` counts the processes
multiprocessing spawned beside this one (not its helpers, such as the resource tracker).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import inspect
import logging
import multiprocessing
import signal
import socket
import struct
import sys
import termios
import time
import weakref
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

from .types import Message

log = logging.getLogger(__name__)

ACCEPT_KEY: Final = "wsfanout.server"
"""The key in wsfanout's ``websocket.accept`` messages that carries its ``ServerReach``."""

STREAM_KEY: Final = "wsfanout.stream"
"""Set by the wrapped hypercorn accept in the accept message it was given: the app's handle
for ``ServerReach.abort`` (absent when middleware copied the message, or not under hypercorn)."""

TOO_LARGE_KEY: Final = "wsfanout.too_large"
"""Marks the ``websocket.receive`` that stands for a frame over the limit (its data dropped)."""

_TOO_LARGE: Final[Message] = {
    "type": "websocket.receive",
    "bytes": None,
    "text": None,
    TOO_LARGE_KEY: True,
}
_GONE: Final[Message] = {"type": "websocket.disconnect", "code": 1006}
_DISCONNECTS: set[asyncio.Task[Any]] = set()  # disconnects being handed over (kept alive)
_RESET: Final = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, drops unsent data

_WRAPPED: Final = "__wsfanout_wrapped__"
_APP_TASK: Final = "_wsfanout_app_task"  # set on a hypercorn WSStream: the app's handler task
REACHES: Final = ("deflate", "stop", "pings", "frames", "abort", "ghosts")
_OFFER: Final = [
    (b"host", b"wsfanout.invalid"),
    (b"connection", b"Upgrade"),
    (b"upgrade", b"websocket"),
    (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
    (b"sec-websocket-version", b"13"),
    (b"sec-websocket-extensions", b"permessage-deflate; client_max_window_bits"),
]


class ServerReach:
    """What one app asks of the server that runs it, and whether the server can give it.

    Args:
        compression: accept permessage-deflate when offered (False: decline it).
        on_stopping: awaited once when the server starts stopping (its SIGTERM).
        frame_limit: the largest inbound message the app takes, in bytes (0: the server's).
        too_large: the error frame that explains a message over the limit, where the
            server refuses it before the app sees it (uvicorn).
    """

    def __init__(
        self,
        *,
        compression: bool,
        on_stopping: Callable[[], Awaitable[None]],
        frame_limit: int = 0,
        too_large: str = "",
    ) -> None:
        self.compression = compression
        self.on_stopping = on_stopping
        self.frame_limit = frame_limit
        self.too_large = too_large
        self.name = "an unknown server"  # which server runs us, for the start-up log
        self._uvicorn_ws: Any = None  # the class of uvicorn's sans-I/O protocol, if it runs ours
        self._accepted: weakref.WeakSet[Any] = weakref.WeakSet()  # uvicorn connections of ours
        self.can_decline = False  # hypercorn's handshake can be told to decline deflate
        self.can_watch = False  # hypercorn's stop signal can be watched
        self.can_stop_pings = False  # hypercorn's pings can be ended with the connection
        self.can_bound = False  # hypercorn's message buffer can be bounded (and inflation)
        self.can_abort = False  # a hypercorn connection can be reset
        self._accept: Message = {"type": "websocket.accept"}
        self._watcher: asyncio.Task[None] | None = None
        self._broken: set[str] = set()

    def start(self) -> None:
        """Find the server's internals, once per app start; warn once about what is missing."""
        uvicorn = _uvicorn_server()
        if uvicorn is not None:
            self._start_under_uvicorn(uvicorn)
            return
        if "hypercorn" not in sys.modules:
            if not self.compression:
                log.info(
                    "neither hypercorn nor uvicorn runs wsfanout: permessage-deflate, the "
                    "frame limit and draining on SIGTERM are left to the server"
                )
            return
        self.name = f"hypercorn {_version('hypercorn')}"
        problems = _install_into_hypercorn()
        problems.setdefault("deflate", _check_decline())
        problems.setdefault("stop", _check_stop_signal())
        self.can_decline = not problems["deflate"]
        self.can_watch = not problems["stop"]
        self.can_stop_pings = not problems.get("pings")
        self.can_bound = self.frame_limit > 0 and not problems.get("frames")
        self.can_abort = not problems.get("abort")
        lost = []
        if not self.can_decline and not self.compression:
            lost.append(
                f"cannot decline permessage-deflate ({problems['deflate']}): clients that offer "
                "it get compressed frames, at a much higher CPU and memory cost per connection"
            )
        if not self.can_watch:
            lost.append(
                f"cannot see hypercorn start stopping ({problems['stop']}): on SIGTERM, sockets "
                "close only after hypercorn's graceful timeout"
            )
        if not self.can_stop_pings:
            lost.append(
                f"cannot end hypercorn's pings with the connection ({problems['pings']}): with "
                "--websocket-ping-interval, closed connections linger until their next ping"
            )
        for reach, what in (
            (
                "ghosts",
                "a client that sends data before the handshake's answer leaves a "
                "connection counted until restart",
            ),
            (
                "frames",
                "frames over the limit get hypercorn's bare 1009, after it buffered "
                "them (up to its own websocket_max_message_size)",
            ),
            ("abort", "a client that does not read keeps its TCP connection after its close"),
        ):
            if problems.get(reach):
                lost.append(f"{what} ({problems[reach]})")
        if lost:
            log.warning(
                "hypercorn %s is not a release wsfanout was tested with: %s",
                _version("hypercorn"),
                "; ".join(lost),
            )
        if any(
            (self.can_decline, self.can_watch, self.can_stop_pings, self.can_bound, self.can_abort)
        ):
            self._accept = {"type": "websocket.accept", ACCEPT_KEY: self}

    @property
    def deflate(self) -> str:
        """What happens to a client's permessage-deflate offer, for the start-up log."""
        if self.compression:
            return "accepted"
        return "declined" if self.can_decline else "left to the server"

    def accept_message(self) -> Message:
        """The ``websocket.accept`` message to send: a copy, as middleware may change it."""
        return dict(self._accept)

    def accepted(self, accept: Message, receive: Any) -> Any:
        """The server's handle on a connection just accepted (for ``abort``), or None.

        Args:
            accept: the accept message as sent (hypercorn's wrapped accept left its stream).
            receive: the connection's ASGI ``receive`` (uvicorn's is its protocol's method).
        """
        stream = accept.get(STREAM_KEY)
        if stream is None and self._uvicorn_ws is not None:
            protocol = getattr(receive, "__self__", None)
            if type(protocol) is self._uvicorn_ws:
                missing = [name for name in _SANSIO_STATE if not hasattr(protocol, name)]
                if missing:  # uvicorn changed: its own limits and closes from now on
                    self._uvicorn_ws = None
                    problem = AttributeError(f"its protocol has no {', '.join(missing)}")
                    self._broke("frames", problem)
                    self._broke("abort", problem)
                    return None
                _explain_refusals(protocol, self)
                self._accepted.add(protocol)
                return protocol
        return stream

    async def close(self) -> None:
        """Stop watching the server (not from inside ``on_stopping`` itself)."""
        watcher, self._watcher = self._watcher, None
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    def abort(self, stream: Any) -> bool:
        """Reset the TCP connection under ``stream`` (from ``STREAM_KEY``): the kernel drops
        what it still holds for the client. False if that cannot be done here."""
        if stream is None or not self.can_abort:
            return False
        try:
            if type(stream) is self._uvicorn_ws:
                transport = stream.transport
            else:
                protocol = stream.send.__self__
                if type(protocol).__name__ != "H11Protocol":
                    return False  # HTTP/2: the connection carries other streams
                transport = protocol.send.__self__.writer.transport
        except AttributeError as exc:
            self._broke("abort", exc)
            return False
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # already closed
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        transport.abort()
        return True

    def accepting(self, stream: Any) -> None:
        """Called by the wrapped hypercorn accept, before it answers the handshake."""
        handshake = None
        if self.can_decline:
            try:
                handshake = stream.handshake
                # Compression on: an offer wsproto cannot parse would make hypercorn drop the
                # connection with a traceback, so it is declined like any other instead.
                if not self.compression or not _offer_parses(handshake.extensions):
                    handshake.extensions = None
            except AttributeError as exc:
                self._broke("deflate", exc)
        if self.can_bound:
            try:
                frames = _Frames(stream, min(stream.buffer.max_length, self.frame_limit))
                stream.buffer = frames
                handshake = stream.handshake
                if handshake.extensions:  # deflate may be accepted: bound its inflation too
                    _bound_inflation(handshake, frames, self)
            except AttributeError as exc:
                self._broke("frames", exc)
        if self.can_stop_pings:
            try:
                setattr(stream, _APP_TASK, asyncio.current_task())  # the handler sends accept
            except AttributeError as exc:
                self._broke("pings", exc)
        if self.can_watch and self._watcher is None:
            try:
                wait = stream.context.terminated.wait
            except AttributeError as exc:
                self._broke("stop", exc)
            else:
                self._watcher = asyncio.get_running_loop().create_task(
                    self._watch(wait), name="wsfanout-server-stop"
                )

    async def _watch(self, wait: Callable[[], Awaitable[None]]) -> None:
        await wait()
        log.info(_STOPPING)
        await self.on_stopping()

    async def stopping_under_uvicorn(self) -> None:
        """uvicorn stops: drain the app (1001); give the closes a moment to be answered,
        then reset the websockets still open, whose clients do not read (uvicorn would
        wait for them, forever without --timeout-graceful-shutdown)."""
        log.info(_STOPPING)
        await self.on_stopping()
        deadline = time.monotonic() + STRAGGLERS_WAIT
        while True:
            open_ = [p for p in list(self._accepted) if not p.disconnected]
            if not open_ or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        for protocol in open_:
            self.abort(protocol)

    def _start_under_uvicorn(self, server: Any) -> None:
        """Tell uvicorn's config what the app needs, and drain before uvicorn stops."""
        config = server.config
        self.name = f"uvicorn {_version('uvicorn')}"
        # Read by each new connection's protocol: the app's settings are the server's.
        config.ws_per_message_deflate = self.compression
        self.can_decline = True
        if self.frame_limit > 0:
            config.ws_max_size = self.frame_limit
        lost = []
        problem = _drain_before_uvicorn_stops(server, self)
        self.can_watch = not problem
        if problem:
            lost.append(
                f"cannot drain before uvicorn stops ({problem}): on SIGTERM, clients get "
                "uvicorn's 1012 instead of 1001"
            )
        http = getattr(config, "http_protocol_class", None)
        if http is not None and http.__name__ in ("H11Protocol", "HeadTimedH11Protocol"):
            config.http_protocol_class = _head_timed_h11()
        elif http is not None and http.__name__ == "HttpToolsProtocol":
            log.warning(
                "uvicorn parses HTTP with httptools, which bounds neither the size nor the "
                "time of a request's head (a client can grow this process without end): "
                "pass --http h11, as wsfanout serve does"
            )
        if getattr(config, "proxy_headers", False):
            log.warning(
                "uvicorn takes client addresses from X-Forwarded-For sent by %s: any client "
                "there can name a new address for each login attempt; pass --no-proxy-headers "
                "unless that is your proxy",
                getattr(config, "forwarded_allow_ips", "?"),
            )
        ws = getattr(config, "ws_protocol_class", None)
        if self.compression and getattr(ws, "__name__", "") == "WSProtocol":
            config.ws_per_message_deflate = False  # wsproto inflates a message in full first
            self.compression = False
            log.warning(
                "WSFANOUT_COMPRESSION=on needs uvicorn's --ws websockets-sansio: under "
                "wsproto a small compressed frame inflates without bound, so deflate is declined"
            )
        if ws is None or ws.__name__ != "WebSocketsSansIOProtocol":
            log.warning(
                "uvicorn runs websockets with %s, not websockets-sansio (--ws "
                "websockets-sansio): %s",
                getattr(ws, "__name__", ws),
                _LEFT_TO_UVICORN,
            )
        elif not all(hasattr(ws, name) for name in _SANSIO_PARTS):
            lost.append(f"uvicorn's WebSocketsSansIOProtocol changed: {_LEFT_TO_UVICORN}")
        else:
            self._uvicorn_ws = ws
            self.can_abort = self.can_bound = True
        if lost:
            log.warning(
                "uvicorn %s is not a release wsfanout was tested with: %s",
                _version("uvicorn"),
                "; ".join(lost),
            )

    def _broke(self, reach: str, exc: Exception) -> None:
        if reach == "deflate":
            self.can_decline = False
        elif reach == "stop":
            self.can_watch = False
        elif reach == "frames":
            self.can_bound = False
        elif reach == "abort":
            self.can_abort = False
        else:
            self.can_stop_pings = False
        if reach not in self._broken:
            self._broken.add(reach)
            log.warning("a reach into %s stopped working (%s): %s", self.name, reach, exc)


def _install_into_hypercorn() -> dict[str, str]:
    """Wrap ``WSStream._accept`` and ``_send_pings`` once per process.

    Returns:
        The problem, per reach, for those that cannot work (none: an empty dict).
    """
    try:
        from hypercorn.protocol.ws_stream import WSStream
        from wsproto.events import Ping
    except ImportError as exc:
        return dict.fromkeys(REACHES, str(exc))
    accept: Any = getattr(WSStream, "_accept", None)
    if not _is_method(accept, ["self", "message"]):
        return dict.fromkeys(REACHES, "WSStream._accept(self, message) is gone")
    problems: dict[str, str] = {}
    pings: Any = getattr(WSStream, "_send_pings", None)
    if not _is_method(pings, ["self"]) or not hasattr(WSStream, "_send_wsproto_event"):
        problems["pings"] = "WSStream._send_pings(self) or _send_wsproto_event is gone"
    problems.update(_check_frames_and_abort())
    error_response: Any = getattr(WSStream, "_send_error_response", None)
    if not _is_method(error_response, ["self", "status_code"]):
        problems["ghosts"] = "WSStream._send_error_response(self, status_code) is gone"
    if getattr(accept, _WRAPPED, False):
        return problems  # installed by an earlier start in this process

    async def _accept(stream: Any, message: Message) -> None:
        reach = message.get(ACCEPT_KEY)
        if isinstance(reach, ServerReach):
            reach.accepting(stream)
            message[STREAM_KEY] = stream
        await accept(stream, message)

    async def _send_pings(stream: Any) -> None:
        app = stream.__dict__.get(_APP_TASK)
        if app is None:  # not one of ours
            await pings(stream)
            return
        interval = stream.config.websocket_ping_interval
        while not stream.closed and not app.done():
            await stream._send_wsproto_event(Ping())
            await asyncio.wait((app,), timeout=interval)  # wakes when the handler returns

    async def _send_error_response(stream: Any, status_code: int) -> None:
        await error_response(stream, status_code)
        # Hypercorn ends a stream whose client sent data before the handshake's answer
        # (400) without telling its app, which then waits on receive() forever, holding
        # its connection's place. Tell it the client is gone.
        put = stream.__dict__.get("app_put")
        if put is not None and status_code == 400:
            _DISCONNECTS.add(asyncio.get_running_loop().create_task(put(dict(_GONE))))
            for task in [t for t in _DISCONNECTS if t.done()]:
                _DISCONNECTS.discard(task)

    _wrap(WSStream, "_accept", _accept, accept)
    if "ghosts" not in problems:
        _wrap(WSStream, "_send_error_response", _send_error_response, error_response)
    if "pings" not in problems:
        _wrap(WSStream, "_send_pings", _send_pings, pings)
    return problems


_SANSIO_PARTS: Final = (
    "handle_parser_exception",
    "handle_cont",
    "handle_ping",
    "keepalive_timeout",
)
REQUEST_HEAD_TIMEOUT: Final = 10.0  # seconds a uvicorn HTTP connection has to send a request head
UNSENT_MAX: Final = 1 << 20  # bytes unsent to a uvicorn websocket client that pings or is closed
_SANSIO_STATE: Final = ("conn", "frames", "close_sent", "transport", "disconnected")
STRAGGLERS_WAIT: Final = 1.0  # seconds after a drain for closes to be answered (uvicorn)
_STOPPING: Final = "the server is stopping: closing every websocket with 1001"
_REACHES: Final = "__wsfanout_reaches__"  # on a wrapped uvicorn shutdown: the apps to drain
_LEFT_TO_UVICORN: Final = (
    "frames over the limit get a bare 1009, and clients that do not read keep their TCP "
    "connection after their close"
)


def _uvicorn_server() -> Any:
    """The uvicorn ``Server`` running this process, or None. It is found through the
    SIGTERM handler it set for the time it serves (``Server.capture_signals``), so plain
    ``uvicorn wsfanout:app`` and its workers are found as ``wsfanout serve`` is."""
    if "uvicorn.server" not in sys.modules:
        return None
    from uvicorn.server import Server

    with contextlib.suppress(ValueError):  # not the main thread: no signal handlers
        owner = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
        if isinstance(owner, Server):
            return owner
    return None


def _drain_before_uvicorn_stops(server: Any, reach: ServerReach) -> str:
    """Make this uvicorn server stop listening and drain each app started in it before
    its own shutdown, which closes every websocket with 1012 at once. "" if done."""
    shutdown: Any = getattr(server, "shutdown", None)
    reaches = getattr(shutdown, _REACHES, None)
    if reaches is not None:  # an earlier app in this server wrapped it: drain this one too
        reaches.append(reach)
        return ""
    if not _is_method(shutdown, ["sockets"]):
        return "Server.shutdown(sockets) is gone"
    reaches = [reach]

    async def draining(sockets: Any = None) -> None:
        for listener in getattr(server, "servers", ()):
            listener.close()  # no new connections meanwhile (uvicorn's shutdown repeats it)
        try:
            for each in reaches:
                await each.stopping_under_uvicorn()
        finally:
            await shutdown(sockets=sockets)

    setattr(draining, _REACHES, reaches)
    server.shutdown = draining
    return ""


def _explain_refusals(protocol: Any, reach: ServerReach) -> None:
    """Teach one uvicorn connection what hypercorn's are taught by ``_Frames``, and to
    let go of a client that does not read.

    uvicorn's websockets protocol refuses a message over ``ws_max_size`` itself (its
    close, 1009, is queued before the app hears of it): the app's ``too_large`` error
    frame is put before that close. A message may come in at most ``_Frames.MAX_PIECES``
    fragments (uvicorn keeps every one, empty ones too, until the last), else it is
    refused the same way. A client with UNSENT_MAX unread is reset when it pings (uvicorn
    writes every pong) and when uvicorn closes it after a refusal or an unanswered ping.
    """
    handle_parser_exception = protocol.handle_parser_exception
    handle_cont = protocol.handle_cont
    handle_ping = protocol.handle_ping
    keepalive_timeout = protocol.keepalive_timeout

    def reset_if_unread() -> None:
        """uvicorn's closes are graceful: what a client that does not read was sent stays
        in the kernel, for minutes. Past UNSENT_MAX, reset instead."""
        if _unsent(protocol.transport) > UNSENT_MAX:
            reach.abort(protocol)

    def explain() -> None:
        if not reach.too_large:
            return
        try:
            from websockets.frames import Frame, Opcode

            conn = protocol.conn
            frame = Frame(Opcode.TEXT, reach.too_large.encode())
            conn.writes.insert(0, frame.serialize(mask=False, extensions=conn.extensions))
        except Exception as exc:  # websockets changed: the close goes out alone
            reach._broke("frames", exc)

    def refused() -> None:
        from websockets.exceptions import PayloadTooBig

        if isinstance(protocol.conn.parser_exc, PayloadTooBig):
            explain()
        handle_parser_exception()
        reset_if_unread()

    def ping() -> None:
        # websockets queued the pong; uvicorn writes it whatever the client leaves unread.
        if protocol.transport.is_closing():
            return
        if _unsent(protocol.transport) > UNSENT_MAX:
            log.info("reset a connection that pings but does not read")
            reach.abort(protocol)
            return
        handle_ping()

    def no_pong() -> None:
        keepalive_timeout()
        reset_if_unread()

    def fragment(event: Any) -> None:
        if len(protocol.frames) < _Frames.MAX_PIECES or protocol.close_sent:
            handle_cont(event)
            return
        protocol.frames = []
        conn = protocol.conn
        conn.fail(1009, f"a message in more than {_Frames.MAX_PIECES} fragments")
        if conn.close_sent is not None:  # else the client's close came first
            explain()
            handle_parser_exception()
            reset_if_unread()

    protocol.handle_parser_exception = refused
    protocol.handle_cont = fragment
    protocol.handle_ping = ping
    protocol.keepalive_timeout = no_pong


def _unsent(transport: Any) -> int:
    """Bytes written to this connection that its client has not taken yet: in the
    transport's buffer and in the kernel's send queue."""
    unsent = int(transport.get_write_buffer_size())
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):
            queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
            unsent += struct.unpack("i", queued)[0]
    return unsent


@functools.cache
def _head_timed_h11() -> type:
    """uvicorn's h11 protocol, closing a connection that has not sent a whole request head
    within REQUEST_HEAD_TIMEOUT (uvicorn waits forever: a few thousand half-sent requests
    would hold every file descriptor of the process)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadTimedH11Protocol(H11Protocol):
        head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._wait_for_head()

        def connection_lost(self, exc: Exception | None) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._wait_for_head()

        def _wait_for_head(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
            self.head_timer = self.loop.call_later(
                REQUEST_HEAD_TIMEOUT, self._head_late, self.cycle
            )

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

    return HeadTimedH11Protocol


class _Frames:
    """Stands in for hypercorn's ``WebsocketBuffer`` on a wsfanout stream: the same three
    methods, but it never holds more than ``limit`` (characters of text, bytes of binary)
    in at most ``JOIN_EVERY`` pieces, and a message may come in at most ``MAX_PIECES``.

    Past either bound it drops the message so far and everything the client sends after
    it, and hands the app a ``_TOO_LARGE`` receive (the app answers with ``too_large``,
    closes with 1009, and resets the connection if the client goes on; later messages of
    the client end as such receives too, which the closing app drops).
    """

    MAX_PIECES: Final = 4096  # a message arriving in more pieces (fragments, reads) is refused
    JOIN_EVERY: Final = 64  # pieces held before they are joined into one

    __slots__ = ("_stream", "_telling", "length", "limit", "parts", "pieces", "refused")

    def __init__(self, stream: Any, limit: int) -> None:
        self._stream = stream
        self._telling: asyncio.Task[Any] | None = None
        self.limit = limit
        self.length = 0
        self.pieces = 0
        self.parts: list[Any] = []
        self.refused = False

    def extend(self, event: Any) -> None:
        if self.refused:
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
        put = self._stream.app_put(dict(_TOO_LARGE))
        self._telling = asyncio.get_running_loop().create_task(put)

    def clear(self) -> None:
        self.parts.clear()
        self.length = self.pieces = 0

    def to_message(self) -> Message:
        if self.refused:
            return dict(_TOO_LARGE)
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


def _bound_inflation(handshake: Any, frames: _Frames, reach: ServerReach) -> None:
    """Once hypercorn's handshake has built the connection, bound its permessage-deflate."""
    accept = handshake.accept

    def bounded(*args: Any) -> Any:
        status, headers, connection = accept(*args)
        try:
            extensions: list[Any] = connection._proto.extensions
        except AttributeError as exc:
            reach._broke("frames", exc)
        else:
            cls = _bounded_deflate()
            deflate: Any = cls.__base__  # wsproto's own
            for extension in extensions:
                if type(extension) is deflate:
                    extension.wsfanout_frames = frames
                    extension.wsfanout_left = frames.limit
                    extension.__class__ = cls
        return status, headers, connection

    handshake.accept = bounded


@functools.cache
def _bounded_deflate() -> type:
    """wsproto's ``PerMessageDeflate``, inflating no more than the frame limit per message."""
    from wsproto.extensions import PerMessageDeflate
    from wsproto.frame_protocol import CloseReason

    class BoundedDeflate(PerMessageDeflate):
        wsfanout_frames: _Frames
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


def _check_frames_and_abort() -> dict[str, str]:
    """Are hypercorn's message buffer and its connection's transport where they were?"""
    problems: dict[str, str] = {}
    try:
        from hypercorn.asyncio.tcp_server import TCPServer
        from hypercorn.protocol.h11 import H11Protocol
        from hypercorn.protocol.ws_stream import WebsocketBuffer, WSStream
        from wsproto.extensions import PerMessageDeflate
    except ImportError as exc:
        return {"frames": str(exc), "abort": str(exc)}
    buffer = WebsocketBuffer(1)
    if not all(hasattr(buffer, name) for name in ("extend", "clear", "to_message", "max_length")):
        problems["frames"] = "hypercorn's WebsocketBuffer changed"
    elif not hasattr(WSStream, "_handle_events"):
        problems["frames"] = "WSStream._handle_events is gone"
    deflate = PerMessageDeflate()
    if not all(hasattr(deflate, name) for name in ("_inbound_compressed", "_decompressor")):
        problems["frames"] = "wsproto's PerMessageDeflate changed"
    if not hasattr(H11Protocol, "stream_send") or not hasattr(TCPServer, "protocol_send"):
        problems["abort"] = "H11Protocol.stream_send or TCPServer.protocol_send is gone"
    return problems


def _wrap(cls: type, name: str, wrapper: Any, original: Any) -> None:
    setattr(wrapper, _WRAPPED, True)
    wrapper.__wrapped__ = original
    setattr(cls, name, wrapper)


def _is_method(function: Any, parameters: list[str]) -> bool:
    return (
        function is not None
        and inspect.iscoroutinefunction(function)
        and list(inspect.signature(function).parameters) == parameters
    )


def _offer_parses(offers: list[str] | None) -> bool:
    """Whether wsproto can negotiate permessage-deflate from these offers without raising."""
    if not offers:
        return True
    from wsproto.extensions import PerMessageDeflate
    from wsproto.handshake import server_extensions_handshake

    try:
        server_extensions_handshake(offers, [PerMessageDeflate()])
    except Exception:  # wsproto raises ValueError (and worse) on malformed parameters
        return False
    return True


def _check_decline() -> str:
    """Does a hypercorn handshake that offers deflate come back without it, once told? ("" if so)"""
    try:
        from hypercorn.protocol.ws_stream import Handshake

        handshake = Handshake(list(_OFFER), "1.1")
        if not hasattr(handshake, "extensions"):
            return "Handshake has no 'extensions'"
        handshake.extensions = None
        _status, headers, _connection = handshake.accept(None, [])
    except Exception as exc:  # any change in hypercorn's handshake is a broken reach
        return f"hypercorn's Handshake changed: {exc!r}"
    if any(name.lower() == b"sec-websocket-extensions" for name, _ in headers):
        return "the answer still carries sec-websocket-extensions"
    return ""


def _check_stop_signal() -> str:
    """Does hypercorn's worker context still have a ``terminated`` event? ("" if so)"""
    try:
        from hypercorn.asyncio.worker_context import WorkerContext

        terminated = WorkerContext(None).terminated
    except Exception as exc:
        return f"hypercorn's WorkerContext changed: {exc!r}"
    wait = getattr(terminated, "wait", None)
    if wait is None or not inspect.iscoroutinefunction(wait):
        return "WorkerContext.terminated has no 'async wait()'"
    return ""


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "(unknown version)"


def warn_if_workers_are_islands() -> None:
    """Without a backplane, several worker processes each fan out to their own sockets only."""
    parent = multiprocessing.parent_process()
    if parent is None or parent.pid is None:
        return
    workers = [pid for pid in _children(parent.pid) if _is_worker(pid)]
    if len(workers) > 1:
        log.warning(
            "%d worker processes and no WSFANOUT_REDIS_URL: each worker fans out only to its "
            "own connections, so users on different workers do not see each other's messages. "
            "Set WSFANOUT_REDIS_URL, or run one worker.",
            len(workers),
        )


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _is_worker(pid: int) -> bool:
    """A process multiprocessing spawned to run code (a server's worker), not one of its
    helpers: the resource tracker and the forkserver are children of the parent too."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"spawn_main" in cmdline or b"--multiprocessing-fork" in cmdline
