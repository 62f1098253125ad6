"""Under ``wsfanout serve --server uvicorn`` the request h11 parsed is handed to the websocket
protocol parsed (uvicorn_sansio.py's ``upgrade``), not written out again for websockets to
parse a second time; what websockets would not take as h11 did still reaches it as bytes,
and is answered as websockets answers it."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import pytest
from websockets import http11
from websockets.http11 import MAX_LINE_LENGTH, MAX_NUM_HEADERS, Request
from websockets.server import ServerProtocol

from tests.conftest import login
from tests.inprocess import uvicorn_serving
from wsfanout import Settings
from wsfanout.servers import upgrade
from wsfanout.servers.quiet import QuietConnections
from wsfanout.servers.upgrade import parsed

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
