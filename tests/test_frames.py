"""servers/frames.py and uvicorn_sansio.py: a client's invalid frames get the close code
RFC 6455 asks for, under real hypercorn and uvicorn, and one log line."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path
from typing import Any

import orjson
import pytest
from wsproto.events import CloseConnection, TextMessage

from tests.server import RawClient, Server
from tests.test_servers import reach_warnings
from wsfanout.servers import ServerReach
from wsfanout.servers import hypercorn as hypercorn_adapter  # noqa: F401 - wraps hypercorn now
from wsfanout.servers.frames import Frames, check_closing_connection, too_many_pieces

TEXT, CONTINUATION = 0x1, 0x0
E_ACUTE = "é".encode()  # two bytes: C3 A9


@pytest.fixture
def data_dir(tmp_path: Path, demo_db: Path) -> Path:
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    return tmp_path


def frame(payload: bytes, *, opcode: int = TEXT, fin: bool = True) -> bytes:
    """A client frame, masked with a zero key (the payload goes as it is)."""
    first = (0x80 if fin else 0) | opcode
    if len(payload) < 126:
        head = bytes([first, 0x80 | len(payload)])
    else:
        head = bytes([first, 0x80 | 126]) + struct.pack("!H", len(payload))
    return head + b"\0\0\0\0" + payload


def fragments(*parts: bytes) -> bytes:
    """One text message in these fragments."""
    last = len(parts) - 1
    return b"".join(
        frame(part, opcode=TEXT if n == 0 else CONTINUATION, fin=n == last)
        for n, part in enumerate(parts)
    )


def events_until(raw: RawClient, done: Any) -> list[dict[str, Any]]:
    """Read the server's events (batched frames flattened) until ``done(event)``."""
    found: list[dict[str, Any]] = []
    partial = ""
    while True:
        data = raw.sock.recv(65536)
        raw.ws.receive_data(data or None)
        for event in raw.ws.events():
            if isinstance(event, TextMessage):
                partial += event.data
                if event.message_finished:
                    decoded = orjson.loads(partial)
                    partial = ""
                    for item in decoded if isinstance(decoded, list) else [decoded]:
                        found.append(item)
                        if done(item):
                            return found
            elif isinstance(event, CloseConnection):
                raise AssertionError(f"closed with {event.code} after {found}")
        assert data, f"the connection ended after {found}"


INVALID = {
    "in one frame": frame(b'{"type": "broadcast", "text": "\xff"}'),
    "across two fragments": fragments(b'{"type": "broadcast", "text": "\xc3', b'("}'),
}


@pytest.mark.parametrize("invalid", INVALID.values(), ids=INVALID.keys())
def test_invalid_utf8_closes_1007_with_one_log_line(
    data_dir: Path, server_kind: str, invalid: bytes
) -> None:
    """A text message split between two fragments in the middle of a character arrives
    whole; one with invalid UTF-8 (in a frame, or across fragments) closes the connection
    with 1007, and the server logs one line, no traceback (hypercorn sent no close frame,
    the client saw 1006; uvicorn logged a traceback for each)."""
    with Server(data_dir, server=server_kind).running() as server:
        raw = RawClient(server.port, server.login("greg"))
        try:
            split = fragments(
                b'{"type": "broadcast", "id": "v", "text": "' + E_ACUTE[:1], E_ACUTE[1:] + b'"}'
            )
            raw.sock.sendall(split)
            events = events_until(raw, lambda e: e["type"] == "ack")
            assert any(e.get("text") == "é" for e in events), events  # its own broadcast
            raw.sock.sendall(invalid)
            code, _texts = raw.read_until_close()
        finally:
            raw.close()
    assert code == 1007
    log = server.log_path.read_text()
    assert log.count("closed a websocket with 1007, from 127.0.0.1:") == 1, log
    assert "Traceback" not in log, log


def test_the_closing_connection_works_with_the_installed_wsproto() -> None:
    """hypercorn's connections can send the close wsproto asks for."""
    assert check_closing_connection() == ""


def test_a_changed_wsproto_warns_that_invalid_frames_get_no_close(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """wsproto's Connection no longer fails invalid UTF-8 as it did: one warning names the
    loss, and hypercorn's connections are left as they are."""
    from wsproto import connection

    def events(self: object) -> Any:
        yield from ()

    monkeypatch.setattr(connection.Connection, "events", events)
    reach = ServerReach(compression=False, on_stopping=_nothing, frame_limit=65536)
    reach.start()
    (warning,) = reach_warnings(caplog)
    assert "invalid UTF-8" in warning and "without a close frame" in warning


async def _nothing() -> None:
    return None


def test_a_message_in_many_small_fragments_arrives(data_dir: Path, server_kind: str) -> None:
    """A message in more than ``Frames.MAX_PIECES`` fragments, each of a few bytes, arrives
    whole (it was refused with 1009 past 4,096 pieces, as was a large frame read 64 bytes at
    a time: Autobahn's cases 9.3, 9.4 and 9.6); empty fragments stay bounded
    (test_hardening.py)."""
    text = "z" * 19_000
    payload = b'{"type": "broadcast", "id": "many", "text": "' + text.encode() + b'"}'
    pieces = [payload[n : n + 4] for n in range(0, len(payload), 4)]
    assert len(pieces) > Frames.MAX_PIECES and not too_many_pieces(len(pieces), len(payload))
    with Server(data_dir, server=server_kind).running() as server:
        raw = RawClient(server.port, server.login("greg"))
        try:
            raw.sock.sendall(fragments(*pieces))
            events = events_until(raw, lambda e: e["type"] in ("ack", "error"))
        finally:
            raw.close()
    assert any(e.get("text") == text for e in events), [e["type"] for e in events]
    assert events[-1]["type"] == "ack", events[-1]


def test_a_close_between_fragments_is_answered_with_its_code(
    data_dir: Path, server_kind: str
) -> None:
    """A client's close between two fragments of a message (RFC 6455 allows control frames
    there) gets its own code back, 1000, not 1002 (uvicorn's websockets protocol failed it
    as "incomplete fragmented message": Autobahn's case 7.1.5)."""
    close = bytes([0x88, 0x82, 0, 0, 0, 0]) + (1000).to_bytes(2, "big")
    with Server(data_dir, server=server_kind).running() as server:
        raw = RawClient(server.port, server.login("greg"))
        try:
            raw.sock.sendall(frame(b'{"type": "broad', fin=False) + close)
            code, _texts = raw.read_until_close()
        finally:
            raw.close()
    assert code == 1000
