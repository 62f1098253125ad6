"""The handshake request uvicorn's h11 protocol has parsed, as websockets would parse it from
the bytes uvicorn writes out for it (``parsed``), where it would take it as h11 did.
uvicorn_sansio.py's ``ExplainingSansIOProtocol.upgrade`` hands it over; else uvicorn's own
upgrade hands over the bytes. It needs ``websockets``."""

from __future__ import annotations

from typing import Final

from websockets.datastructures import Headers
from websockets.http11 import MAX_LINE_LENGTH, MAX_NUM_HEADERS, Request
from websockets.version import version as websockets_version

WITH_BODY: Final = (b"content-length", b"transfer-encoding")  # websockets refuses a body
# The bytes websockets takes in a header value (its parser's ``_value_re``); h11 takes more
# (any but NUL and whitespace, with spaces and tabs between: ESC, DEL, \x01 ...).
VALUE_BYTES: Final = bytes([0x09, *range(0x20, 0x7F), *range(0x80, 0x100)])
# websockets 17 decodes header values as ISO-8859-1 (uvicorn encodes them back so) and has
# ``Headers.set_insecure``, what its own parser calls; with an older release, the bytes way.
TAKES_PARSED: Final = (
    hasattr(Headers, "set_insecure") and int(websockets_version.split(".")[0]) >= 17
)


def parsed(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> Request | None:
    """The request websockets would parse from the head uvicorn writes out of these (the
    request line, then each header on a line of its own), where it
    would take it as h11 did: a GET, an ASCII target, no body, at most MAX_NUM_HEADERS headers,
    no line over MAX_LINE_LENGTH (the line's CRLF included), no control character in a value.
    h11 has checked each name as websockets does (a token), and each value but for control
    characters (none at either end, no NUL, CR or LF). None: websockets must parse it (and
    refuse it as it does)."""
    if (
        not TAKES_PARSED
        or method != b"GET"
        or len(headers) > MAX_NUM_HEADERS
        or len(target) + 15 > MAX_LINE_LENGTH  # "GET " target " HTTP/1.1\r\n"
        or not target.isascii()
    ):
        return None
    if b"".join([value for _, value in headers]).translate(None, VALUE_BYTES):
        return None  # a byte websockets refuses: a control character
    fields = Headers()
    add = fields.set_insecure  # checked by h11 (what websockets' own parser calls)
    for name, value in headers:
        if len(name) + len(value) + 4 > MAX_LINE_LENGTH or name in WITH_BODY:
            return None
        add(name.decode("ascii"), value.decode("latin-1"))
    return Request(target.decode("ascii"), fields)
