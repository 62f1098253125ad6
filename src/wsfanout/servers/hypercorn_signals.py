"""How hypercorn's master and its workers take SIGTERM and SIGINT: every reach into that,
beside hypercorn.py's (issue 24). The worker's reach is installed once, when this module is
imported (hypercorn.py imports it at the app's start); the master's, for the time
``run_master`` runs hypercorn's master.

Theory of operation. Hypercorn runs a master process and ``--workers`` worker processes (one
by default). On SIGTERM or SIGINT the master sets a multiprocessing Event, which each worker
polls every 0.1 s; a worker that sees it stops (hypercorn.py, reach 2: wsfanout then closes
every socket with 1001). Two things broke that:

1. The master sets the Event inside its signal handler, holding the Event's lock. A second
   signal that lands meanwhile runs the handler again on the same thread, which then waits
   for that lock forever: the master hangs for good, and each worker with it at its next
   poll (a supervisor that signals twice; ``just`` forwarding a terminal's Ctrl-C).
   ``run_master`` runs hypercorn's master with hypercorn's handler swapped, as hypercorn
   installs it, for one that only writes the signal's number down a pipe: a signal landing
   while it runs changes nothing. A thread of this module reads the pipe and runs
   hypercorn's handler, once, outside any signal handler. The same handler takes SIGTERM
   before hypercorn does (while it starts its workers, when the default would kill the
   master and leave the workers running). ``wsfanout serve`` runs this; the master of plain
   ``hypercorn wsfanout:app`` never imports wsfanout and keeps hypercorn's own handler.

2. A worker leaves SIGTERM at its default (and ignores SIGINT): a signal sent to the
   process group (systemd, container runtimes, a terminal) reached the workers too, and
   they died at once, before any drain. Hypercorn's worker waits for its master's Event in
   ``raise_shutdown`` (``hypercorn.asyncio.run``); this module replaces that function with
   one that, in a worker whose stop hypercorn leaves to its master, takes SIGTERM and SIGINT
   on the worker's event loop (asyncio's handler only records the signal) and ends the wait
   on the first of them too. The worker then stops as if its master had asked it: every
   socket gets 1001, and further signals change nothing. The replacement is in place before
   the worker calls it: the app starts before hypercorn's worker starts serving.

``check`` and ``check_master`` say what cannot work with the installed hypercorn; the app's
start warns about the worker's reach, ``run_master`` about the master's, and each then runs
as hypercorn does. tests/test_signals.py signals real servers (the group, the master, and
floods of both) and fails when either reach stops working.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any, Final

from .checks import is_method, release

log = logging.getLogger(__package__)  # one logger for the servers package: "wsfanout.servers"

STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)
CLOSE_WAIT: Final = 5.0  # seconds for the master's signal thread to end once hypercorn's run has
_OURS: Final = "__wsfanout_stop__"  # set on the raise_shutdown this module installed
_HYPERCORNS_STOP: Final = "run.<locals>.shutdown"  # the master's handler, in hypercorn.run

Trigger = Callable[[], Awaitable[Any]]


def check() -> dict[str, str]:
    """The problem with the workers' reach, if any, as ``{"signals": problem}``."""
    try:
        from hypercorn.asyncio import run as worker
    except ImportError as exc:
        return {"signals": str(exc)}
    if not getattr(getattr(worker, "raise_shutdown", None), _OURS, False):
        return {"signals": _INSTALLED or "hypercorn.asyncio.run.raise_shutdown is not ours"}
    return {}


def _install() -> str:
    """Replace ``hypercorn.asyncio.run.raise_shutdown``; the problem if it cannot be ("")."""
    try:
        from hypercorn.utils import ShutdownError, check_multiprocess_shutdown_event

        worker: Any = importlib.import_module("hypercorn.asyncio.run")
    except ImportError as exc:
        return str(exc)
    original: Any = getattr(worker, "raise_shutdown", None)
    if getattr(original, _OURS, False):
        return ""
    if not is_method(original, ["shutdown_event"]):
        return "hypercorn.asyncio.run.raise_shutdown(shutdown_event) is gone"

    async def raise_shutdown(shutdown_event: Trigger) -> None:
        stop = _own_stop(shutdown_event, check_multiprocess_shutdown_event)
        if stop is None:  # not a worker hypercorn's master stops: hypercorn's own
            await original(shutdown_event)
            return
        waits = [asyncio.ensure_future(shutdown_event()), asyncio.ensure_future(stop.wait())]
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        for wait in done:
            wait.result()  # the master's wait failed: as it would have without us
        # Stopping: further signals change nothing, ignored from now on rather than left to
        # the loop, which closes its wakeup pipe before it takes its handlers off (a signal
        # in between was "Exception ignored ... Bad file descriptor" on stderr).
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        raise ShutdownError()

    setattr(raise_shutdown, _OURS, True)
    raise_shutdown.__wrapped__ = original  # type: ignore[attr-defined]
    worker.raise_shutdown = raise_shutdown
    return ""


def _own_stop(trigger: Trigger, master_poll: Any) -> asyncio.Event | None:
    """In a worker that waits for its master's Event (``trigger`` is hypercorn's poll of
    it) and has SIGTERM at its default: an event set by the worker's own SIGTERM or SIGINT,
    taken on the running loop from now on. Otherwise None: hypercorn handles the signals
    in this process itself (``--workers 0``), or someone else does."""
    if not (isinstance(trigger, functools.partial) and trigger.func is master_poll):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        return None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, _stop_worker, stop, signum)
    return stop


def _stop_worker(stop: asyncio.Event, signum: int) -> None:
    """On the event loop, after asyncio recorded the signal: stop this worker, once."""
    if not stop.is_set():
        log.info("%s: this worker stops", signal.Signals(signum).name)
        stop.set()


class _Deferred:
    """Stop signals recorded by a handler that only writes their number down a pipe; a thread
    runs hypercorn's handler, once, on the first of them (received first or adopted first)."""

    def __init__(self) -> None:
        self.received = 0  # the first stop signal's number, 0 before any
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._lock = threading.Lock()  # the thread's and adopt's, never a signal handler's
        self._handler: Callable[[int, FrameType | None], Any] | None = None
        self._done = False
        self._thread = threading.Thread(target=self._run, name="wsfanout-stop", daemon=True)
        self._thread.start()

    def record(self, signum: int, frame: FrameType | None) -> None:
        """The signal handler: one write, so a signal landing meanwhile changes nothing."""
        with contextlib.suppress(OSError):  # the pipe is full: a stop is on its way already
            os.write(self._write, bytes((signum,)))

    def adopt(self, handler: Callable[[int, FrameType | None], Any]) -> None:
        """Hypercorn installs ``handler``: run it for a signal received before, if any."""
        with self._lock:
            self._handler = handler
        self._act()

    def close(self) -> None:
        """Stop the thread (it reads the end of the pipe) and close the pipe."""
        os.close(self._write)
        self._thread.join(CLOSE_WAIT)
        if not self._thread.is_alive():  # else still in hypercorn's handler: leave it be
            os.close(self._read)

    def _run(self) -> None:
        while data := os.read(self._read, 512):
            with self._lock:
                self.received = self.received or data[0]
            self._act()

    def _act(self) -> None:
        with self._lock:
            handler, signum = self._handler, self.received
            if handler is None or not signum or self._done:
                return
            self._done = True
        handler(signum, None)  # not in a signal handler: it may take its locks


class _SignalModule:
    """What ``hypercorn.run`` sees as its ``signal`` module while ``run_master`` runs it:
    the module itself, but the stop handler hypercorn installs goes to ``_Deferred``,
    whose recording handler is installed instead."""

    def __init__(self, deferred: _Deferred) -> None:
        self._deferred = deferred

    def __getattr__(self, name: str) -> Any:
        return getattr(signal, name)

    def signal(self, signalnum: int, handler: Any) -> Any:
        if signalnum in STOP_SIGNALS and _is_hypercorns_stop(handler):
            self._deferred.adopt(handler)
            handler = self._deferred.record
        return signal.signal(signalnum, handler)


def _is_hypercorns_stop(handler: Any) -> bool:
    return (
        getattr(handler, "__module__", None) == "hypercorn.run"
        and getattr(handler, "__qualname__", None) == _HYPERCORNS_STOP
    )


def check_master() -> str:
    """The problem with the master's reach ("" if none): ``hypercorn.run.run`` must still
    install a ``shutdown`` of its own through its module's ``signal.signal``."""
    try:
        from hypercorn import run as master
    except ImportError as exc:
        return str(exc)
    if getattr(master, "signal", None) is not signal:
        return "hypercorn.run has no signal module of its own"
    code = getattr(getattr(master, "run", None), "__code__", None)
    inner = [getattr(const, "co_qualname", None) for const in getattr(code, "co_consts", ())]
    if code is None or "signal" not in code.co_names or _HYPERCORNS_STOP not in inner:
        return "hypercorn.run.run no longer installs its shutdown handler with signal.signal"
    return ""


def run_master(config: Any) -> int:
    """Run hypercorn's master (``hypercorn.run.run``) with a stop handler that cannot hang.

    Returns:
        hypercorn's exit code; 0 when a worker died of the stop signal it was sent after
        the master was asked to stop (a signal that came after the worker's own drain).
        SIGINT and SIGTERM are ignored from then on: the master is done and about to exit,
        and a signal still arriving (a supervisor repeating it) must not turn its exit 0
        into a death by that signal, as their default would.
    """
    master: Any = importlib.import_module("hypercorn.run")
    problem = check_master()
    if problem:
        log.warning(
            "hypercorn %s is not a release wsfanout was tested with: its master keeps its own "
            "SIGTERM handler, which can hang for good on a second signal (%s)",
            release("hypercorn"),
            problem,
        )
        return int(master.run(config))
    deferred = _Deferred()
    for signum in STOP_SIGNALS:
        signal.signal(signum, deferred.record)
    master.signal = _SignalModule(deferred)
    try:
        code = int(master.run(config))
        # hypercorn leaves workers it told to stop to the interpreter's exit, which waits
        # for them: wait here, while a signal still only records (each worker's stop is
        # bounded by its drain and hypercorn's graceful timeout).
        for child in multiprocessing.active_children():
            child.join()
    finally:
        master.signal = signal
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)  # see "Returns"
        deferred.close()
    if deferred.received and code in (-signal.SIGTERM, -signal.SIGINT):
        return 0
    return code


_INSTALLED: Final = _install()  # once per process, at import: the problem, if any
