"""Lighter queues of waiters for a hypercorn connection's asyncio parts.

Theory of operation. An empty ``collections.deque`` holds a block of 64 slots: about 760
bytes. A hypercorn websocket connection keeps seven of them for its whole life, each empty
or nearly so, as asyncio makes them: the app's queue of ASGI events (its items, its getters,
its putters, and the ``Event`` its ``join()`` would wait on), the protocol's ``can_read``
event, the stream writer's drain waiters, and wsproto's queue of parsed events. That is
about 5 KiB of an idle connection's 30, more than any part of wsfanout's own.

Once accepted, a stream's handshake (the request's websocket headers, parsed) is read only
for whether it was accepted: ``lighten`` puts one shared ``ACCEPTED`` in its place.

``Few`` is a list with the one deque method these use besides a list's own (``popleft``):
an empty one holds 56 bytes. ``lighten`` swaps it in, keeping what each held, when the app
has accepted the connection (the wrapped accept, hypercorn.py): asyncio's ``Queue`` and
``Event`` and ``FlowControlMixin`` only append, popleft, remove, iterate and take ``len``
of these (tests/test_lean.py runs them so). A popleft is O(n) in a list, and these hold a few
at most: hypercorn's app queue is bounded (``max_app_queue_size``, 10 unless told).
Anything not where it was is left as it is (a connection is only heavier).
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, Final, TypeVar

T = TypeVar("T")


class Few(list[T]):
    """A deque for a few items: a list that also pops from the left."""

    __slots__ = ()

    def popleft(self) -> T:
        return self.pop(0)


class _Accepted:
    """What hypercorn reads of an accepted stream's handshake (whether it was accepted)."""

    __slots__ = ()
    accepted = True


ACCEPTED: Final = _Accepted()


def _swap(owner: Any, name: str) -> None:
    found = getattr(owner, name, None)
    if type(found) is collections.deque:
        setattr(owner, name, Few(found))


def lighten(stream: Any, connection: Any) -> Any:
    """Swap ``Few`` in for the deques of a hypercorn websocket stream's connection, and of
    its wsproto ``connection`` (made at accept: its queue of parsed events). Returns the
    connection's ``TCPServer`` (None: not found)."""
    put = getattr(stream, "app_put", None)
    queue = getattr(put, "__self__", None)
    if isinstance(queue, asyncio.Queue):
        for name in ("_queue", "_getters", "_putters"):
            _swap(queue, name)
        _swap(getattr(queue, "_finished", None), "_waiters")
    protocol = getattr(getattr(stream, "send", None), "__self__", None)
    event = getattr(getattr(protocol, "can_read", None), "_event", None)
    if isinstance(event, asyncio.Event):
        _swap(event, "_waiters")
    server = getattr(getattr(protocol, "send", None), "__self__", None)
    writer = getattr(server, "writer", None)
    _swap(getattr(writer, "_protocol", None), "_drain_waiters")
    _swap(connection, "_events")
    if getattr(getattr(stream, "handshake", None), "accepted", False) is True:
        stream.handshake = ACCEPTED  # the request's parsed headers, done with
    return server
