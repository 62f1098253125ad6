"""The hypercorn adapter's reach into hypercorn's TCP connections (its asyncio workers, uvloop
included): the per-address caps and the head and body timeouts of peers.py. It wraps
``hypercorn.asyncio.tcp_server.TCPServer.run`` once, when this module is imported (hypercorn.py
imports it), because hypercorn has no hook where a connection is accepted, nor a cap per
address.

Theory of operation. Hypercorn makes a ``TCPServer`` for each accepted connection and awaits
its ``run``. The wrapped ``run`` first counts the connection in the process's ``PEERS``, by
the address its socket is connected to; over a cap, it resets the connection before
hypercorn reads a byte of it, and returns. Hypercorn restarts a connection's ``idle_task``
each time the connection waits for a request head (at its start and after each response)
and stops it when a head is whole, so that task is wrapped in ``_Idle``, which tells the
peer and hands on. A whole head leaves the connection waiting for its body (a GET's empty
one too); hypercorn has no hook where a body ends, but it reads from the connection again
only once it has handled all it read before, so the connection's reader is wrapped on the
instance (``_read``): there, the request is whole once h11 (``ProtocolWrapper.protocol
.connection``) no longer waits for the body. A first head has ``PeerLimits.head_timeout``
(a timer closes the connection, as hypercorn closes an idle one), or hypercorn's own idle
timeout (``keep_alive_timeout``, 5 s unless told) if that is shorter; between two requests
hypercorn's own applies; a body has ``PeerLimits.body_timeout`` (hypercorn itself closes a
connection whose app answered without reading the whole body). Under hypercorn's trio
worker none of this applies.

The caps are the process's: the last wsfanout app to start in it sets them (``configure``).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any, Final

import h11

from .checks import is_method
from .peers import Peer, PeerLimits, Peers, Wait
from .resets import reset

PEERS: Final = Peers()  # what each address holds of this process's hypercorn connections
_WRAPPED: Final = "__wsfanout_wrapped__"


class _Idle:
    """Stands in for a hypercorn connection's idle task: tells the peer when the connection
    starts and stops waiting for a request head (its body, if any, is ``_read``'s), and
    hands each call on."""

    __slots__ = ("_idle", "_peer", "late")

    def __init__(self, idle: Any, peer: Peer) -> None:
        self._idle = idle
        self._peer = peer
        self.late: asyncio.TimerHandle | None = None  # the first head's timeout

    async def restart(self, task_group: Any, action: Any) -> None:
        self._peer.waiting()
        await self._idle.restart(task_group, action)

    async def stop(self) -> None:
        # A whole request head (or the connection closing): its body, if any, is read next.
        if not self._peer.transport.is_closing():
            self._peer.reading()
        if self.late is not None:
            self.late.cancel()
            self.late = None
        await self._idle.stop()


def configure(limits: PeerLimits) -> str:
    """Set this process's caps and head timeout. Returns the problem ("" if none) when
    hypercorn's connections cannot be counted."""
    PEERS.limits = limits
    return check()


def check() -> str:
    """Is ``TCPServer.run`` still wrapped, and a connection's idle task and h11 state
    where they were? ("" if so)."""
    if _INSTALLED:
        return _INSTALLED
    try:
        from hypercorn.asyncio.tcp_server import TCPServer
        from hypercorn.asyncio.worker_context import WorkerContext
        from hypercorn.config import Config

        if not getattr(TCPServer.run, _WRAPPED, False):
            return "TCPServer.run is not wrapped"
        cls: Any = TCPServer  # made here with nothing but what it keeps
        server = cls(None, None, Config(), WorkerContext(None), None, None, None)
        idle = server.idle_task
        if not {"writer", "reader", "config"} <= vars(server).keys():
            return "TCPServer has no 'writer', 'reader' or 'config'"
        float(server.config.keep_alive_timeout)
        from hypercorn.protocol import ProtocolWrapper

        made: Any = ProtocolWrapper  # as TCPServer.run makes it, but with nothing to serve
        wrapper = made(None, Config(), WorkerContext(None), None, None, False, None, None, None)
        if wrapper.protocol.connection.their_state is not h11.IDLE:
            return "a connection's h11 state is not where it was"
    except Exception as exc:  # any change in how hypercorn makes a connection
        return f"hypercorn's TCPServer changed: {exc!r}"
    restart = getattr(idle, "restart", None)
    stop = getattr(idle, "stop", None)
    if not is_method(restart, ["task_group", "action"]) or not is_method(stop, []):
        return "a connection's idle_task has no 'restart(task_group, action)' and 'stop()'"
    return ""


def _install() -> str:
    """Wrap ``TCPServer.run``. Returns the problem, or "" when done."""
    try:
        from hypercorn.asyncio.tcp_server import TCPServer
    except ImportError as exc:
        return str(exc)
    run: Any = getattr(TCPServer, "run", None)
    if not is_method(run, ["self"]):
        return "TCPServer.run(self) is gone"

    async def _run(server: Any) -> None:
        writer = server.writer
        peer = PEERS.arrive(writer.get_extra_info("peername"), writer.transport)
        if peer is None:  # its address holds too much already
            reset(writer.transport)
            writer.close()
            return
        idle = server.idle_task = _Idle(server.idle_task, peer)
        server.reader.read = functools.partial(_read, server, peer, server.reader.read)
        timeout = PEERS.limits.head_timeout
        if timeout < server.config.keep_alive_timeout:  # else hypercorn's own closes it first
            idle.late = asyncio.get_running_loop().call_later(
                timeout, _head_late, writer.transport, peer
            )
        try:
            await run(server)
        finally:
            if idle.late is not None:
                idle.late.cancel()
            peer.left()
            _let_go(server)

    setattr(_run, _WRAPPED, True)
    _run.__wrapped__ = run  # type: ignore[attr-defined]
    setattr(TCPServer, "run", _run)  # noqa: B010 - mypy: not a method of its own
    return ""


async def _read(server: Any, peer: Peer, read: Callable[[int], Awaitable[bytes]], n: int) -> bytes:
    """Hypercorn reads from the connection again: it has handled all it read before, so
    whether its request is whole, head and body, is known now."""
    if peer.wait is Wait.BODY:
        protocol = getattr(server.protocol, "protocol", None)  # H11Protocol or H2Protocol
        connection = getattr(protocol, "connection", None)  # h11's (not under h2)
        if getattr(connection, "their_state", None) is not h11.SEND_BODY:
            peer.started()
    return await read(n)


def upgraded(server: Any) -> None:
    """An HTTP/1.1 connection is a websocket now (the app accepted it): it has no request
    bodies left to watch, so ``_read`` goes. (An HTTP/2 connection carries other requests.)"""
    from hypercorn.protocol.h11 import H11Protocol

    protocol = getattr(getattr(server, "protocol", None), "protocol", None)
    reader = getattr(server, "reader", None)
    if isinstance(protocol, H11Protocol) and reader is not None:
        vars(reader).pop("read", None)


def _let_go(server: Any) -> None:
    """A connection has ended. Its parts refer to each other (the server, its protocol and
    that protocol's ``send``; the read wrapper above; an error's traceback through the
    server's closing frame), so they would be freed only at the collector's next full pass,
    a rare one with tens of thousands of connections held (collector.py). Dropping the
    server's own references lets reference counting free the connection as it ends: the
    app's coroutine, its streams, its buffers."""
    reader = server.reader
    vars(reader).pop("read", None)
    # Its reader and writer stay: the app may still ask whether its stream's transport is
    # gone (ServerReach.gone) until it has read the disconnect.
    server.protocol = server.idle_task = None
    # asyncio's own: a reset's error, kept by the reader and the closing future, holds the
    # frames it passed through (the transport's read, the close), which hold them back;
    # and a selector transport keeps its read callback, a method of itself.
    error = reader.exception()
    if error is not None:
        error.__traceback__ = None
    transport = server.writer.transport
    if transport.is_closing() and getattr(transport, "_read_ready_cb", None) is not None:
        transport._read_ready_cb = None


def _head_late(transport: Any, peer: Peer) -> None:
    """No whole request head in time: close the connection (hypercorn sees its end)."""
    if peer.fresh and not transport.is_closing():
        transport.close()


_INSTALLED: Final = _install()  # once per process, at import: "" if wrapped
