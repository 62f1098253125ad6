"""protocol: parsing inbound frames, encoding outbound events."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsfanout import protocol
from wsfanout.protocol import (
    ErrorCode,
    Kind,
    Position,
    PresenceQuery,
    ProtocolError,
    Publish,
    Source,
)


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        ({"type": "broadcast", "text": "hi all"}, Publish(Kind.BROADCAST, "hi all")),
        ({"type": "BroadCast", "text": "hi"}, Publish(Kind.BROADCAST, "hi")),
        (
            {"type": "Group", "group": "girls", "text": "nails"},
            Publish(Kind.GROUP, "nails", "girls"),
        ),
        ({"type": "Direct", "user_name": "Mike", "text": "yo"}, Publish(Kind.DIRECT, "yo", "Mike")),
        (
            {"type": "direct", "user_name": " mike ", "text": "yo", "id": "c1"},
            Publish(Kind.DIRECT, "yo", "mike", "c1"),
        ),
        ({"type": "broadcast", "text": "<b>", "extra": 1}, Publish(Kind.BROADCAST, "<b>")),
    ],
)
def test_valid_frames(frame: dict[str, Any], expected: Publish) -> None:
    """Each message type parses, with type matched case-insensitively."""
    assert protocol.parse(orjson.dumps(frame).decode()) == expected


@pytest.mark.parametrize(
    ("frame", "code", "frame_id"),
    [
        ("{nope", ErrorCode.BAD_JSON, None),
        ("", ErrorCode.BAD_JSON, None),
        ("[1, 2]", ErrorCode.BAD_MESSAGE, None),
        ('"text"', ErrorCode.BAD_MESSAGE, None),
        ('{"type": "shout", "text": "x", "id": "a"}', ErrorCode.BAD_MESSAGE, "a"),
        ('{"type": 5, "text": "x"}', ErrorCode.BAD_MESSAGE, None),
        ('{"type": "broadcast"}', ErrorCode.BAD_MESSAGE, None),
        ('{"type": "broadcast", "text": "   "}', ErrorCode.BAD_MESSAGE, None),
        ('{"type": "broadcast", "text": 7, "id": "b"}', ErrorCode.BAD_MESSAGE, "b"),
        ('{"type": "group", "text": "x"}', ErrorCode.BAD_MESSAGE, None),
        ('{"type": "group", "group": ["a"], "text": "x"}', ErrorCode.BAD_MESSAGE, None),
        ('{"type": "direct", "user_name": "", "text": "x"}', ErrorCode.BAD_MESSAGE, None),
        ('{"type": "broadcast", "text": "x", "id": 5}', ErrorCode.BAD_MESSAGE, None),
        (
            '{"type": "broadcast", "text": "x", "id": "' + "i" * 65 + '"}',
            ErrorCode.BAD_MESSAGE,
            None,
        ),
    ],
)
def test_invalid_frames(frame: str, code: ErrorCode, frame_id: str | None) -> None:
    """Each malformed frame raises ProtocolError with the right code and echoes a valid id."""
    with pytest.raises(ProtocolError) as caught:
        protocol.parse(frame)
    assert caught.value.code is code
    assert caught.value.frame_id == frame_id


def test_message_event_shapes() -> None:
    """message events carry kind, sender, target, text and a timestamp."""
    group = orjson.loads(
        protocol.message(Publish(Kind.GROUP, "hi", "boys", sender="greg"), 1.23456)
    )
    assert group == {
        "type": "message",
        "kind": "group",
        "stream": "group:boys",
        "from": "greg",
        "group": "boys",
        "text": "hi",
        "ts": 1.235,
    }
    direct = orjson.loads(protocol.message(Publish(Kind.DIRECT, "hi", "mike", sender="greg"), 1.0))
    assert direct["to"] == "mike" and "group" not in direct and "via" not in direct
    backend = Publish(Kind.BROADCAST, "hi", sender="billing", source=Source.AMQP)
    assert orjson.loads(protocol.message(backend, 1.0))["via"] == "amqp"


def shortest_json(char: str) -> int:
    """The fewest bytes any JSON text can spell this character with (RFC 8259 section 7):
    quote, backslash and controls must be escaped (two bytes where a short escape exists,
    else six); everything else may be written as it is, in UTF-8."""
    if char in '"\\\b\f\n\r\t':
        return 2
    if ord(char) < 0x20:
        return 6
    return len(char.encode())


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("a", 1),
        ("\x01", 6),
        ("\x1f", 6),
        ("\n", 2),
        ('"', 2),
        ("\\", 2),
        ("/", 1),
        ("\x7f", 1),
        ("é", 2),
        ("\u2028", 3),
        ("😀", 4),
    ],
)
def test_wire_bytes_of_each_kind_of_character(text: str, size: int) -> None:
    """A text's size on the wire is its JSON string's UTF-8 bytes, escapes included."""
    assert protocol.wire_bytes(text) == size


@given(st.text())
def test_wire_bytes_is_the_shortest_json_and_what_goes_out(text: str) -> None:
    """wsfanout writes every character in the fewest bytes JSON allows, so a client's frame
    always holds its text in at least as many bytes as the text takes going out (a frame
    the inbound limit accepts is never too large afterwards); and the size is exactly what
    the text takes in the encoded event."""
    size = protocol.wire_bytes(text)
    assert size == sum(shortest_json(char) for char in text)
    for client in (json.dumps(text), json.dumps(text, ensure_ascii=False)):
        assert size <= len(client.encode()) - 2
    event = protocol.message(Publish(Kind.BROADCAST, text, sender="greg"), 1.0).encode()
    bare = protocol.message(Publish(Kind.BROADCAST, "", sender="greg"), 1.0).encode()
    assert len(event) - len(bare) == size


LIMIT = 65_536


@pytest.mark.parametrize(
    ("text", "fits"),
    [
        ("a" * LIMIT, True),
        ("a" * (LIMIT + 1), False),
        ("\x01" * 10_922 + "a" * 4, True),  # 65,532 + 4 bytes
        ("\x01" * 10_922 + "a" * 5, False),
        ("\x01" * LIMIT, False),  # issue 24: 393,216 bytes on the wire
        ('"' * (LIMIT // 2), True),
        ('"' * (LIMIT // 2) + "a", False),
        ("\\" * (LIMIT // 2) + "a", False),
        ("é" * (LIMIT // 2), True),
        ("é" * (LIMIT // 2) + "a", False),
        ("😀" * (LIMIT // 4), True),
        ("😀" * (LIMIT // 4) + "a", False),
        ("\u2028" * (LIMIT // 3) + "a", True),
        ("\u2028" * (LIMIT // 3) + "aa", False),
    ],
)
def test_check_size_counts_wire_bytes(text: str, fits: bool) -> None:
    """The limit holds for the text as it goes out: the largest that fits, one byte more."""
    publish = Publish(Kind.BROADCAST, text, frame_id="f1")
    if fits:
        protocol.check_size(publish, LIMIT)
        return
    with pytest.raises(ProtocolError) as caught:
        protocol.check_size(publish, LIMIT)
    assert caught.value.code is ErrorCode.TOO_LARGE
    assert caught.value.frame_id == "f1"
    assert f"{LIMIT} bytes" in caught.value.detail
    assert f"{protocol.wire_bytes(text)}" in caught.value.detail


def test_a_message_event_is_its_text_and_at_most_the_envelope() -> None:
    """The largest envelope a message can have (longest names, a backend's escaped
    ``from``, the largest offset, a far timestamp) stays within ``ENVELOPE_BYTES``."""
    sender = "\x01" * protocol.MAX_SENDER_CHARS
    name = "g" * 64  # USERNAME_RE and GROUP_RE: at most 64 characters
    text = "\x01" * 10_000
    for kind, target in ((Kind.BROADCAST, ""), (Kind.GROUP, name), (Kind.DIRECT, name)):
        publish = Publish(kind, text, target, sender=sender, source=Source.AMQP)
        event = protocol.message(publish, 9_999_999_999.999, 2**53 - 1).encode()
        assert len(event) - protocol.wire_bytes(text) <= protocol.ENVELOPE_BYTES


def test_error_and_ack_events() -> None:
    """error frames carry code, detail and the frame's id when it had one."""
    assert orjson.loads(protocol.error(ErrorCode.UNKNOWN_GROUP, "no", "c1")) == {
        "type": "error",
        "code": "unknown_group",
        "detail": "no",
        "id": "c1",
    }
    assert "id" not in orjson.loads(protocol.error(ErrorCode.BAD_JSON, "no"))
    assert orjson.loads(protocol.ack("c1")) == {"type": "ack", "id": "c1"}


def test_batch_is_an_array_only_for_several() -> None:
    """One event stays a plain object; several become one JSON array."""
    one = protocol.ack("a")
    assert protocol.batch([one]) is one
    assert orjson.loads(protocol.batch([one, protocol.ack("b")])) == [
        {"type": "ack", "id": "a"},
        {"type": "ack", "id": "b"},
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"all": {"epoch": "e1", "offset": 3}}', {"all": Position("e1", 3)}),
        ("{}", {}),
        (
            '{"group:boys": {"epoch": "x", "offset": 0}, "user:greg": {"epoch": "y", "offset": 9}}',
            {"group:boys": Position("x", 0), "user:greg": Position("y", 9)},
        ),
    ],
)
def test_resume_positions(text: str, expected: dict[str, Position]) -> None:
    assert protocol.parse_resume(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "[]",
        '{"all": 3}',
        '{"all": {"epoch": "e"}}',
        '{"all": {"epoch": "", "offset": 1}}',
        '{"all": {"epoch": 5, "offset": 1}}',
        '{"all": {"epoch": "e", "offset": -1}}',
        '{"all": {"epoch": "e", "offset": 1.5}}',
        '{"all": {"epoch": "e", "offset": true}}',
        '{"all": {"epoch": "e", "offset": 9007199254740993}}',
        '{"all": {"epoch": "' + "e" * 65 + '", "offset": 1}}',
        "{" + ",".join(f'"s{i}": {{"epoch": "e", "offset": 1}}' for i in range(1001)) + "}",
        '{"all": {"epoch": "e", "offset": 1}, "pad": "' + "x" * 20_000 + '"}',
    ],
)
def test_malformed_resume_is_refused(text: str) -> None:
    with pytest.raises(protocol.ResumeError):
        protocol.parse_resume(text)


def test_presence_requests_parse_apart_from_publishes() -> None:
    assert protocol.parse('{"type": "Presence", "group": " girls ", "id": "p1"}') == (
        PresenceQuery("girls", "p1")
    )
    with pytest.raises(ProtocolError) as caught:
        protocol.parse('{"type": "presence", "id": "p2"}')
    assert (caught.value.code, caught.value.frame_id) == (ErrorCode.BAD_MESSAGE, "p2")


def test_a_streams_messages_begin_with_its_offset_prefix() -> None:
    """Every message of a stream starts with offset_prefix(stream), whatever its names
    hold, and offset_after reads the offset; other streams' messages do not match."""
    publish = Publish(Kind.GROUP, '"offset":1,', 'we "quote"', sender="greg")
    frame = protocol.message(publish, 1.0, 42)
    prefix = protocol.offset_prefix('group:we "quote"')
    assert frame.startswith(prefix) and protocol.offset_after(frame, prefix) == 42
    assert not protocol.message(publish, 1.0).startswith(prefix)  # no offset: history off
    for stream in ("all", "group:we", "user:we"):
        assert not frame.startswith(protocol.offset_prefix(stream))
    direct = protocol.message(Publish(Kind.DIRECT, "x", "Mike", sender="greg"), 1.0, 7)
    assert direct.startswith(protocol.offset_prefix("user:mike"))  # one stream per user


@pytest.mark.parametrize(
    ("name", "username", "group"),
    [
        ("amanda", True, True),
        ("a.b-c_d", True, True),
        ("greg@example.org", True, False),
        ("x+tag", True, False),
        ("9lives", True, True),
        ("a" * 64, True, True),
        ("a" * 65, False, False),
        ("", False, False),
        ("_lead", False, False),
        ("two words", False, False),
        ("café", False, False),
    ],
)
def test_name_rules(name: str, username: bool, group: bool) -> None:
    """Usernames and group names: ASCII letters and digits first, a few marks after, 1-64."""
    assert bool(protocol.USERNAME_RE.fullmatch(name)) is username
    assert bool(protocol.GROUP_RE.fullmatch(name)) is group
