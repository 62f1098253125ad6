"""The handshake request uvicorn's h11 protocol has parsed, as websockets would parse it from
the bytes uvicorn writes out for it (``parsed``), where it would take it as h11 did.
uvicorn_sansio.py's ``ExplainingSansIOProtocol.upgrade`` hands it over; else uvicorn's own
upgrade hands over the bytes. It needs ``websockets``.

``upgrade_head`` reads a browser's handshake without h11 (a quarter of the handshake's
instructions), where h11 would read it exactly so and uvicorn would upgrade it; else h11 reads
it, as before."""

from __future__ import annotations

from typing import Final

from websockets.datastructures import Headers
from websockets.http11 import MAX_LINE_LENGTH, MAX_NUM_HEADERS, Request
from websockets.version import version as websockets_version

# What h11 takes in a name (its ``token``) and a request target (``vchar``).
TOKEN: Final = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
VCHAR: Final = bytes(range(0x21, 0x7F))
# The bytes ``upgrade_head`` reads a head of: printable ASCII, tabs and line ends.
HEAD_BYTES: Final = bytes([0x09, 0x0A, 0x0D, *range(0x20, 0x7F)])
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


def upgrade_head(data: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]] | None:
    """The target and headers (names lower-cased, values stripped) of a websocket handshake
    that is all of ``data``, as uvicorn's h11 protocol would hold them, where h11 would read
    them so and uvicorn would upgrade (its ``_should_upgrade``): ``GET <target> HTTP/1.1``,
    then ``name: value`` lines, a blank line, nothing after. A head of printable ASCII and
    tabs only, CRLF line ends only, no folded line, at most MAX_NUM_HEADERS headers, no
    Content-Length or Transfer-Encoding, exactly one Host, ``Connection`` (the last)
    naming ``upgrade`` and ``Upgrade`` (the last) ``websocket``. None: h11 must read it (a
    head in two reads, a byte outside those, another method or version, anything it refuses
    or reads otherwise), and uvicorn decide."""
    if (
        not data.startswith(b"GET ")
        or not data.endswith(b"\r\n\r\n")
        or b"websocket" not in data.lower()  # a page or an API call: h11's, not read twice
    ):
        return None
    head = data[:-4]
    ends = head.count(b"\r\n")  # the header lines
    if ends > MAX_NUM_HEADERS:
        return None  # websockets would refuse it (parsed): not read twice
    if head.translate(None, HEAD_BYTES) or head.count(b"\r") != ends or head.count(b"\n") != ends:
        return None  # another byte, a bare CR or LF
    lines = head.split(b"\r\n")
    request = lines[0].split(b" ")
    if len(request) != 3 or request[2] != b"HTTP/1.1":
        return None
    target = request[1]
    if not target or target.translate(None, VCHAR):
        return None
    headers = []
    hosts = 0
    connection = b""
    upgrade = None
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name.translate(None, TOKEN):
            return None  # not a header line (a blank line, a folded one: space first)
        name = name.lower()
        value = value.strip(b" \t")
        if name == b"host":
            hosts += 1
        elif name == b"connection":
            connection = value  # uvicorn goes by the last
        elif name == b"upgrade":
            upgrade = value.lower()
        elif name in WITH_BODY:
            return None  # h11 checks them, and rewrites some ("5, 5", "Chunked")
        headers.append((name, value))
    if hosts != 1 or upgrade != b"websocket":
        return None
    if b"upgrade" not in [token.lower().strip() for token in connection.split(b",")]:
        return None
    return target, headers
