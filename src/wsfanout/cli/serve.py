"""``wsfanout serve``: hypercorn or uvicorn (``--server``, else ``$WSFANOUT_SERVER``), on a
socket bound here, with the database, the secret key and the JWT keys checked first.

Under hypercorn its master runs with a stop handler that cannot hang on a second signal
(servers/hypercorn_signals.py). Under uvicorn the server is configured with wsfanout's
classes (servers/uvicorn.py): the head-timed h11 protocol, the websockets-sansio protocol
that explains its refusals, and a ``uvicorn.Server`` that drains the app before its own
shutdown.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import importlib.util
import math
import os
import signal
import socket
import stat
import sys
from pathlib import Path
from typing import Any, Final

from ..config import Settings
from ..store import Store
from ..tokens import KeyConfigError, TokenVerifier
from .command import CommandError, install_extra, with_store

DEFAULT_BIND: Final = "127.0.0.1:8000"
PING_INTERVAL: Final = 20.0
GRACEFUL_TIMEOUT: Final = 10.0
BACKLOG: Final = 2048  # pending connections: a reconnect storm must not be refused
# Seconds uvicorn's supervisor waits for a worker's answer before it kills it (uvicorn's 5 s
# killed a worker holding 19,000 connections on a busy machine, and every one of them).
WORKER_HEALTHCHECK: Final = 30
SERVERS: Final = ("hypercorn", "uvicorn")
SERVER_VARIABLE: Final = "WSFANOUT_SERVER"
STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)


def cmd_serve(settings: Settings, args: argparse.Namespace) -> None:
    if not 0 <= args.ping_interval < math.inf:
        raise CommandError("--ping-interval must be 0 (no pings) or a positive number of seconds")
    if args.server not in SERVERS:
        choices = ", ".join(SERVERS)
        raise CommandError(
            f"--server {args.server!r} (or ${SERVER_VARIABLE}): expected one of {choices}"
        )
    if args.forwarded_allow_ips is not None and not args.proxy_headers:
        raise CommandError("--forwarded-allow-ips means nothing without --proxy-headers")
    if args.proxy_headers and args.server != "uvicorn":
        raise CommandError("--proxy-headers needs --server uvicorn (hypercorn has no such setting)")
    run = _serve_hypercorn
    if args.server == "uvicorn":
        _need_uvicorn()
        run = _serve_uvicorn
    _preflight(settings)
    if args.workers > 1 and not settings.redis_url:
        print(
            "warning: --workers > 1 without WSFANOUT_REDIS_URL: each worker fans out only to its "
            "own connections",
            file=sys.stderr,
        )
    bind, listening = _listen(args.bind, BACKLOG)
    if listening is not None:
        host, port = listening.getsockname()[:2]
        print(
            f"wsfanout serving on http://{_url_host(host)}:{port}/ with {args.server}", flush=True
        )
    try:
        code = run(settings, args, bind)
    finally:
        if listening is not None:
            with contextlib.suppress(OSError):  # the server may have closed it already
                listening.close()
    if code:
        raise CommandError(f"the server stopped with exit code {code}: its log says why")


APP: Final = "wsfanout:app"


def _serve_hypercorn(
    settings: Settings, args: argparse.Namespace, bind: str, app: str = APP
) -> int:
    """hypercorn's master serving ``app`` (another: tests/conformance's echo app)."""
    from hypercorn.config import Config

    from ..servers.hypercorn_signals import run_master

    config = Config()
    config.application_path = app
    config.bind = [bind]
    config.backlog = BACKLOG
    config.workers = args.workers
    config.websocket_ping_interval = args.ping_interval or None
    config.graceful_timeout = GRACEFUL_TIMEOUT  # time to close every socket with 1001
    # wsfanout bounds its streams' messages itself (servers/); should that reach fail,
    # hypercorn's own limit is ours.
    config.websocket_max_message_size = settings.max_frame_bytes
    config.accesslog = "-" if args.access_log else None
    config.errorlog = "-"
    config.loglevel = settings.log_level.upper()
    # hypercorn's asyncio worker spends several turns of its loop on each connection that the
    # per-address caps refuse, so a flood of refused clients reconnecting at once delayed
    # everyone else by seconds; under its uvloop worker, by milliseconds (docs: Limits).
    if importlib.util.find_spec("uvloop") is not None:
        config.worker_class = "uvloop"
    # hypercorn's master, its stop handler one that cannot hang on a second signal
    return run_master(config)


def uvicorn_options(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """What ``wsfanout serve --server uvicorn`` tells uvicorn, as ``uvicorn.Config``
    arguments; the README lists the same as command-line flags."""
    ping = args.ping_interval or None
    return {
        "ws": "websockets-sansio",
        "ws_per_message_deflate": settings.compression,
        "ws_max_size": settings.max_frame_bytes,
        "ws_ping_interval": ping,
        "ws_ping_timeout": ping,
        "loop": "auto",  # uvloop where installed
        "http": "h11",  # httptools bounds neither a request head's size nor its time
        "lifespan": "on",
        "proxy_headers": args.proxy_headers,
        "forwarded_allow_ips": args.forwarded_allow_ips or "127.0.0.1",
        "server_header": False,
        "timeout_graceful_shutdown": GRACEFUL_TIMEOUT,
        "timeout_worker_healthcheck": WORKER_HEALTHCHECK,
        "backlog": BACKLOG,
        "workers": args.workers,
        "access_log": args.access_log,
        "log_level": settings.log_level,
    }


def _need_uvicorn() -> None:
    """One line naming what to install, if uvicorn or its websockets protocol is missing."""
    try:
        import uvicorn  # noqa: F401
        import websockets  # noqa: F401  (uvicorn's websockets-sansio protocol needs it)
    except ImportError as exc:
        raise CommandError(
            f"--server uvicorn needs uvicorn and websockets ({exc}): {install_extra('uvicorn')}"
        ) from None


def _serve_uvicorn(settings: Settings, args: argparse.Namespace, bind: str, app: str = APP) -> int:
    """uvicorn serving ``app`` (another: tests/conformance's echo app)."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from ..servers.uvicorn import DrainingServer, HeadTimedH11Protocol
    from ..servers.uvicorn_sansio import ExplainingSansIOProtocol

    options = uvicorn_options(settings, args)
    # The protocols the flags name ("h11", "websockets-sansio"), with what wsfanout adds to
    # them, passed as classes: nothing of uvicorn's is patched when the app starts.
    options.update(http=HeadTimedH11Protocol, ws=ExplainingSansIOProtocol)
    config = uvicorn.Config(app, log_config=_uvicorn_log_config(args.access_log), **options)
    path = None
    if bind.startswith("unix:"):
        path = Path(bind[len("unix:") :])
        sock = _listen_unix(path)
    else:  # fd://N, ours from _listen or the caller's: uvicorn closes what it is given
        sock = socket.socket(fileno=os.dup(int(bind[len("fd://") :])))
    server = DrainingServer(config)  # the drain before uvicorn's shutdown is its own
    # uvicorn re-raises the SIGTERM or SIGINT it handled once it has stopped, to die of it
    # (SIGINT as a KeyboardInterrupt, with tracebacks); stopping on either is a success
    # here, as under hypercorn: exit 0. Before uvicorn takes the signals (while it starts),
    # the same handler (it only records) asks it to stop once started.
    for signum in STOP_SIGNALS:
        signal.signal(signum, server.handle_exit)
    try:
        if args.workers > 1:
            # A uvicorn.Server of its own per worker (Multiprocess takes no server class):
            # there the app wraps that server's shutdown at its start (servers/uvicorn.py).
            supervisor = Multiprocess(config, sockets=[sock])  # its handlers only record too
            if server.should_exit:  # a signal came before Multiprocess took them
                supervisor.should_exit.set()
            supervisor.run()
        else:
            server.run(sockets=[sock])
    except SystemExit as exc:  # uvicorn's own way to fail, e.g. a failed lifespan startup
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        # Stopped: a stop signal still arriving (a supervisor repeating it) must not turn
        # the exit 0 into a death by that signal, as their default would.
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        sock.close()
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()
    if args.workers == 1 and not server.started:
        return 3  # uvicorn's STARTUP_FAILURE
    return 0


def _listen_unix(path: Path) -> socket.socket:
    """A unix socket for uvicorn at ``path`` (a stale one from an earlier run replaced, as
    hypercorn does); a path that cannot be bound is one line."""
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(path.stat().st_mode):
            path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise CommandError(f"cannot listen on unix:{path}: {exc.strerror or exc}") from None
    return sock


def _uvicorn_log_config(access_log: bool) -> dict[str, Any]:
    """uvicorn's logging; without --access-log, without a line per websocket (three, with
    its open and close), as hypercorn's."""
    from uvicorn.config import LOGGING_CONFIG

    from ..servers.quiet import QuietConnections

    config = copy.deepcopy(LOGGING_CONFIG)
    if not access_log:
        config.setdefault("filters", {})["connections"] = {"()": QuietConnections}
        config["loggers"]["uvicorn.error"]["filters"] = ["connections"]
    return config


def _preflight(settings: Settings) -> None:
    """What the workers will open, checked once here: a problem is one line, not a worker's
    traceback."""
    from ..service import secret_keys

    asyncio.run(with_store(settings, _nothing, upgrade=True))
    try:
        secret_keys(settings.secret_keys, settings.data_dir)
    except (OSError, RuntimeError) as exc:
        raise CommandError(f"cannot read or create the secret key: {exc}") from None
    try:
        TokenVerifier(settings.jwt_secret, settings.jwt_public_key)
    except KeyConfigError as exc:
        raise CommandError(str(exc)) from None


async def _nothing(store: Store) -> None:
    return None


def _listen(bind: str, backlog: int) -> tuple[str, socket.socket | None]:
    """Bind HOST:PORT here (so a bad address or a taken port is one clear line) and hand
    the server the socket; ``unix:`` and ``fd://`` binds go to the server as they are."""
    if bind.startswith(("unix:", "fd://")):
        return bind, None
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise CommandError(f"--bind {bind!r}: expected HOST:PORT, unix:PATH or fd://N")
    host = host.strip("[]") or "127.0.0.1"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise CommandError(f"cannot listen on {bind}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise CommandError(f"cannot listen on {bind}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return f"fd://{sock.fileno()}", sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
