"""Loaded by every Python process started with this folder on its path (tests/test_garbage.py):
the collector is off, and SIGUSR1 makes one full collection that keeps what it finds
(``DEBUG_SAVEALL``) and writes, per type, how many of those objects it found to
``garbage-PID.json`` in ``$WSFANOUT_DATA_DIR``, then frees it. Only cycles reach the collector: what
reference counting freed is not there."""

from __future__ import annotations

import collections
import gc
import json
import os
import signal
from pathlib import Path


def _report(signum: object, frame: object) -> None:
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        found = collections.Counter(
            f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage
        )
        gc.garbage.clear()
    finally:
        gc.set_debug(0)
    gc.collect()  # and frees it: the next report has only what came since
    path = Path(os.environ["WSFANOUT_DATA_DIR"]) / f"garbage-{os.getpid()}.json"
    part = path.with_suffix(".part")
    part.write_text(json.dumps(found))
    part.rename(path)


if "WSFANOUT_DATA_DIR" in os.environ:
    gc.disable()
    signal.signal(signal.SIGUSR1, _report)
