"""What a connection's frames become: the application's events, and the answers to its
requests.

A frame is one event or a JSON array of them. An ``ack``, or an ``error``, ``presence`` or
``history`` with the ``id`` of a request in flight, settles that request; everything else is
for the application, once ``streams.py`` has dropped what it already gave. The replay of a
resume (the messages between ``welcome`` and ``resumed``) is held until ``resumed``, then
handed over merged across streams by ``ts``, each stream's in offset order, as the
JavaScript client does.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import Callable, Iterator
from typing import Any, Final

import orjson

from .streams import Streams

log = logging.getLogger(__name__)

_ANSWERS: Final = frozenset({"ack", "error", "presence", "history"})


class ClientError(Exception):
    """A request or a connection that failed. ``code``: the server's error code
    (``forbidden``, ``unknown_group``, …), or the client's own: ``disconnected`` (not
    connected, or the connection ended before the answer), ``timeout``, ``unauthorized``
    (refused for good: no credential the server takes), ``refused``, ``closed``."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail


class EventReader:
    """The frames of one client's connections, one after another.

    ``welcomed``: called at each ``welcome``; ``joined``: called with the stream of a group
    joined while connected (whose epoch the client then asks for).
    """

    def __init__(
        self,
        streams: Streams,
        welcomed: Callable[[], None],
        joined: Callable[[str], None],
    ) -> None:
        self.streams = streams
        self._welcomed = welcomed
        self._joined = joined
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._resuming = False  # the connection asked to resume: a replay will follow
        self._replay: list[dict[str, Any]] | None = None  # held from welcome to resumed

    def begin(self, resuming: bool) -> None:
        """A new connection; ``resuming``: its handshake asked to resume."""
        self._resuming, self._replay = resuming, None

    def expect(self, frame_id: str) -> asyncio.Future[dict[str, Any]]:
        """The future the answer to the request ``frame_id`` settles."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[frame_id] = future
        return future

    def forget(self, frame_id: str) -> None:
        self._pending.pop(frame_id, None)

    def end(self) -> list[dict[str, Any]]:
        """The connection ended: requests in flight fail; what was replayed is handed over."""
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(
                    ClientError("disconnected", "the connection ended before the answer")
                )
        return self._end_replay()

    def take(self, frame: str | bytes) -> list[dict[str, Any]]:
        """The events of one frame for the application; answers settle their requests."""
        try:
            data = orjson.loads(frame)
        except orjson.JSONDecodeError:
            log.warning("ignored a frame that is not JSON: %.80r", frame)
            return []
        out: list[dict[str, Any]] = []
        for event in data if isinstance(data, list) else [data]:
            if not isinstance(event, dict):
                continue
            kind = event.get("type")
            if kind in _ANSWERS and self._answer(event):
                continue
            if kind == "message":
                if self._replay is not None and "offset" in event:
                    self._replay.append(event)
                elif self.streams.message(event):
                    out.append(event)
                continue
            if kind == "welcome":
                made = self.streams.welcome(event)
                self._replay = [] if self._resuming else None
                self._welcomed()
                out += [event] if made is None else [event, made]
                continue
            if kind == "resumed":
                out += self._end_replay()
                event = self.streams.resumed(event)
            elif kind == "joined" and isinstance(event.get("group"), str):
                self._joined(self.streams.joined(event["group"]))
            elif kind == "left" and isinstance(event.get("group"), str):
                self.streams.left(event["group"])
            out.append(event)
        return out

    def _end_replay(self) -> list[dict[str, Any]]:
        replay, self._replay = self._replay, None
        if not replay:
            return []
        streams: dict[str, list[dict[str, Any]]] = {}
        for event in replay:
            streams.setdefault(str(event.get("stream")), []).append(event)
        merged: Iterator[dict[str, Any]] = heapq.merge(*streams.values(), key=_ts)
        return [event for event in merged if self.streams.message(event)]

    def _answer(self, event: dict[str, Any]) -> bool:
        """Settle the request this event answers; whether it answered one."""
        future = self._pending.pop(str(event.get("id")), None)
        if future is None or future.done():
            return False
        if event["type"] == "error":
            code = event.get("code")
            future.set_exception(ClientError(str(code), str(event.get("detail", ""))))
        else:
            if event["type"] == "history":
                self.streams.history(event)
            future.set_result(event)
        return True


def _ts(event: dict[str, Any]) -> float:
    ts = event.get("ts")
    return float(ts) if isinstance(ts, int | float) else 0.0
