"""The only package that knows which ASGI server runs us (hypercorn or uvicorn): every reach
into a server's internals, one adapter per server.

- ``reach.py``: ``ServerReach``, what the app talks to: it finds the server at the app's
  start, attaches that server's adapter, and resets connections through it.
- ``hypercorn.py``: the hypercorn adapter (patches hypercorn's ``WSStream`` once, at import);
  ``hypercorn_signals.py``: how its master and workers take SIGTERM and SIGINT.
- ``uvicorn.py``, ``uvicorn_sansio.py``: the uvicorn adapter (classes ``wsfanout serve``
  configures uvicorn with; the same applied to a running plain ``uvicorn wsfanout:app``).
- ``hypercorn_tcp.py``: the hypercorn adapter's reach into its TCP connections;
  ``hypercorn_direct.py``: its streams' ``write_now`` (a frame without a coroutine);
  ``lean.py``: lighter queues of waiters for its connections' asyncio parts.
- ``keys.py``: the marks on ASGI messages; ``frames.py``: bounded message buffer and
  inflation, closes for invalid frames, and the frame ``write_now`` writes; ``peers.py``:
  per-address caps on connections; ``resets.py``: TCP resets; ``checks.py``: what the
  start-up checks share; ``workers.py``: counting a server's worker processes.

Each reach is checked at the app's start against the installed server, and a warning names
what is lost when a release moved something; tests run against both real servers.
"""

from __future__ import annotations

from .keys import ACCEPT_KEY, STREAM_KEY, TOO_LARGE_KEY
from .peers import PeerLimits
from .reach import ABORT_GRACE, ServerReach
from .workers import warn_if_workers_are_islands

__all__ = [
    "ABORT_GRACE",
    "ACCEPT_KEY",
    "STREAM_KEY",
    "TOO_LARGE_KEY",
    "PeerLimits",
    "ServerReach",
    "warn_if_workers_are_islands",
]
