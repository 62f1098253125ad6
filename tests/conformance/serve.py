"""Serve the echo app (echo.py) as ``wsfanout serve`` serves wsfanout: the same hypercorn
master or uvicorn server, configured by the same code (cli/serve.py), one worker.

    python -m tests.conformance.serve --server uvicorn --bind fd://N

Settings come from the environment, as wsfanout's (``WSFANOUT_COMPRESSION``,
``WSFANOUT_MAX_FRAME_BYTES``, ``WSFANOUT_LOG_LEVEL``).
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from wsfanout.cli import serve
from wsfanout.config import Settings

ECHO_APP = "tests.conformance.echo:app"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", choices=serve.SERVERS, default="hypercorn")
    parser.add_argument("--bind", required=True, help="fd://N (a listening socket) or HOST:PORT")
    options = parser.parse_args(argv)
    settings = Settings.from_env()
    # What `wsfanout serve` is given by default (one worker, its pings, no access log).
    args = argparse.Namespace(
        workers=1,
        ping_interval=serve.PING_INTERVAL,
        access_log=False,
        proxy_headers=False,
        forwarded_allow_ips=None,
    )
    bind, listening = serve._listen(options.bind, serve.BACKLOG)
    run = serve._serve_uvicorn if options.server == "uvicorn" else serve._serve_hypercorn
    try:
        return run(settings, args, bind, app=ECHO_APP)
    finally:
        if listening is not None:
            with contextlib.suppress(OSError):  # the server may have closed it already
                listening.close()


if __name__ == "__main__":
    sys.exit(main())
