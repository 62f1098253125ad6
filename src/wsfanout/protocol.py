"""The wire format (v1 and v2): inbound frames into ``Publish``, ``PresenceQuery`` or
``HistoryQuery``, outbound events into text.

Sans-I/O: nothing here touches a socket or the event loop. Inbound frames are
JSON objects; ``type`` is matched case-insensitively so the seed page's
``BroadCast`` / ``Group`` / ``Direct`` work. Outbound events are encoded once
with orjson and decoded to ``str`` once, so the same object can be handed to
every recipient's outbox.

A ``message`` names its ``stream`` and, with history on, its ``offset`` (DESIGN 5.1). The
offset is known only where it is assigned (the in-memory history, or Redis), so a message
is encoded once as two parts (``message_parts``) around the place of the offset, and whoever
assigns it joins them (``with_offset``); nothing else is encoded per message.

Sizes count what goes on the wire: a message's text is measured as it is written in its
event (``wire_bytes``: JSON-escaped UTF-8), and ``check_size`` keeps it within the frame
limit, so an event is at most that limit plus ``ENVELOPE_BYTES``.

The rules for user and group names live here too, below both the store that keeps its rows
to them and the connection tokens whose users and groups have no row.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import orjson

MAX_ID_CHARS: Final = 64
MAX_NAME_CHARS: Final = 150
MAX_SENDER_CHARS: Final = 64  # a backend's "from"
MAX_KEY_CHARS: Final = 64  # a backend's "idempotency_key"
MAX_RESUME_CHARS: Final = 16 * 1024  # the decoded ``resume`` query value
MAX_RESUME_STREAMS: Final = 1000
MAX_EPOCH_CHARS: Final = 64
# The rules for user and group names: the store's rows keep to them, and so do a connection
# token's claims (tokens.py), which name users and groups that need no row.
USERNAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}")
GROUP_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_FIRST_NAME: Final = 100
# Sizes on the wire (see ``check_size``): a message's text may take the frame limit once
# JSON-escaped, and the event around it at most this much more (653 bytes at worst today:
# the longest names, a backend's ``from`` of 64 escaped characters, the largest offset).
ENVELOPE_BYTES: Final = 1024
MAX_CHAR_BYTES: Final = 6  # the most one character takes in a JSON string (``\u0001``)


class Kind(enum.StrEnum):
    BROADCAST = "broadcast"
    GROUP = "group"
    DIRECT = "direct"


class Source(enum.StrEnum):
    """Where a publish came from; a backend's messages say so (``via``)."""

    WEBSOCKET = "websocket"
    API = "api"
    AMQP = "amqp"
    APP = "app"  # the host app's own code (``App.publish``)


class CloseCode(enum.IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001  # server shutting down
    INVALID_DATA = 1007  # a text message that is not UTF-8
    POLICY = 1008  # origin, auth expired or revoked
    TOO_LARGE = 1009
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012  # this node missed messages (it lost Redis): reconnect and resume
    TRY_AGAIN_LATER = 1013  # slow consumer, reconnect


class ErrorCode(enum.StrEnum):
    BAD_JSON = "bad_json"
    BAD_MESSAGE = "bad_message"
    UNKNOWN_GROUP = "unknown_group"
    UNKNOWN_USER = "unknown_user"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    FORBIDDEN = "forbidden"
    UNAVAILABLE = "unavailable"


class ProtocolError(Exception):
    """An inbound frame that cannot be published; becomes an ``error`` frame."""

    def __init__(self, code: ErrorCode, detail: str, frame_id: str | None = None) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.frame_id = frame_id


@dataclass(frozen=True, slots=True)
class Publish:
    """One validated request to fan a text out.

    ``target`` is the group name for ``GROUP``, the user name as typed for
    ``DIRECT`` (the exact username once resolved against the store), and empty for
    ``BROADCAST``. ``sender`` and ``source`` are filled in by whoever publishes it; ``key``
    is a backend's idempotency key: published once per stream within its time.
    """

    kind: Kind
    text: str
    target: str = ""
    frame_id: str | None = None
    sender: str = ""
    source: Source = Source.WEBSOCKET
    key: str | None = None


@dataclass(frozen=True, slots=True)
class PresenceQuery:
    """Who of this group is online (DESIGN 5.2)."""

    group: str
    frame_id: str | None = None


@dataclass(frozen=True, slots=True)
class HistoryQuery:
    """A stream's recent messages (DESIGN 5.4): at most ``limit`` (None: as many as kept)."""

    stream: str
    limit: int | None = None
    frame_id: str | None = None


@dataclass(frozen=True, slots=True)
class Position:
    """Where a stream stands: its history's epoch and the offset of its last message."""

    epoch: str
    offset: int


_KINDS: Final = {kind.value: kind for kind in Kind}
_TARGET_FIELD: Final = {Kind.GROUP: "group", Kind.DIRECT: "user_name"}


Query = PresenceQuery | HistoryQuery


def parse(frame: str | bytes) -> Publish | Query:
    """Validate one inbound frame: a publish, or a presence or history request.

    Raises:
        ProtocolError: ``bad_json`` if it is not JSON, ``bad_message`` if it is not a
            publish of a known type with the fields that type needs, nor a request.
    """
    try:
        data = orjson.loads(frame)
    except orjson.JSONDecodeError:
        raise ProtocolError(ErrorCode.BAD_JSON, "the frame is not valid JSON") from None
    if isinstance(data, dict):
        raw_type = data.get("type")
        if isinstance(raw_type, str):
            if raw_type.lower() == "presence":
                return _parse_presence(data)
            if raw_type.lower() == "history":
                return _parse_history(data)
    return parse_object(data)


def _parse_presence(data: dict[str, Any]) -> PresenceQuery:
    frame_id = _frame_id(data)
    group = data.get("group")
    if not isinstance(group, str) or not group.strip() or len(group) > MAX_NAME_CHARS:
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, "a presence request needs 'group': a group's name", frame_id
        )
    return PresenceQuery(group.strip(), frame_id)


def _parse_history(data: dict[str, Any]) -> HistoryQuery:
    frame_id = _frame_id(data)
    stream = data.get("stream")
    if not isinstance(stream, str):
        stream = ""
    kind, _, name = stream.partition(":")
    if not (stream == "all" or (kind in ("group", "user") and 0 < len(name) <= MAX_NAME_CHARS)):
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE,
            "a history request needs 'stream': 'all', 'group:<name>' or 'user:<username>'",
            frame_id,
        )
    limit = data.get("limit")
    if limit is not None and (type(limit) is not int or limit < 0):
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, "'limit' must be a whole number of messages, 0 or more", frame_id
        )
    if kind == "user":  # one stream per user, however the name is typed (stream_of)
        stream = "user:" + name.lower()
    return HistoryQuery(stream, limit, frame_id)


def _frame_id(data: dict[str, Any]) -> str | None:
    frame_id = data.get("id")
    if frame_id is not None and (not isinstance(frame_id, str) or len(frame_id) > MAX_ID_CHARS):
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, f"'id' must be a string of at most {MAX_ID_CHARS} characters"
        )
    return frame_id


def frame_id_of(frame: str | bytes) -> str | None:
    """The ``id`` of an inbound frame that will not be handled (over the rate), if it is a
    JSON object with a valid one: so that its refusal can name it."""
    try:
        data = orjson.loads(frame)
        return _frame_id(data) if isinstance(data, dict) else None
    except (orjson.JSONDecodeError, ProtocolError):
        return None


class ResumeError(ValueError):
    """A ``resume`` query value that is not what DESIGN 5.1 says it is."""


def parse_resume(text: str) -> dict[str, Position]:
    """The positions a reconnecting client says it has seen: the ``resume`` query value,
    once URL-decoded (JSON ``{"<stream>": {"epoch": "…", "offset": N}, …}``).

    Raises:
        ResumeError: what is wrong with it, for the handshake's 400.
    """
    if len(text) > MAX_RESUME_CHARS:
        raise ResumeError(f"resume is limited to {MAX_RESUME_CHARS} characters")
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise ResumeError("resume must be URL-encoded JSON") from None
    if not isinstance(data, dict):
        raise ResumeError('resume must be an object: {"<stream>": {"epoch", "offset"}}')
    if len(data) > MAX_RESUME_STREAMS:
        raise ResumeError(f"resume names at most {MAX_RESUME_STREAMS} streams")
    positions = {}
    for stream, where in data.items():
        if len(stream) > MAX_NAME_CHARS + 6:
            raise ResumeError("a stream's name is too long")
        epoch = where.get("epoch") if isinstance(where, dict) else None
        offset = where.get("offset") if isinstance(where, dict) else None
        if (
            not isinstance(epoch, str)
            or not 0 < len(epoch) <= MAX_EPOCH_CHARS
            or type(offset) is not int
            or not 0 <= offset < 2**53
        ):
            raise ResumeError(
                f'resume[{_short(stream)}] must be {{"epoch": a string, "offset": an integer >= 0}}'
            )
        positions[stream] = Position(epoch, offset)
    return positions


def stream_of(kind: Kind, target: str) -> str:
    """The stream a message goes to: ``all``, ``group:<name>``, ``user:<username>``
    (case-folded, as usernames are compared: one user, one stream, however it is typed)."""
    if kind is Kind.GROUP:
        return "group:" + target
    if kind is Kind.DIRECT:
        return "user:" + target.lower()
    return "all"


def parse_object(data: Any) -> Publish:
    """Validate one decoded publish object (also used for API and queue bodies)."""
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "expected a JSON object")
    frame_id = _frame_id(data)
    raw_type = data.get("type")
    kind = _KINDS.get(raw_type.lower()) if isinstance(raw_type, str) else None
    if kind is None:
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE,
            f"'type' must be one of broadcast, group, direct; got {_short(raw_type)}",
            frame_id,
        )
    text = data.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "'text' must be a non-empty string", frame_id)
    target = ""
    if kind in _TARGET_FIELD:
        name = _TARGET_FIELD[kind]
        raw = data.get(name)
        if not isinstance(raw, str) or not raw.strip() or len(raw) > MAX_NAME_CHARS:
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE,
                f"a {kind} message needs '{name}': a non-empty name",
                frame_id,
            )
        target = raw.strip()
    return Publish(kind=kind, text=text, target=target, frame_id=frame_id)


def wire_bytes(text: str) -> int:
    """A text's size on the wire: the UTF-8 bytes of its JSON string, escapes included,
    quotes not (``\\u0001`` takes 6, a quote or a backslash 2, ``é`` 2, an emoji 4).

    orjson writes every character in the fewest bytes JSON allows, so a text never takes
    more here than in any frame a client could have sent it in."""
    return len(orjson.dumps(text)) - 2


def check_size(publish: Publish, limit: int) -> None:
    """Check that a message's text takes at most ``limit`` bytes on the wire (``wire_bytes``),
    so that its ``message`` event takes at most ``limit + ENVELOPE_BYTES``.

    Raises:
        ProtocolError: ``too_large``, naming the limit and the text's size in wire bytes.
    """
    text = publish.text
    if len(text) * MAX_CHAR_BYTES <= limit:  # most texts: fit whatever their characters
        return
    size = wire_bytes(text)
    if size > limit:
        raise ProtocolError(
            ErrorCode.TOO_LARGE,
            f"'text' is limited to {limit} bytes on the wire (UTF-8, JSON-escaped); "
            f"this one takes {size}",
            publish.frame_id,
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def encode(event: dict[str, Any]) -> str:
    """One outbound event as frame text."""
    return orjson.dumps(event).decode()


def _head(kind: Kind, stream: str) -> str:
    return encode({"type": "message", "kind": kind.value, "stream": stream})[:-1]


def message_parts(publish: Publish, ts: float) -> tuple[str, str]:
    """The ``message`` event a publish becomes, encoded once for every recipient, as the
    text before and after the place of its offset (``with_offset`` joins them; ``head + tail``
    is the event without an offset, when history is off)."""
    kind = publish.kind
    head = _head(kind, stream_of(kind, publish.target))
    event: dict[str, Any] = {"from": publish.sender}
    if publish.source is not Source.WEBSOCKET:
        event["via"] = publish.source.value  # no backend can pass for a user
    if kind is Kind.GROUP:
        event["group"] = publish.target
    elif kind is Kind.DIRECT:
        event["to"] = publish.target
    event["text"] = publish.text
    event["ts"] = round(ts, 3)
    return head, "," + encode(event)[1:]


OFFSET_KEY: Final = ',"offset":'


def message(publish: Publish, ts: float, offset: int | None = None) -> str:
    """The ``message`` event whole: with its offset, or without (history off)."""
    head, tail = message_parts(publish, ts)
    return head + tail if offset is None else with_offset(head, offset, tail)


def with_offset(head: str, offset: int, tail: str) -> str:
    return head + OFFSET_KEY + str(offset) + tail


_STREAM_KINDS: Final = {"all": Kind.BROADCAST, "group": Kind.GROUP, "user": Kind.DIRECT}


def offset_prefix(stream: str) -> str:
    """How every ``message`` of this stream with an offset begins, up to the offset's
    digits: a frame that starts with it is one of the stream's (``offset_after``)."""
    kind = _STREAM_KINDS[stream.partition(":")[0]]
    return _head(kind, stream) + OFFSET_KEY


def offset_after(frame: str, prefix: str) -> int:
    """The offset of a message that starts with ``offset_prefix(...)``."""
    return int(frame[len(prefix) : frame.index(",", len(prefix))])


BACKEND_MARK: Final = ',"via":"'


def from_backend(frame: str) -> bool:
    """Whether an encoded ``message`` came from a backend (it carries ``via``). Inside a
    JSON string every quote is escaped, so this exact text can only be the key itself."""
    return BACKEND_MARK in frame


def welcome(
    user: str, first_name: str, groups: list[str], streams: dict[str, Position] | None
) -> str:
    event: dict[str, Any] = {
        "type": "welcome",
        "user": user,
        "first_name": first_name,
        "groups": groups,
    }
    if streams is not None:
        event["streams"] = {
            name: {"epoch": where.epoch, "offset": where.offset} for name, where in streams.items()
        }
    return encode(event)


def resumed(missed: int, lost: list[str]) -> str:
    event: dict[str, Any] = {"type": "resumed", "recovered": not lost, "missed": missed}
    if lost:
        event["lost"] = lost
    return encode(event)


def presence(group: str, online: list[str], count: int, events: bool, frame_id: str | None) -> str:
    """Who of a group is online; ``events``: whether online/offline events keep it current
    (the group is small enough), so a client knows whether to ask again."""
    event: dict[str, Any] = {
        "type": "presence",
        "group": group,
        "online": online,
        "count": count,
        "events": events,
    }
    if frame_id is not None:
        event["id"] = frame_id
    return encode(event)


def arrival(kind: str, user: str, group: str) -> str:
    """``online`` or ``offline``: a user's first connection, or last disconnection."""
    return encode({"type": kind, "user": user, "group": group})


def membership(kind: str, group: str) -> str:
    """``joined`` or ``left``: this connection's user was added to, or removed from, a group
    while connected (DESIGN 5.3)."""
    return encode({"type": kind, "group": group})


def history(stream: str, where: Position | None, messages: list[str], frame_id: str | None) -> str:
    """A stream's epoch, offset and recent ``message`` events (their text as kept), oldest
    first; with history off (``where`` None), no position and no messages."""
    event: dict[str, Any] = {"type": "history", "stream": stream}
    if where is not None:
        event["epoch"], event["offset"] = where.epoch, where.offset
    if frame_id is not None:
        event["id"] = frame_id
    return encode(event)[:-1] + ',"messages":[' + ",".join(messages) + "]}"


def ack(frame_id: str) -> str:
    return encode({"type": "ack", "id": frame_id})


def error(code: ErrorCode, detail: str, frame_id: str | None = None) -> str:
    event: dict[str, Any] = {"type": "error", "code": code.value, "detail": detail}
    if frame_id is not None:
        event["id"] = frame_id
    return encode(event)


def too_large(limit: int) -> str:
    """The error frame for a message over the frame limit (the connection then closes 1009)."""
    return error(ErrorCode.TOO_LARGE, f"frames are limited to {limit} bytes")


def batch(frames: list[str]) -> str:
    """Several encoded events as one frame: a JSON array, or the event itself if alone."""
    if len(frames) == 1:
        return frames[0]
    return "[" + ",".join(frames) + "]"


def utf8_size(text: str) -> int:
    """Bytes of ``text`` in UTF-8 (cheap for ASCII, which most frames are)."""
    return len(text) if text.isascii() else len(text.encode())


def batches(frames: list[str], most: int, most_bytes: int) -> Iterator[tuple[str, int]]:
    """Encoded events joined into frames as a connection's writer joins them (outbox.py): at
    most ``most`` events and ``most_bytes`` (UTF-8) a frame, a larger event alone. Yields
    each frame and how many events it holds."""
    sizes = [utf8_size(frame) for frame in frames]
    start = 0
    while start < len(frames):
        end, size = start + 1, sizes[start]
        while end < len(frames) and end - start < most and size + sizes[end] <= most_bytes:
            size += sizes[end]
            end += 1
        yield batch(frames[start:end]), end - start
        start = end
