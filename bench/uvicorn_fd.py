"""uvicorn's own command line, with ``--fd N`` taken for the TCP socket it is.

uvicorn makes ``socket.fromfd(fd, AF_UNIX, …)`` of an inherited descriptor, so under uvloop a
listening TCP socket is served as a unix one (a pipe handle, no TCP_NODELAY): not what users
of ``uvicorn --host --port`` run. The benchmark and the tests bind port 0 themselves and pass
the socket; this corrects the family and runs ``uvicorn`` unchanged otherwise.

    python -m bench.uvicorn_fd --fd N [uvicorn's options] APP
"""

from __future__ import annotations

import os
import socket
from typing import Any


def _fromfd(fd: int, family: Any, kind: Any, proto: int = 0) -> socket.socket:
    return socket.socket(fileno=os.dup(fd))  # the family and type the socket really has


if __name__ == "__main__":
    from uvicorn.main import main

    socket.fromfd = _fromfd  # type: ignore[assignment]
    main()
