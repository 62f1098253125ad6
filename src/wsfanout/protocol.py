"""The wire format (v1): inbound frames into ``Publish``, outbound events into text.

Sans-I/O: nothing here touches a socket or the event loop. Inbound frames are
JSON objects; ``type`` is matched case-insensitively so the seed page's
``BroadCast`` / ``Group`` / ``Direct`` work. Outbound events are encoded once
with orjson and decoded to ``str`` once, so the same object can be handed to
every recipient's outbox.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Final

import orjson

MAX_ID_CHARS: Final = 64
MAX_NAME_CHARS: Final = 150
MAX_SENDER_CHARS: Final = 64  # a backend's "from"


class Kind(enum.StrEnum):
    BROADCAST = "broadcast"
    GROUP = "group"
    DIRECT = "direct"


class Source(enum.StrEnum):
    """Where a publish came from; a backend's messages say so (``via``)."""

    WEBSOCKET = "websocket"
    API = "api"
    AMQP = "amqp"


class CloseCode(enum.IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001  # server shutting down
    POLICY = 1008  # origin, auth expired
    TOO_LARGE = 1009
    INTERNAL_ERROR = 1011
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
    ``BROADCAST``. ``sender`` and ``source`` are filled in by whoever publishes it.
    """

    kind: Kind
    text: str
    target: str = ""
    frame_id: str | None = None
    sender: str = ""
    source: Source = Source.WEBSOCKET


_KINDS: Final = {kind.value: kind for kind in Kind}
_TARGET_FIELD: Final = {Kind.GROUP: "group", Kind.DIRECT: "user_name"}


def parse(frame: str | bytes) -> Publish:
    """Validate one inbound frame.

    Raises:
        ProtocolError: ``bad_json`` if it is not JSON, ``bad_message`` if it is not a
            publish of a known type with the fields that type needs.
    """
    try:
        data = orjson.loads(frame)
    except orjson.JSONDecodeError:
        raise ProtocolError(ErrorCode.BAD_JSON, "the frame is not valid JSON") from None
    return parse_object(data)


def parse_object(data: Any) -> Publish:
    """Validate one decoded publish object (also used for API and queue bodies)."""
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "expected a JSON object")
    frame_id = data.get("id")
    if frame_id is not None and (not isinstance(frame_id, str) or len(frame_id) > MAX_ID_CHARS):
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, f"'id' must be a string of at most {MAX_ID_CHARS} characters"
        )
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


def parse_backend_object(data: Any, source: Source, text_limit: int) -> Publish:
    """Validate one publish from a backend (the HTTP API, RabbitMQ): a publish object
    with an optional ``from`` (default ``system``) and a text of at most ``text_limit``
    UTF-8 bytes.

    Raises:
        ProtocolError: as ``parse_object``, or a bad ``from``, or ``too_large``.
    """
    publish = parse_object(data)
    sender = data.get("from", "system")
    if not isinstance(sender, str) or not sender.strip() or len(sender) > MAX_SENDER_CHARS:
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, f"'from' must be a name of 1 to {MAX_SENDER_CHARS} characters"
        )
    if len(publish.text.encode()) > text_limit:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"'text' is limited to {text_limit} bytes")
    return Publish(
        kind=publish.kind,
        text=publish.text,
        target=publish.target,
        frame_id=publish.frame_id,
        sender=sender.strip(),
        source=source,
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def encode(event: dict[str, Any]) -> str:
    """One outbound event as frame text."""
    return orjson.dumps(event).decode()


def message(publish: Publish, ts: float) -> str:
    """The ``message`` event a publish becomes, encoded once for every recipient."""
    kind = publish.kind
    event: dict[str, Any] = {"type": "message", "kind": kind.value, "from": publish.sender}
    if publish.source is not Source.WEBSOCKET:
        event["via"] = publish.source.value  # no backend can pass for a user
    if kind is Kind.GROUP:
        event["group"] = publish.target
    elif kind is Kind.DIRECT:
        event["to"] = publish.target
    event["text"] = publish.text
    event["ts"] = round(ts, 3)
    return encode(event)


BACKEND_MARK: Final = ',"via":"'


def from_backend(frame: str) -> bool:
    """Whether an encoded ``message`` came from a backend (it carries ``via``). Inside a
    JSON string every quote is escaped, so this exact text can only be the key itself."""
    return BACKEND_MARK in frame


def welcome(user: str, first_name: str, groups: list[str]) -> str:
    return encode({"type": "welcome", "user": user, "first_name": first_name, "groups": groups})


def ack(frame_id: str) -> str:
    return encode({"type": "ack", "id": frame_id})


def error(code: ErrorCode, detail: str, frame_id: str | None = None) -> str:
    event: dict[str, Any] = {"type": "error", "code": code.value, "detail": detail}
    if frame_id is not None:
        event["id"] = frame_id
    return encode(event)


def batch(frames: list[str]) -> str:
    """Several encoded events as one frame: a JSON array, or the event itself if alone."""
    if len(frames) == 1:
        return frames[0]
    return "[" + ",".join(frames) + "]"
