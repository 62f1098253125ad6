"""``ServerReach``: what one app asks of the ASGI server that runs it, and whether that server
can give it. At the app's start it finds which server runs us and attaches that server's
adapter (hypercorn.py, uvicorn.py), which checks its reaches once and warns once about what
is lost; afterwards the app talks to the reach only, whatever the server.

Under another server nothing here applies, and the start-up log says so.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

from ..types import Message
from .checks import release
from .keys import ACCEPT_KEY, STREAM_KEY
from .peers import PeerLimits
from .resets import reset

if TYPE_CHECKING:
    from .hypercorn import HypercornAdapter
    from .uvicorn import UvicornAdapter

log = logging.getLogger(__package__)  # one logger for the servers package: "wsfanout.servers"

_STOPPING: Final = "the server is stopping: closing every websocket with 1001"
STOP_MARGIN: Final = 0.5  # seconds a stopping connection ends before the server cancels it
STOP_MIN_WAIT: Final = 0.1  # the shortest wait for a client, however late the stop
ABORT_GRACE: Final = 1.0  # seconds to read on after a reset, until the server says it is gone


class ServerReach:
    """What one app asks of the server that runs it, and whether the server can give it.

    Args:
        compression: accept permessage-deflate when offered (False: decline it).
        on_stopping: awaited once when the server starts stopping (its SIGTERM).
        frame_limit: the largest inbound message the app takes, in bytes (0: the server's).
        too_large: the error frame that explains a message over the limit, where the
            server refuses it before the app sees it (uvicorn).
        peers: the per-address caps and the head timeout, for every connection of the
            process (the last app to start sets them).
    """

    def __init__(
        self,
        *,
        compression: bool,
        on_stopping: Callable[[], Awaitable[None]],
        frame_limit: int = 0,
        too_large: str = "",
        peers: PeerLimits | None = None,
    ) -> None:
        self.compression = compression
        self.on_stopping = on_stopping
        self.frame_limit = frame_limit
        self.too_large = too_large
        self.peer_limits = peers or PeerLimits()
        self.name = "an unknown server"  # which server runs us, for the start-up log
        self.can_decline = False  # the server can be told to decline deflate
        self.can_watch = False  # the server's stop signal can be watched (or its stop drained)
        self.can_stop_pings = False  # hypercorn's pings can be ended with the connection
        self.can_bound = False  # inbound messages (and their inflation) can be bounded
        self.can_abort = False  # a connection can be reset
        self.stop_at: float | None = None  # loop time a stopping server cancels what is left
        self._server: HypercornAdapter | UvicornAdapter | None = None
        self._holds: UvicornAdapter | None = None  # the server that holds its 101 (accepting)
        self._accept: Message = {"type": "websocket.accept"}
        self._broken: set[str] = set()

    def start(self) -> None:
        """Find the server's internals, once per app start; warn once about what is missing."""
        if "uvicorn.server" in sys.modules:
            from . import uvicorn

            server = uvicorn.running_server()
            if server is not None:
                self.name = f"uvicorn {release('uvicorn')}"
                self._server = self._holds = uvicorn.attach(self, server)
                return
        if "hypercorn" not in sys.modules:
            if not self.compression:
                log.info(
                    "neither hypercorn nor uvicorn runs wsfanout: permessage-deflate, the "
                    "frame limit and draining on SIGTERM are left to the server"
                )
            return
        from . import hypercorn  # wraps hypercorn's classes, once per process

        self.name = f"hypercorn {release('hypercorn')}"
        adapter = self._server = hypercorn.attach(self)
        if any(
            (self.can_decline, self.can_watch, self.can_stop_pings, self.can_bound, self.can_abort)
        ):
            self._accept = {"type": "websocket.accept", ACCEPT_KEY: adapter}

    @property
    def deflate(self) -> str:
        """What happens to a client's permessage-deflate offer, for the start-up log."""
        if self.compression:
            return "accepted"
        return "declined" if self.can_decline else "left to the server"

    def accept_message(self) -> Message:
        """The ``websocket.accept`` message to send: a copy, as middleware may change it."""
        return dict(self._accept)

    def accepting(self, receive: Any) -> None:
        """Just before the accept is sent: uvicorn's 101 waits for the welcome, to go out in
        one write with it (hypercorn writes its own as it accepts)."""
        if self._holds is not None:
            self._holds.accepting(receive)

    def accepted(self, accept: Message, receive: Any) -> Any:
        """The server's handle on a connection just accepted (for ``abort``), or None.

        Args:
            accept: the accept message as sent (hypercorn's wrapped accept left its stream).
            receive: the connection's ASGI ``receive`` (uvicorn's is its protocol's method).
        """
        stream = accept.get(STREAM_KEY)
        if stream is None and self._server is not None:
            return self._server.accepted(receive)
        return stream

    def direct(self, stream: Any, send: Any) -> Any:
        """The connection's way to write a frame without a coroutine (``write_now``, see
        outbox.py's ``DirectWriter``), or None: only where ``send`` is that connection's own
        (no middleware between, which must see every message) and its server has one."""
        if getattr(send, "__self__", None) is stream and hasattr(stream, "write_now"):
            return stream
        return None

    async def close(self) -> None:
        """Stop watching the server (not from inside ``on_stopping`` itself)."""
        if self._server is not None:
            await self._server.close()

    async def stopping(self) -> None:
        """The server starts stopping: drain the app (every socket gets 1001)."""
        log.info(_STOPPING)
        await self.on_stopping()

    def within_stop(self, seconds: float, after: float = 0.0) -> float:
        """How long a connection may wait for its client: ``seconds``, or less once the
        server is stopping, so that the wait and ``after`` (more seconds the connection
        needs) end ``STOP_MARGIN`` before the server cancels it (hypercorn's graceful
        timeout: a cancelled connection task is a traceback under Python 3.11 and 3.12)."""
        if self.stop_at is None:
            return seconds
        left = self.stop_at - asyncio.get_running_loop().time() - STOP_MARGIN - after
        return max(min(seconds, left), STOP_MIN_WAIT)

    def flush_by(self, seconds: float) -> float | None:
        """The loop time a stopping connection's writer gives up on a client that does not
        read what is queued for it: ``seconds`` from now, or sooner, so that its close (a
        short wait) and reset (``ABORT_GRACE``) still end in time (``within_stop``). None
        where the server cancels nothing (uvicorn: its adapter resets what is left)."""
        if self.stop_at is None:
            return None
        wait = self.within_stop(seconds, STOP_MIN_WAIT + ABORT_GRACE)
        return asyncio.get_running_loop().time() + wait

    def client_code(self, stream: Any) -> int | None:
        """The close code the client sent on ``stream`` (from ``accepted``), where the
        server does not say it (hypercorn's ``websocket.disconnect`` says 1006 for every
        close the client starts); None: unknown here."""
        code = getattr(getattr(stream, "connection", None), "wsfanout_code", None)
        return code if isinstance(code, int) else None

    def gone(self, stream: Any) -> bool:
        """Whether the TCP connection under ``stream`` (from ``accepted``) is lost or closing:
        the server knows at once (its transport's ``connection_lost``), the app only once it
        reads the disconnect, which it does not while its reading is paused (ws.py)."""
        transport = self._transport(stream)
        return transport is not None and bool(transport.is_closing())

    def abort(self, stream: Any) -> bool:
        """Reset the TCP connection under ``stream`` (from ``accepted``): the kernel drops
        what it still holds for the client. False if that cannot be done here."""
        transport, server = self._transport(stream), self._server
        if transport is None or server is None:
            return False
        reset(transport)
        try:
            server.aborted(stream)
        except AttributeError as exc:
            self.broke("abort", exc)
        return True

    def _transport(self, stream: Any) -> Any:
        """The asyncio transport under ``stream``, or None where there is none to reach."""
        if stream is None or not self.can_abort or self._server is None:
            return None
        try:
            return self._server.transport(stream)
        except AttributeError as exc:
            self.broke("abort", exc)
            return None

    def broke(self, reach: str, exc: Exception) -> None:
        """A reach failed on a connection: use it no more, and warn the first time."""
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
