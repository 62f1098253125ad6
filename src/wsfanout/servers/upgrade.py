"""The handshake request uvicorn's h11 protocol has parsed, as its websocket protocol takes it:
as bytes (``head``, what uvicorn writes out for websockets to parse again), or parsed
already (``parsed``), where websockets would take it as h11 did. uvicorn_sansio.py's
``ExplainingSansIOProtocol.upgrade`` hands it over. It needs ``websockets``."""

from __future__ import annotations

from typing import Final

from websockets.datastructures import Headers
from websockets.http11 import MAX_LINE_LENGTH, MAX_NUM_HEADERS, Request

WITH_BODY: Final = (b"content-length", b"transfer-encoding")  # websockets refuses a body


def head(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """A request head as uvicorn's h11 protocol hands it to its websocket protocol."""
    output = [method, b" ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        output += [name, b": ", value, b"\r\n"]
    output.append(b"\r\n")
    return b"".join(output)


def parsed(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> Request | None:
    """The request websockets would parse from ``head(method, target, headers)``, where it
    would take it as h11 did: a GET, an ASCII target, no body, at most MAX_NUM_HEADERS headers,
    no line over MAX_LINE_LENGTH (the line's CRLF included). h11 has checked each name and
    value already, more strictly than websockets does (a token; visible characters, or spaces
    and tabs between them). None: websockets must parse it (and refuse it as it does)."""
    if (
        method != b"GET"
        or len(headers) > MAX_NUM_HEADERS
        or len(target) + 15 > MAX_LINE_LENGTH  # "GET " target " HTTP/1.1\r\n"
        or not target.isascii()
    ):
        return None
    fields = Headers()
    add = fields.set_insecure  # checked by h11 (what websockets' own parser calls)
    for name, value in headers:
        if len(name) + len(value) + 4 > MAX_LINE_LENGTH or name in WITH_BODY:
            return None
        add(name.decode("ascii"), value.decode("latin-1"))
    return Request(target.decode("ascii"), fields)
