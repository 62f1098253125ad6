"""The backplane: the interface the hub talks to, and its engines.

- ``base.py``: the interface (``Backplane``), what the hub hands an engine (``Node``), and
  the one error an engine raises (``BackplaneUnavailableError``);
- ``local.py``: one node, the embedded default (history in memory, presence local);
- ``redis/``: many nodes through Redis.

A later engine (Redis Cluster with sharded pub/sub, NATS) is one more module here.
"""

from __future__ import annotations

from .base import (
    Backplane,
    BackplaneUnavailableError,
    Node,
    OnControl,
    OnMessage,
    OnPresence,
    Paced,
    Read,
    Recent,
)
from .local import LocalBackplane

__all__ = [
    "Backplane",
    "BackplaneUnavailableError",
    "LocalBackplane",
    "Node",
    "OnControl",
    "OnMessage",
    "OnPresence",
    "Paced",
    "Read",
    "Recent",
]
