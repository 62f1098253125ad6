"""How servers run workers: ``warn_if_workers_are_islands`` counts the processes
multiprocessing spawned beside this one (not its helpers, such as the resource tracker)."""

from __future__ import annotations

import logging
import multiprocessing
from pathlib import Path

log = logging.getLogger(__package__)  # one logger for the servers package: "wsfanout.servers"


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
