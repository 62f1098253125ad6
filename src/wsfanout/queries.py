"""A connection's questions: who of a group is online (DESIGN 5.2), a stream's recent
history (DESIGN 5.4). Each is answered to the asking connection only, and only about what
it already hears: a group it is in, a stream it listens to. And the host app's (or a
backend's) question, which users are connected anywhere (``online``, DESIGN 12).

A history answer is bounded like a replay: it goes into the connection's outbox, so it
holds at most the newest messages that fit in a quarter of the outbox's bound (the rest of
the outbox stays free for live messages), never more than ``WSFANOUT_HISTORY_SIZE``.
"""

from __future__ import annotations

from typing import Any, Final

from . import protocol
from .hub import Hub, UnavailableError
from .outbox import Outbox
from .protocol import ErrorCode, HistoryQuery, Kind, PresenceQuery, ProtocolError, Query

PRESENCE_NAMES: Final = 1000  # names in a presence answer (its count is exact)
ONLINE_USERS: Final = 1000  # users asked about at once (``online``)


def usernames(data: Any) -> list[str]:
    """The users an ``online`` question asks about: a list of up to ONLINE_USERS strings.

    Raises:
        ValueError: anything else, saying what was expected.
    """
    if not isinstance(data, list | tuple) or not all(isinstance(name, str) for name in data):
        raise ValueError("users is a list of usernames")
    if len(data) > ONLINE_USERS:
        raise ValueError(f"ask about at most {ONLINE_USERS} users at a time, not {len(data)}")
    return list(data)


async def online(hub: Hub, users: list[str]) -> dict[str, int]:
    """Which of these users are connected anywhere, and with how many connections, keyed
    by the name as given; a name no user can have is not online.

    Raises:
        UnavailableError: the backplane cannot say now.
    """
    names = list(dict.fromkeys(name for name in users if protocol.USERNAME_RE.fullmatch(name)))
    return await hub.connections(names)


def streams_of(outbox: Outbox) -> list[str]:
    """The streams a connection listens to: everyone's, its groups', its user's."""
    return [
        protocol.stream_of(Kind.BROADCAST, ""),
        *(protocol.stream_of(Kind.GROUP, group) for group in outbox.groups),
        protocol.stream_of(Kind.DIRECT, outbox.user),
    ]


async def answer(
    hub: Hub, outbox: Outbox, query: Query, announce: tuple[str, ...], history_size: int
) -> str:
    """The answer to one request from the connection whose outbox this is.

    ``announce``: the groups told of this user's presence (so a presence answer can say
    whether online/offline events keep it current); ``history_size``: the most messages
    a history answer holds.

    Raises:
        ProtocolError: ``forbidden`` (not its group or stream), ``unavailable`` (the
            backplane cannot say now).
    """
    try:
        if isinstance(query, PresenceQuery):
            return await _presence(hub, outbox, query, announce)
        return await _history(hub, outbox, query, history_size)
    except UnavailableError as exc:
        raise ProtocolError(ErrorCode.UNAVAILABLE, str(exc), query.frame_id) from None


async def _presence(
    hub: Hub, outbox: Outbox, query: PresenceQuery, announce: tuple[str, ...]
) -> str:
    if query.group not in outbox.groups:
        raise ProtocolError(
            ErrorCode.FORBIDDEN, f"you are not in group {query.group!r}", query.frame_id
        )
    names, count = await hub.online(query.group, PRESENCE_NAMES)
    events = query.group in announce
    return protocol.presence(query.group, names, count, events, query.frame_id)


async def _history(hub: Hub, outbox: Outbox, query: HistoryQuery, size: int) -> str:
    if query.stream not in streams_of(outbox):
        raise ProtocolError(
            ErrorCode.FORBIDDEN, f"you do not listen to stream {query.stream!r}", query.frame_id
        )
    limit = size if query.limit is None else min(query.limit, size)
    found = await hub.recent(query.stream, limit, outbox.limit // 4)
    if found is None:  # history is off
        return protocol.history(query.stream, None, [], query.frame_id)
    where, messages = found
    return protocol.history(query.stream, where, messages, query.frame_id)
