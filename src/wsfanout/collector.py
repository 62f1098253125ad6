"""Python's garbage collector, tuned for a process that holds tens of thousands of connections.

Theory of operation. Every websocket keeps about a hundred objects the collector tracks (its
tasks, coroutines, futures, the server's parser state). CPython collects the oldest generation
each time the objects that survived younger collections grow by a quarter of those already
old, and each such collection walks every tracked object in the process: while connections
arrive, it walks all of them again and again. Measured at 10,000 browser-like connections
under hypercorn (bench/run.py's capacity scenario, issue 29), the collector took over a third
of the server's CPU per handshake.

``tune()`` does what long-running Python servers do, once per process, after start-up:

- ``gc.collect()`` then ``gc.freeze()``: what start-up left (modules, the service, its
  caches) moves to a generation no collection walks again. It is never collected: fine for
  what lives as long as the process, which is what is alive after start-up.
- ``gc.set_threshold(*THRESHOLDS)``: a young collection every 10,000 allocations rather than
  700, the middle one every 5 of those, and the oldest considered every 40 of those: at most
  once per two million allocations, still only when the old objects have grown by a quarter.
  Young collections this size walk objects still in the CPU's caches: at 19,000 browser-like
  connections under uvicorn the collector took 0.8 s of the handshakes, against 1.1 s with
  (50,000, 20, 10) (bench capacity, three runs each, issue 29). Reference counting
  frees almost everything; what only the collector finds, cycles, waits longer, which the
  soak measures as memory over time (docs/soak.md). So a closed connection leaves no cycle
  (ws.py, servers/: tests/test_garbage.py runs the servers with the collector off and finds
  no cyclic garbage after closes, resets and server closes).

It is process-wide, so it is applied only where wsfanout owns the process (``WSFANOUT_GC=auto``,
the default: ``hypercorn wsfanout:app``, ``uvicorn wsfanout:app``, ``wsfanout serve``), or
where the host asks for it (``tuned``). An app a host builds with ``create_app()`` and mounts
in its own process leaves the host's collector as it is unless the host asks; ``untouched``
never tunes.
"""

from __future__ import annotations

import gc
import logging
from typing import Final

log = logging.getLogger(__name__)

THRESHOLDS: Final = (10_000, 5, 40)
MODES: Final = ("auto", "tuned", "untouched")

_tuned = False


def wanted(mode: str, owns_process: bool) -> bool:
    """Whether ``WSFANOUT_GC`` (``mode``) asks for tuning in this process."""
    return mode == "tuned" or (mode == "auto" and owns_process)


def tune(mode: str, owns_process: bool) -> bool:
    """Freeze what start-up left and raise the thresholds, once per process, if ``mode``
    asks for it; True if this call did."""
    global _tuned
    if _tuned or not wanted(mode, owns_process):
        return False
    _tuned = True
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
    log.info(
        "garbage collector tuned (WSFANOUT_GC=%s): %d objects frozen, thresholds %s",
        mode,
        gc.get_freeze_count(),
        THRESHOLDS,
    )
    return True
