"""The hypercorn adapter: every reach into hypercorn. It patches hypercorn's ``WSStream``
(its accept, its ping loop and its error response), and through hypercorn_tcp.py its
``TCPServer.run``, once, when this module is imported
(``ServerReach.start`` imports it when hypercorn runs us), because hypercorn has no setting
or hook for any of what follows, and ASGI no words for it.

Theory of operation.

1. Declining permessage-deflate. Every browser offers it, and hypercorn accepts any offer (it
   has no setting: pgjones/hypercorn#307). Then every frame is compressed again for every
   connection, with about 100 KiB of zlib state each, which costs more than the rest of the
   fan-out path together (DESIGN section 10). ASGI's ``websocket.accept`` cannot say "no
   extensions", so wsfanout marks its own accept messages with ``ACCEPT_KEY`` (servers ignore
   keys they do not know), and hypercorn's ``WSStream._accept`` is wrapped: for a marked
   accept it hands the stream to that app's ``HypercornAdapter``, which forgets the client's
   offer (``handshake.extensions = None``) before hypercorn builds its answer. The marker
   travels with the message, so it works through any middleware that passes messages on (a
   Starlette ``Mount``); accepts from other apps in the same process pass untouched.

2. Hypercorn's stop signal. On SIGTERM hypercorn stops listening, waits its graceful timeout
   for connections to end by themselves, cancels them (the client sees 1011), and only then
   sends lifespan shutdown. Its worker context's ``terminated`` event is set when stopping
   starts; the first marked accept gives the adapter that context, and the adapter waits on
   the event and calls ``on_stopping`` (the app's drain: every socket gets 1001 in time).
   Closes wait no longer than that timeout allows (``ServerReach.within_stop``), and a
   writer blocked on a client that does not read gives up in time for its connection to be
   reset (``ServerReach.flush_by``): a cancelled connection is a traceback from asyncio
   under Python 3.11 and 3.12 (not 3.13).
   How the stop starts (a signal to the master, to a worker, or to both, once or more) is
   hypercorn_signals.py's.

3. Hypercorn's pings end with the connection. With ``--websocket-ping-interval`` (as
   ``wsfanout serve`` and the Containerfile set it), hypercorn pings each connection from a
   task that sleeps the whole interval and only then notices the connection is gone; the
   connection's task group waits for it, so every closed connection lingers up to 20 s,
   and on SIGTERM hypercorn waits its graceful timeout and then cancels them (with
   tracebacks). The wrapped ``WSStream._send_pings`` pings wsfanout's connections every
   interval too, but stops as soon as the app's handler for that connection has returned,
   and sends its first ping an interval after accept, not at once (as uvicorn does).

4. Bounded frames. On wsfanout's streams, ``accepting`` swaps the stream's ``buffer`` for
   ``Frames`` (frames.py: at most the app's frame limit, then a ``TOO_LARGE_KEY`` receive),
   and with compression on the connection's ``PerMessageDeflate`` for the bounded one.

5. Aborting a connection. Hypercorn closes a TCP connection gracefully: its unsent data
   (for a client that does not read, megabytes in the kernel and in hypercorn's buffer)
   stays until the client reads it, for minutes. The wrapped accept hands the app its stream
   (``STREAM_KEY`` in the accept message), and ``ServerReach.abort`` resets that
   connection's transport (resets.py) and stops hypercorn's parsing of it
   (``HypercornAdapter.aborted``), so that hypercorn neither parses what it had already
   read of a flood nor waits forever on a queue the app has stopped reading. The app calls
   it when a client has not answered its close in time, or goes on sending instead of
   answering it. Under HTTP/2 (a stream of a connection that carries others) nothing is
   reset: hypercorn's own close applies.

6. Ghost connections. A client that sends data before the handshake's answer gets a 400
   from hypercorn, which marks the stream closed without telling the app: the app waits
   on ``receive()`` forever and its connection stays counted. The wrapped
   ``WSStream._send_error_response`` hands the app a ``websocket.disconnect`` then.

7. Invalid frames. On wsfanout's streams, the wsproto connection hypercorn builds at accept
   becomes frames.py's ``closing_connection()``: a client whose data wsproto cannot parse
   (invalid UTF-8 in a text message: 1007) gets the close frame wsproto asks for, where
   hypercorn sent none (the client saw 1006), and the log gets one line. It also keeps the
   code of the client's own close, which hypercorn tells the app as 1006 (for the lifecycle
   hooks' ``disconnected``: ``ServerReach.client_code``). Checked at start:
   such a connection fed invalid UTF-8 must close as hypercorn answers a client's close.

8. Connections per address. hypercorn_tcp.py wraps hypercorn's ``TCPServer.run`` for every
   connection of the process, before any app sees it: the per-address caps on connections
   waiting for a request (head or body) and on all connections, the first head's timeout
   and a body's (peers.py). Checked at each app's start, which sets the caps.

The first three are checked at each app's start, against hypercorn's own classes (a
handshake that offers deflate must come back without it, and the wraps must still be in
place). If a hypercorn release moved something, one warning names what is lost and the
service runs on: compression stays as the server decides, draining waits for lifespan
shutdown, and pings run as hypercorn runs them. ``setup.cfg`` bounds hypercorn to the
releases this was tested with, and tests against real hypercorn fail when a reach stops
working. The last three are used per connection and warn once, the first time one fails:
without them, a frame over the limit gets hypercorn's bare 1009, and a client that does not
read keeps its TCP connection until it reads or leaves.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

from ..types import Message
from . import (
    hypercorn_direct,  # gives hypercorn's streams write_now, once per process
    hypercorn_signals,  # takes the workers' stop signals, once per process
    hypercorn_tcp,
    lean,
)
from .checks import is_method
from .frames import Frames, bounded_deflate, check_closing_connection, closing_connection
from .keys import ACCEPT_KEY, GONE, STREAM_KEY

if TYPE_CHECKING:
    from .reach import ServerReach

log = logging.getLogger(__package__)  # one logger for the servers package: "wsfanout.servers"

REACHES: Final = ("deflate", "stop", "pings", "frames", "abort", "ghosts", "closes")
_WRAPPED: Final = "__wsfanout_wrapped__"
_APP_TASK: Final = "_wsfanout_app_task"  # set on a hypercorn WSStream: the app's handler task
_DISCONNECTS: set[asyncio.Task[Any]] = set()  # disconnects being handed over (kept alive)
_OFFER: Final = [
    (b"host", b"wsfanout.invalid"),
    (b"connection", b"Upgrade"),
    (b"upgrade", b"websocket"),
    (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
    (b"sec-websocket-version", b"13"),
    (b"sec-websocket-extensions", b"permessage-deflate; client_max_window_bits"),
]
_LOST: Final = (
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
    (
        "signals",
        "a worker sent SIGTERM itself (as a signal to the process group does) dies at once, "
        "without closing its sockets",
    ),
    (
        "closes",
        "a client's invalid data (invalid UTF-8 in a text message) ends its connection "
        "without a close frame (the client sees 1006)",
    ),
    ("direct", "every frame goes through hypercorn's send (coroutines and a lock per frame)"),
    (
        "peers",
        "connections are not counted per address: one address can hold every descriptor "
        "of the process with half-sent request heads",
    ),
)


class HypercornAdapter:
    """What one app needs of hypercorn, per stream: carried by the app's accept messages."""

    def __init__(self, reach: ServerReach, *, closes: bool = True) -> None:
        self.reach = reach
        self.closes = closes  # connections send the close wsproto asks for (frames.py)
        self._watcher: asyncio.Task[None] | None = None

    def accepting(self, stream: Any) -> None:
        """Called by the wrapped hypercorn accept, before it answers the handshake."""
        reach = self.reach
        handshake = None
        if reach.can_decline:
            try:
                handshake = stream.handshake
                # Compression on: an offer wsproto cannot parse would make hypercorn drop the
                # connection with a traceback, so it is declined like any other instead.
                if not reach.compression or not _offer_parses(handshake.extensions):
                    handshake.extensions = None
            except AttributeError as exc:
                reach.broke("deflate", exc)
        frames = None
        if reach.can_bound:
            try:
                frames = Frames(stream, min(stream.buffer.max_length, reach.frame_limit))
                stream.buffer = frames
            except AttributeError as exc:
                reach.broke("frames", exc)
        if frames is not None or self.closes:
            try:
                _on_accept(stream, frames, self.closes, reach)
            except AttributeError as exc:
                reach.broke("frames", exc)
        if reach.can_stop_pings:
            try:
                setattr(stream, _APP_TASK, asyncio.current_task())  # the handler sends accept
            except AttributeError as exc:
                reach.broke("pings", exc)
        if reach.can_watch and self._watcher is None:
            try:
                wait = stream.context.terminated.wait
                graceful = float(stream.config.graceful_timeout)
            except (AttributeError, TypeError, ValueError) as exc:
                reach.broke("stop", exc)
            else:
                self._watcher = asyncio.get_running_loop().create_task(
                    self._watch(wait, graceful), name="wsfanout-server-stop"
                )

    async def _watch(self, wait: Callable[[], Awaitable[None]], graceful: float) -> None:
        await wait()
        # Hypercorn cancels the connections left ``graceful`` seconds after it set the
        # event (a traceback each, from asyncio, under Python 3.11 and 3.12): the app's
        # closes end before (ServerReach.within_stop).
        self.reach.stop_at = asyncio.get_running_loop().time() + graceful
        await self.reach.stopping()

    def accepted(self, receive: Any) -> None:
        """No handle from ``receive``: hypercorn's is its stream, left in the accept message."""
        return None

    def transport(self, stream: Any) -> Any:
        """The asyncio transport under a hypercorn stream, or None under HTTP/2 (the
        connection carries other streams).

        Raises:
            AttributeError: the stream's connection is not where it was.
        """
        from hypercorn.protocol.h11 import H11Protocol

        protocol = stream.send.__self__
        if not isinstance(protocol, H11Protocol):
            return None
        sender: Any = protocol.send  # hypercorn's TCPServer.protocol_send
        return sender.__self__.writer.transport

    def aborted(self, stream: Any) -> None:
        """After a reset, hypercorn would go on parsing what it had already read of the
        connection (up to 192 KiB: some 27,000 one-byte frames of a flood, a quarter of a
        second of CPU each, without letting other tasks run) into the app's queue, and once
        the app no longer reads it, wait on that queue forever. Instead its message buffer
        (``Frames``) raises at the next frame, which ends hypercorn's parsing loop as a
        message over its own limit does, and its hand-overs to the app are dropped.

        Raises:
            AttributeError: the stream has no ``app_put`` where it had.
        """
        if "app_put" not in stream.__dict__:
            raise AttributeError("WSStream.app_put is gone")
        stream.app_put = _reset
        buffer = stream.buffer
        if isinstance(buffer, Frames):  # and hypercorn's parsing stops at the next frame
            buffer.refused = buffer.reset = True

    async def close(self) -> None:
        """Stop watching hypercorn's stop signal (not from inside ``on_stopping`` itself)."""
        watcher, self._watcher = self._watcher, None
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)


async def _reset(message: Message) -> None:
    """A reset connection's ``app_put``: nothing more reaches the app (see ``aborted``)."""


def attach(reach: ServerReach) -> HypercornAdapter:
    """Check every reach for one app's start, set what it can do, and warn once about
    what it cannot."""
    problems = check() | hypercorn_signals.check()
    problems["peers"] = hypercorn_tcp.configure(reach.peer_limits)
    problems["direct"] = hypercorn_direct.check()
    reach.can_decline = not problems["deflate"]
    reach.can_watch = not problems["stop"]
    reach.can_stop_pings = not problems.get("pings")
    reach.can_bound = reach.frame_limit > 0 and not problems.get("frames")
    reach.can_abort = not problems.get("abort")
    lost = []
    if not reach.can_decline and not reach.compression:
        lost.append(
            f"cannot decline permessage-deflate ({problems['deflate']}): clients that offer "
            "it get compressed frames, at a much higher CPU and memory cost per connection"
        )
    if not reach.can_watch:
        lost.append(
            f"cannot see hypercorn start stopping ({problems['stop']}): on SIGTERM, sockets "
            "close only after hypercorn's graceful timeout"
        )
    if not reach.can_stop_pings:
        lost.append(
            f"cannot end hypercorn's pings with the connection ({problems['pings']}): with "
            "--websocket-ping-interval, closed connections linger until their next ping"
        )
    for name, what in _LOST:
        if problems.get(name):
            lost.append(f"{what} ({problems[name]})")
    if lost:
        log.warning("%s is not a release wsfanout was tested with: %s", reach.name, "; ".join(lost))
    return HypercornAdapter(reach, closes=not problems.get("closes"))


def check() -> dict[str, str]:
    """The problem, per reach, for those that cannot work now: the wraps installed at import
    must still be in place, and what the others use where it was."""
    problems = dict(_INSTALLED)
    try:
        from hypercorn.protocol.ws_stream import WSStream
    except ImportError as exc:
        return dict.fromkeys(REACHES, str(exc))
    if not _wrapped(WSStream, "_accept"):
        return dict.fromkeys(REACHES, problems.get("deflate") or "WSStream._accept is gone")
    if "pings" not in problems and not _wrapped(WSStream, "_send_pings"):
        problems["pings"] = "WSStream._send_pings is gone"
    if "ghosts" not in problems and not _wrapped(WSStream, "_send_error_response"):
        problems["ghosts"] = "WSStream._send_error_response is gone"
    for reach, problem in _check_frames_and_abort().items():
        problems.setdefault(reach, problem)
    problems.setdefault("deflate", _check_decline())
    problems.setdefault("stop", _check_stop_signal())
    problems.setdefault("closes", check_closing_connection())
    return problems


def _wrapped(cls: type, name: str) -> bool:
    return bool(getattr(getattr(cls, name, None), _WRAPPED, False))


def _install() -> dict[str, str]:
    """Wrap ``WSStream._accept``, ``_send_pings`` and ``_send_error_response``.

    Returns:
        The problem, per reach, for those that cannot work (none: an empty dict).
    """
    try:
        from hypercorn.protocol.ws_stream import WSStream
        from wsproto.events import Ping
    except ImportError as exc:
        return dict.fromkeys(REACHES, str(exc))
    accept: Any = getattr(WSStream, "_accept", None)
    if not is_method(accept, ["self", "message"]):
        return dict.fromkeys(REACHES, "WSStream._accept(self, message) is gone")
    problems: dict[str, str] = {}
    pings: Any = getattr(WSStream, "_send_pings", None)
    if not is_method(pings, ["self"]) or not hasattr(WSStream, "_send_wsproto_event"):
        problems["pings"] = "WSStream._send_pings(self) or _send_wsproto_event is gone"
    error_response: Any = getattr(WSStream, "_send_error_response", None)
    if not is_method(error_response, ["self", "status_code"]):
        problems["ghosts"] = "WSStream._send_error_response(self, status_code) is gone"

    async def _accept(stream: Any, message: Message) -> None:
        adapter = message.get(ACCEPT_KEY)
        if isinstance(adapter, HypercornAdapter):
            adapter.accepting(stream)
            message[STREAM_KEY] = stream
        await accept(stream, message)

    async def _send_pings(stream: Any) -> None:
        app = stream.__dict__.get(_APP_TASK)
        if app is None:  # not one of ours
            await pings(stream)
            return
        interval = stream.config.websocket_ping_interval
        while True:
            # The first ping an interval after accept, as uvicorn's (hypercorn's at once:
            # Autobahn's client, writing its first frame in pieces, answered inside it).
            await asyncio.wait((app,), timeout=interval)  # wakes when the handler returns
            if stream.closed or app.done():
                return
            await stream._send_wsproto_event(Ping())

    async def _send_error_response(stream: Any, status_code: int) -> None:
        await error_response(stream, status_code)
        # Hypercorn ends a stream whose client sent data before the handshake's answer
        # (400) without telling its app, which then waits on receive() forever, holding
        # its connection's place. Tell it the client is gone.
        put = stream.__dict__.get("app_put")
        if put is not None and status_code == 400:
            _DISCONNECTS.add(asyncio.get_running_loop().create_task(put(dict(GONE))))
            for task in [t for t in _DISCONNECTS if t.done()]:
                _DISCONNECTS.discard(task)

    _wrap(WSStream, "_accept", _accept, accept)
    if "ghosts" not in problems:
        _wrap(WSStream, "_send_error_response", _send_error_response, error_response)
    if "pings" not in problems:
        _wrap(WSStream, "_send_pings", _send_pings, pings)
    return problems


def _wrap(cls: type, name: str, wrapper: Any, original: Any) -> None:
    setattr(wrapper, _WRAPPED, True)
    wrapper.__wrapped__ = original
    setattr(cls, name, wrapper)


def _on_accept(stream: Any, frames: Frames | None, closes: bool, reach: ServerReach) -> None:
    """Once hypercorn's handshake has built the connection: make it send the close wsproto
    asks for (``closes``), and bound its permessage-deflate (``frames``)."""
    handshake = stream.handshake  # a partial, not a closure (one object for the collector)
    handshake.accept = functools.partial(_accepted, handshake.accept, stream, frames, closes, reach)


def _accepted(
    accept: Any, stream: Any, frames: Frames | None, closes: bool, reach: ServerReach, *args: Any
) -> Any:
    status, headers, connection = accept(*args)
    del stream.handshake.accept  # called once: the partial (and its cycle through the stream)
    if closes:
        cls: Any = closing_connection()
        if type(connection) is cls.__base__:  # exactly wsproto's
            connection.__class__ = cls
            connection.wsfanout_client = stream.client
    if frames is not None and stream.handshake.extensions:  # deflate may be accepted: bound it
        _bound_inflation(connection, frames, reach)
    hypercorn_tcp.upgraded(lean.lighten(stream, connection))  # about 5 KiB less, each
    return status, headers, connection


def _bound_inflation(connection: Any, frames: Frames, reach: ServerReach) -> None:
    """Bound the inflation of a connection's permessage-deflate to the frame limit."""
    try:
        extensions: list[Any] = connection._proto.extensions
    except AttributeError as exc:
        reach.broke("frames", exc)
        return
    cls = bounded_deflate()
    deflate: Any = cls.__base__  # wsproto's own
    for extension in extensions:
        if type(extension) is deflate:  # exactly wsproto's: not one already bounded
            extension.wsfanout_frames = frames
            extension.wsfanout_left = frames.limit
            extension.__class__ = cls


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
    else:
        from hypercorn.protocol import ws_stream

        if not isinstance(getattr(ws_stream, "FrameTooLargeError", None), type):
            problems["abort"] = "hypercorn's FrameTooLargeError is gone"
    return problems


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


_INSTALLED: Final = _install()  # once per process, at import: what could not be wrapped
