"""The only module that knows which ASGI server runs us: every reach into its internals.

Theory of operation. wsfanout needs two things from its server that ASGI has no words for.

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

Both are checked once, at start, against hypercorn's own classes (a handshake that offers
deflate must come back without it). If a hypercorn release moved something, one warning names
what is lost and the service runs on: compression stays as the server decides, and draining
waits for lifespan shutdown. Under another server nothing here applies; under uvicorn,
``--ws-per-message-deflate false`` declines deflate. ``setup.cfg`` bounds hypercorn to the
releases this was tested with, and tests against real hypercorn fail when a reach stops working.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any, Final

from .types import Message

log = logging.getLogger(__name__)

ACCEPT_KEY: Final = "wsfanout.server"
"""The key in wsfanout's ``websocket.accept`` messages that carries its ``ServerReach``."""

_WRAPPED: Final = "__wsfanout_wrapped__"
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
        on_stopping: awaited once when the server starts stopping (hypercorn's SIGTERM).
    """

    def __init__(self, *, compression: bool, on_stopping: Callable[[], Awaitable[None]]) -> None:
        self.compression = compression
        self.on_stopping = on_stopping
        self.can_decline = False  # hypercorn's handshake can be told to decline deflate
        self.can_watch = False  # hypercorn's stop signal can be watched
        self._accept: Message = {"type": "websocket.accept"}
        self._watcher: asyncio.Task[None] | None = None
        self._broken: set[str] = set()

    def start(self) -> None:
        """Find the server's internals, once per app start; warn once about what is missing."""
        if "hypercorn" not in sys.modules:
            if not self.compression:
                log.info(
                    "not under hypercorn: permessage-deflate is left to the server "
                    "(under uvicorn, pass --ws-per-message-deflate false to decline it)"
                )
            return
        problems = _install_into_hypercorn()
        if not problems:
            problems = {"deflate": _check_decline(), "stop": _check_stop_signal()}
        self.can_decline = not problems.get("deflate")
        self.can_watch = not problems.get("stop")
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
        if lost:
            log.warning(
                "hypercorn %s is not a release wsfanout was tested with: %s",
                _version("hypercorn"),
                "; ".join(lost),
            )
        if self.can_decline or self.can_watch:
            self._accept = {"type": "websocket.accept", ACCEPT_KEY: self}

    def accept_message(self) -> Message:
        """The ``websocket.accept`` message to send (one shared object: servers only read it)."""
        return self._accept

    async def close(self) -> None:
        """Stop watching the server (not from inside ``on_stopping`` itself)."""
        watcher, self._watcher = self._watcher, None
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    def accepting(self, stream: Any) -> None:
        """Called by the wrapped hypercorn accept, before it answers the handshake."""
        if self.can_decline and not self.compression:
            try:
                stream.handshake.extensions = None
            except AttributeError as exc:
                self._broke("deflate", exc)
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
        log.info("the server is stopping: closing every websocket with 1001")
        await self.on_stopping()

    def _broke(self, reach: str, exc: Exception) -> None:
        if reach == "deflate":
            self.can_decline = False
        else:
            self.can_watch = False
        if reach not in self._broken:
            self._broken.add(reach)
            log.warning("a reach into hypercorn stopped working (%s): %s", reach, exc)


def _install_into_hypercorn() -> dict[str, str]:
    """Wrap ``WSStream._accept`` once per process; the problem, per reach, if it cannot be."""
    try:
        from hypercorn.protocol.ws_stream import WSStream
    except ImportError as exc:
        return {"deflate": str(exc), "stop": str(exc)}
    original = getattr(WSStream, "_accept", None)
    if original is None or not inspect.iscoroutinefunction(original):
        problem = "hypercorn.protocol.ws_stream.WSStream._accept is gone"
        return {"deflate": problem, "stop": problem}
    if getattr(original, _WRAPPED, False):
        return {}
    if list(inspect.signature(original).parameters) != ["self", "message"]:
        problem = "WSStream._accept no longer takes (self, message)"
        return {"deflate": problem, "stop": problem}

    async def _accept(stream: Any, message: Message) -> None:
        reach = message.get(ACCEPT_KEY)
        if isinstance(reach, ServerReach):
            reach.accepting(stream)
        await original(stream, message)

    setattr(_accept, _WRAPPED, True)
    _accept.__wrapped__ = original  # type: ignore[attr-defined]
    WSStream._accept = _accept  # type: ignore[method-assign,assignment]
    return {}


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
