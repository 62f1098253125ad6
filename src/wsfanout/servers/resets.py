"""Resetting a TCP connection, and how much its client has left unread.

ASGI has no way to say "reset": a server closes gracefully, and what a client that does not
read was sent stays in the kernel (and the server's buffer) until it reads, for minutes.
``reset`` closes with SO_LINGER 0 instead, so the kernel drops what it held and sends RST.
"""

from __future__ import annotations

import contextlib
import fcntl
import socket
import struct
import termios
from typing import Any, Final

UNSENT_MAX: Final = 1 << 20  # bytes unsent to a uvicorn websocket client that pings or is closed
_LINGER_NONE: Final = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, drops unsent


def reset(transport: Any) -> None:
    """Reset the TCP connection under this asyncio transport: the kernel drops what it holds."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # already closed: OSError, or ValueError from uvloop's socket (its descriptor is -1)
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_NONE)
    transport.abort()


def unsent(transport: Any) -> int:
    """Bytes written to this connection that its client has not taken yet: in the
    transport's buffer and in the kernel's send queue."""
    count = int(transport.get_write_buffer_size())
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):
            queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
            count += struct.unpack("i", queued)[0]
    return count
