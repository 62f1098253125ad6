"""Under ``wsfanout serve --server uvicorn`` the request h11 parsed is handed to the websocket
protocol parsed (uvicorn_sansio.py's ``upgrade``), not written out again for websockets to
parse a second time; what websockets would not take as h11 did still reaches it as bytes,
and is answered as websockets answers it. A browser's handshake, whole in the connection's
first read, is not read by h11 either (``upgrade_head``), where h11 would read it so."""

from __future__ import annotations

import asyncio
import logging
import random
import re
from types import SimpleNamespace
from typing import Any

import h11
import pytest
from uvicorn.protocols.http.h11_impl import H11Protocol
from websockets import http11
from websockets.http11 import MAX_LINE_LENGTH, MAX_NUM_HEADERS, Request
from websockets.server import ServerProtocol

from tests.conftest import login
from tests.inprocess import uvicorn_serving
from wsfanout import Settings
from wsfanout.servers import upgrade
from wsfanout.servers.quiet import QuietConnections
from wsfanout.servers.upgrade import parsed, upgrade_head

# What Chrome sends, as uvicorn's h11 protocol holds it (names lower-cased, values stripped).
CHROME = [
    (b"host", b"127.0.0.1:8000"),
    (b"connection", b"Upgrade"),
    (b"pragma", b"no-cache"),
    (b"cache-control", b"no-cache"),
    (b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64) Chrome/156.0.0.0 Safari/537.36"),
    (b"upgrade", b"websocket"),
    (b"origin", b"http://127.0.0.1:8000"),
    (b"sec-websocket-version", b"13"),
    (b"accept-encoding", b"gzip, deflate, br, zstd"),
    (b"accept-language", b"en-US,en;q=0.9"),
    (b"cookie", b"a=1; b=\xe9t\xe9"),  # obs-text: websockets keeps it as ISO-8859-1
    (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
    (b"sec-websocket-extensions", b"permessage-deflate; client_max_window_bits"),
    (b"x-twice", b"one"),
    (b"x-twice", b"two"),
]


def head(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """The request head uvicorn's h11 protocol writes out for websockets (its
    ``handle_websocket_upgrade``), to parse again."""
    output = [method, b" ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        output += [name, b": ", value, b"\r\n"]
    output.append(b"\r\n")
    return b"".join(output)


def websockets_parse(data: bytes) -> Request | None:
    """The request websockets' own parser makes of these bytes (None: it refuses them)."""
    conn = ServerProtocol()
    conn.receive_data(data)
    events = conn.events_received()
    return events[0] if events and isinstance(events[0], Request) else None


@pytest.mark.parametrize("target", [b"/", b"/ws?resume=all%3A3-7&token=x"])
def test_a_request_is_the_one_websockets_parses(target: bytes) -> None:
    ours = parsed(b"GET", target, CHROME)
    theirs = websockets_parse(head(b"GET", target, CHROME))
    assert ours is not None and theirs is not None
    assert (ours.method, ours.path, ours.protocol) == (theirs.method, theirs.path, theirs.protocol)
    assert list(ours.headers.raw_items()) == list(theirs.headers.raw_items())
    assert ours.headers.get_all("x-twice") == ["one", "two"]
    assert ours.headers["Cookie"] == "a=1; b=\xe9t\xe9"


LONG = MAX_LINE_LENGTH  # a header line this long, CRLF included, is one websockets takes
REFUSED = {  # each one websockets parses differently, or refuses: it gets the bytes
    "post": (b"POST", b"/", CHROME),
    "headers": (b"GET", b"/", [(b"x-%d" % n, b"1") for n in range(MAX_NUM_HEADERS + 1)]),
    "header line": (b"GET", b"/", [*CHROME, (b"x-long", b"a" * (LONG - 9))]),
    "request line": (b"GET", b"/" + b"a" * (LONG - 15), CHROME),
    "target": (b"GET", b"/\xe9", CHROME),
    "content-length": (b"GET", b"/", [*CHROME, (b"content-length", b"0")]),
    "transfer-encoding": (b"GET", b"/", [*CHROME, (b"transfer-encoding", b"chunked")]),
    "escape": (b"GET", b"/", [*CHROME, (b"x-evil", b"\x1b[31mred")]),
    "delete": (b"GET", b"/", [*CHROME, (b"user-agent", b"a\x7fb")]),
    "backspace": (b"GET", b"/", [*CHROME, (b"cookie", b"a=\x08")]),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_websockets_would_not_take_as_is_is_left_to_it(case: str) -> None:
    assert parsed(*REFUSED[case]) is None


def test_an_older_websockets_gets_the_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """websockets before 17 decoded values otherwise, and had no ``set_insecure``."""
    assert parsed(b"GET", b"/", CHROME) is not None
    monkeypatch.setattr(upgrade, "TAKES_PARSED", False)
    assert parsed(b"GET", b"/", CHROME) is None


def test_a_value_is_taken_where_websockets_takes_it() -> None:
    """Each byte inside a value (h11 refuses NUL, CR and LF itself, and any at either end)."""
    for byte in range(256):
        headers = [*CHROME, (b"x-byte", b"a" + bytes([byte]) + b"b")]
        theirs = websockets_parse(head(b"GET", b"/", headers))
        ours = parsed(b"GET", b"/", headers)
        assert (ours is None) == (theirs is None), byte
        if ours is not None and theirs is not None:
            assert list(ours.headers.raw_items()) == list(theirs.headers.raw_items()), byte


def test_the_longest_lines_websockets_takes_are_taken() -> None:
    longest = [*CHROME, (b"x-long", b"a" * (LONG - 10))]  # "x-long: " + value + CRLF
    assert websockets_parse(head(b"GET", b"/", longest)) is not None
    assert parsed(b"GET", b"/", longest) is not None
    target = b"/" + b"a" * (LONG - 16)  # "GET " + target + " HTTP/1.1" + CRLF
    assert websockets_parse(head(b"GET", target, CHROME)) is not None
    assert parsed(b"GET", target, CHROME) is not None
    many = [(b"x-%d" % n, b"1") for n in range(MAX_NUM_HEADERS)]
    assert websockets_parse(head(b"GET", b"/", many)) is not None
    assert parsed(b"GET", b"/", many) is not None


async def exchange(port: int, request: bytes) -> bytes:
    """Send a request; what the server answers before it closes (or within 3 s)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        answer = b""
        while b"\r\n\r\n" not in answer or b"welcome" not in answer:
            data = await asyncio.wait_for(reader.read(65536), 3)
            if not data:
                break
            answer += data
        return answer
    except TimeoutError:
        return answer
    finally:
        writer.close()


def handshake(cookie: str, extra: list[tuple[bytes, bytes]] | None = None) -> bytes:
    """Chrome's handshake with this cookie (and these headers more)."""
    headers = [(n, v) for n, v in CHROME if n != b"cookie"]
    return head(b"GET", b"/", [*headers, (b"cookie", cookie.encode()), *(extra or [])])


async def test_a_browser_is_welcomed_without_websockets_parsing_its_request(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    parses: list[Any] = []
    original = http11.parse_headers

    def counted(*args: Any) -> Any:
        parses.append(args)
        return original(*args)

    monkeypatch.setattr(http11, "parse_headers", counted)
    settings = Settings(**{**vars(settings), "allowed_origins": ("http://127.0.0.1:8000",)})
    async with uvicorn_serving(settings) as (app, port):
        cookie = await login(app, "mike")
        answer = await exchange(port, handshake(cookie))
        assert answer.startswith(b"HTTP/1.1 101 ")
        assert b"\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in answer
        assert b'"type":"welcome"' in answer and b'"user":"mike"' in answer
        assert parses == []
        # Refused by wsfanout (no cookie): the same, the request never parsed twice.
        answer = await exchange(port, head(b"GET", b"/", CHROME))
        assert answer.startswith(b"HTTP/1.1 403 ") and b"log in first" in answer
        assert parses == []


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        ([(b"x-%d" % n, b"1") for n in range(MAX_NUM_HEADERS)], b"431"),  # with CHROME's
        ([(b"x-long", b"a" * LONG)], b"431"),
        ([(b"content-length", b"0")], b"101"),  # websockets takes an empty body
        ([(b"transfer-encoding", b"chunked")], b"400"),  # h11's answer: it reads the body
        ([(b"x-evil", b"\x1b[31mred\x7f\x01")], b"400"),  # h11 takes it, websockets does not
    ],
)
async def test_what_websockets_refuses_is_answered_as_it_answers(
    settings: Settings, extra: list[tuple[bytes, bytes]], status: bytes
) -> None:
    settings = Settings(**{**vars(settings), "allowed_origins": ("http://127.0.0.1:8000",)})
    async with uvicorn_serving(settings) as (app, port):
        cookie = await login(app, "mike")
        answer = await exchange(port, handshake(cookie, extra))
        assert answer.startswith(b"HTTP/1.1 " + status + b" "), answer[:200]


async def test_the_101_is_the_one_uvicorn_writes(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its accept, sent without building a log line nothing logs: the same answer as the one
    uvicorn sends when the line is logged (at INFO)."""
    from uvicorn.protocols.websockets import websockets_sansio_impl as impl

    built: list[object] = []
    original = impl.get_path_with_query_string  # type: ignore[attr-defined]

    def counted(scope: Any) -> str:
        built.append(scope)
        return original(scope)

    monkeypatch.setattr(impl, "get_path_with_query_string", counted)
    settings = Settings(**{**vars(settings), "allowed_origins": ("http://127.0.0.1:8000",)})
    uvicorn_log = logging.getLogger("uvicorn.error")
    level = uvicorn_log.level
    heads = []
    async with uvicorn_serving(settings) as (app, port):
        cookie = await login(app, "mike")
        quiet = QuietConnections()
        # uvicorn's own accept where the line is logged; else the one without building it
        # (below INFO, or INFO with wsfanout serve's filter of connection lines)
        for logged, filtered in (
            (logging.INFO, False),
            (logging.WARNING, False),
            (logging.INFO, True),
        ):
            uvicorn_log.setLevel(logged)
            if filtered:
                uvicorn_log.addFilter(quiet)
            try:
                answer = await exchange(port, handshake(cookie))
            finally:
                uvicorn_log.setLevel(level)
                uvicorn_log.removeFilter(quiet)
            head_, _, _ = answer.partition(b"\r\n\r\n")
            heads.append(re.sub(rb"\r\ndate: [^\r]*", b"\r\ndate: -", head_))
    assert len(built) == 1  # the log line's path: built where it is logged only
    assert heads[0].startswith(b"HTTP/1.1 101 ") and b"\r\ndate: -" in heads[0]
    assert heads[0] == heads[1] == heads[2]


# A handshake as Chrome writes it (its names' case, its order), with an ASCII cookie.
CHROME_HEAD = (
    b"GET /?resume=all%3A3-7 HTTP/1.1\r\n"
    b"Host: 127.0.0.1:8000\r\n"
    b"Connection: Upgrade\r\n"
    b"Pragma: no-cache\r\n"
    b"Cache-Control: no-cache\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) Chrome/156.0.0.0 Safari/537.36\r\n"
    b"Upgrade: websocket\r\n"
    b"Origin: http://127.0.0.1:8000\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"Accept-Encoding: gzip, deflate, br, zstd\r\n"
    b"Accept-Language: en-US,en;q=0.9\r\n"
    b"Cookie: wsfanout=abc.def\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    b"\r\n"
)


def as_uvicorn_holds(data: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]] | None:
    """The target and headers uvicorn's h11 protocol holds after reading ``data``, where
    h11 reads one whole request out of it, nothing left over, and uvicorn upgrades it (its
    own ``_get_upgrade``); None otherwise."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    if not isinstance(event, h11.Request) or conn.trailing_data[0]:
        return None
    headers = [(name.lower(), value) for name, value in event.headers]
    if H11Protocol._get_upgrade(SimpleNamespace(headers=headers)) != b"websocket":  # type: ignore[arg-type]
        return None
    return event.target, headers


def test_a_browsers_head_is_read_as_h11_reads_it() -> None:
    ours = upgrade_head(CHROME_HEAD)
    assert ours is not None
    assert ours == as_uvicorn_holds(CHROME_HEAD)
    assert ours[0] == b"/?resume=all%3A3-7"
    assert (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ==") in ours[1]
    spaced = CHROME_HEAD.replace(b"Pragma: no-cache", b"Pragma:\t no-cache \t")
    assert upgrade_head(spaced) == as_uvicorn_holds(spaced) is not None
    firefox = CHROME_HEAD.replace(b"Connection: Upgrade", b"Connection: keep-alive, Upgrade")
    assert upgrade_head(firefox) == as_uvicorn_holds(firefox) is not None


# Heads h11 reads otherwise (or refuses), or uvicorn does not upgrade: left to h11.
TO_H11 = {
    "in two reads": CHROME_HEAD[:-2],
    "a frame after it": CHROME_HEAD + b"\x81\x80abcd",
    "http/1.0": CHROME_HEAD.replace(b"HTTP/1.1\r\n", b"HTTP/1.0\r\n", 1),
    "post": b"POST" + CHROME_HEAD[3:],
    "no host": CHROME_HEAD.replace(b"Host: 127.0.0.1:8000\r\n", b""),
    "two hosts": CHROME_HEAD.replace(b"Host:", b"Host: a\r\nHost:"),
    "folded": CHROME_HEAD.replace(b"Pragma: no-cache", b"Pragma: no-\r\n cache"),
    "bare lf": CHROME_HEAD.replace(b"Pragma: no-cache\r\n", b"Pragma: no-cache\n"),
    "bare cr": CHROME_HEAD.replace(b"no-cache", b"no\rcache"),
    "obs-text": CHROME_HEAD.replace(b"abc.def", b"\xe9t\xe9"),
    "nul": CHROME_HEAD.replace(b"abc.def", b"a\x00b"),
    "space in a name": CHROME_HEAD.replace(b"Pragma:", b"Pragma :"),
    "no colon": CHROME_HEAD.replace(b"Pragma:", b"Pragma"),
    "no upgrade": CHROME_HEAD.replace(b"Connection: Upgrade", b"Connection: keep-alive"),
    "h2c": CHROME_HEAD.replace(b"Upgrade: websocket", b"Upgrade: h2c"),
    "leading blank line": b"\r\n" + CHROME_HEAD,
    "two spaces": CHROME_HEAD.replace(b"GET /", b"GET  /", 1),
    # h11 checks these and rewrites them (one Content-Length of "5, 5", "Chunked" lower-cased)
    "content-length": CHROME_HEAD.replace(b"Pragma:", b"Content-Length: 5, 5\r\nPragma:"),
    "transfer-encoding": CHROME_HEAD.replace(b"Pragma:", b"Transfer-Encoding: Chunked\r\nPragma:"),
    "too many headers": CHROME_HEAD.replace(b"Pragma:", b"a: b\r\n" * MAX_NUM_HEADERS + b"Pragma:"),
}


@pytest.mark.parametrize("case", sorted(TO_H11))
def test_what_h11_would_read_otherwise_is_left_to_it(case: str) -> None:
    assert upgrade_head(TO_H11[case]) is None


BODY_LINES = [
    b"Content-Length: 0",
    b"Content-Length: 5, 5",
    b"Content-Length: abc",
    b"Content-Length: 0\r\nContent-Length: 0",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: Chunked",
    b"Transfer-Encoding: gzip",
]


def test_every_head_read_without_h11_is_the_one_h11_reads() -> None:
    """Chrome's head changed at random (a byte put in, changed or taken out, a line doubled
    or dropped, a name's case changed, spaces around a colon, a Content-Length or a
    Transfer-Encoding): wherever ``upgrade_head`` reads one, h11 reads the same and uvicorn
    upgrades it."""
    rng = random.Random(29)
    odd = b"\x00\t\n\r \x0b\x0c:,;=\x7f\x80\xff\x01Aa-/?%"
    lines = CHROME_HEAD[:-4].split(b"\r\n")
    read = 0
    for _ in range(6000):
        case = rng.randrange(6)
        if case == 5:  # a header h11 checks and may rewrite
            line = rng.choice(BODY_LINES)
            data = CHROME_HEAD.replace(b"Pragma:", line + b"\r\nPragma:")
        elif case == 0:  # a line doubled, dropped, or a name's case changed
            changed = list(lines)
            at = rng.randrange(1, len(changed))
            move = rng.randrange(3)
            if move == 0:
                changed.insert(at, changed[at])
            elif move == 1:
                del changed[at]
            else:
                changed[at] = changed[at].swapcase()
            data = b"\r\n".join(changed) + b"\r\n\r\n"
        elif case == 1:  # spaces or tabs around a colon
            changed = list(lines)
            at = rng.randrange(1, len(changed))
            name, _, value = changed[at].partition(b": ")
            pad = [b"", b" ", b"\t", b" \t "]
            changed[at] = name + rng.choice(pad) + b":" + rng.choice(pad) + value + rng.choice(pad)
            data = b"\r\n".join(changed) + b"\r\n\r\n"
        else:  # a byte in, changed or out
            mutable = bytearray(CHROME_HEAD)
            at = rng.randrange(len(mutable))
            byte = odd[rng.randrange(len(odd))]
            if case == 2:
                mutable.insert(at, byte)
            elif case == 3:
                mutable[at] = byte
            else:
                del mutable[at]
            data = bytes(mutable)
        ours = upgrade_head(data)
        if ours is not None:
            read += 1
            assert ours == as_uvicorn_holds(data), data
    assert read > 1000  # the random heads do reach it


async def test_a_browsers_handshake_is_not_read_by_h11(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whole in one read: h11 reads none of it; in two, h11 reads it (and it is welcomed)."""
    reads: list[object] = []
    original = h11.Connection.next_event

    def counted(self: h11.Connection) -> Any:
        reads.append(self)
        return original(self)

    monkeypatch.setattr(h11.Connection, "next_event", counted)
    settings = Settings(**{**vars(settings), "allowed_origins": ("http://127.0.0.1:8000",)})
    async with uvicorn_serving(settings) as (app, port):
        cookie = await login(app, "mike")
        request = CHROME_HEAD.replace(b"wsfanout=abc.def", cookie.encode()).replace(
            b"GET /?resume=all%3A3-7 ", b"GET / "
        )
        answer = await exchange(port, request)
        assert answer.startswith(b"HTTP/1.1 101 ") and b'"user":"mike"' in answer
        assert reads == []
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(request[:100])
            await writer.drain()
            await asyncio.sleep(0.1)  # read on its own
            writer.write(request[100:])
            answer = b""
            while b'"user":"mike"' not in answer:
                data = await asyncio.wait_for(reader.read(65536), 3)
                assert data, answer
                answer += data
        finally:
            writer.close()
        assert answer.startswith(b"HTTP/1.1 101 ")
        assert reads  # h11 read the head in two parts
