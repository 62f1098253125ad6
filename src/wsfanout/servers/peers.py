"""What one address may hold of a server process before the app sees anything: connections
that wait for a request head, and connections in all. The adapters count them at the
server's own protocol objects (hypercorn_tcp.py, uvicorn.py), where the peer's address is
known as the connection is made, long before a request reaches any app.

Theory of operation. A connection is counted from the moment the server accepts it until it
is closed; it *waits* while it has not sent a whole request head: from its start until its
first head is whole, and again between two requests on a kept-alive connection. A new
connection from an address that already holds ``PeerLimits.waiting`` waiting connections (or
``PeerLimits.connections`` in all) closes that address's oldest connection idle between two
requests, if it has one (its client opens another when it needs one, as after the server's
keep-alive timeout), and is reset at once otherwise, before the server reads a byte of it:
its descriptor is free again at once, so a client that trickles heads from a few addresses
can hold no more than those caps, and everyone else is still accepted. A waiting
connection whose first head is not whole within ``PeerLimits.head_timeout`` is closed.

Addresses are counted as the server sees them: behind a reverse proxy every client is the
proxy's address (README: Behind a reverse proxy). IPv6 addresses count per /64, the block
one subscriber usually gets. Refusals are logged as one warning at once, then at most one a
minute with their count.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, Final

log = logging.getLogger(__package__)  # one logger for the servers package: "wsfanout.servers"

LOG_EVERY: Final = 60.0  # seconds between two log lines about refused connections


@dataclass(frozen=True, kw_only=True)
class PeerLimits:
    """The per-address caps of one server process (0: no cap), and the head timeout."""

    head_timeout: float = 5.0  # seconds a new connection has to send a whole request head
    waiting: int = 256  # connections of one address waiting for a request head
    connections: int = 0  # connections of one address in all


class Address:
    """The counts of one address: its connections, how many of them wait, and those of
    them kept alive between two requests, oldest first."""

    __slots__ = ("connections", "idle", "key", "waiting")

    def __init__(self, key: str) -> None:
        self.key = key
        self.connections = 0
        self.waiting = 0
        self.idle: dict[Peer, None] = {}  # an ordered set


class Peer:
    """One connection's place in its address's counts. ``started``, ``waiting`` and
    ``left`` may be called in any order, as often as the server likes."""

    __slots__ = ("_address", "_peers", "fresh", "is_waiting", "transport")

    def __init__(self, peers: Peers, address: Address | None, transport: Any) -> None:
        self._peers = peers
        self._address = address  # None: not counted (a unix socket), or closed
        self.transport = transport  # the connection's asyncio transport, to close it
        self.is_waiting = True
        self.fresh = True  # no request head yet

    def started(self) -> None:
        """A whole request head has come (the connection may be a websocket now)."""
        self.fresh = False
        address = self._address
        if self.is_waiting:
            self.is_waiting = False
            if address is not None:
                address.waiting -= 1
                address.idle.pop(self, None)

    def waiting(self) -> None:
        """The connection waits for its next request head (kept alive)."""
        address = self._address
        if not self.is_waiting and address is not None:
            self.is_waiting = True
            address.waiting += 1
            address.idle[self] = None

    def left(self) -> None:
        """The connection is closed."""
        address = self._address
        if address is None:
            return
        self._address = None
        address.connections -= 1
        if self.is_waiting:
            address.waiting -= 1
            address.idle.pop(self, None)
        if address.connections == 0:
            self._peers.forget(address)

    def close(self) -> None:
        """Close the connection (it is idle between two requests), and count it gone now."""
        self.left()
        if not self.transport.is_closing():
            self.transport.close()


class Peers:
    """The counts, per address, of the connections one server process holds."""

    def __init__(self, limits: PeerLimits | None = None) -> None:
        self.limits = limits or PeerLimits()
        self._addresses: dict[str, Address] = {}
        self.refused = 0  # connections refused in all
        self.closed = 0  # idle connections closed to make room for a new one
        self._unlogged = 0  # refused since the last log line
        self._last = ("", 0, 0)  # the last refused: its address, connections and waiting
        self._logged_at = -LOG_EVERY
        self._report: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        """How many addresses hold connections now."""
        return len(self._addresses)

    def arrive(self, peername: Any, transport: Any) -> Peer | None:
        """A connection from ``peername`` (the socket's ``getpeername()``, or None) was just
        accepted on ``transport``: its place in the counts, or None if its address holds
        too much already (the caller resets it). An address at a cap first loses its oldest
        connection kept alive between two requests, if it has one (closed, as the server's
        keep-alive timeout would have closed it)."""
        key = address_key(peername)
        if key is None:  # a unix socket: no address to count by
            return Peer(self, None, transport)
        address = self._addresses.get(key)
        if address is None:
            address = self._addresses[key] = Address(key)
        else:
            limits = self.limits
            over = 0  # how many connections must go first
            if limits.waiting:
                over = address.waiting - limits.waiting + 1
            if limits.connections:
                over = max(over, address.connections - limits.connections + 1)
            if over > 0:
                if over > len(address.idle):
                    self._refuse(address)
                    return None
                for peer in list(itertools.islice(address.idle, over)):
                    peer.close()
                self.closed += over
                if address.connections == 0:  # closing its last one forgot it
                    self._addresses[key] = address
        address.connections += 1
        address.waiting += 1
        return Peer(self, address, transport)

    def counts(self, peername: Any) -> tuple[int, int]:
        """(connections, waiting) of the address of ``peername`` now."""
        key = address_key(peername)
        address = self._addresses.get(key) if key is not None else None
        return (address.connections, address.waiting) if address is not None else (0, 0)

    def forget(self, address: Address) -> None:
        """An address holds nothing any more."""
        if self._addresses.get(address.key) is address:
            del self._addresses[address.key]

    def _refuse(self, address: Address) -> None:
        self.refused += 1
        self._unlogged += 1
        self._last = (address.key, address.connections, address.waiting)
        if self._report is None:  # one line now, then at most one a minute
            wait = max(0.0, self._logged_at + LOG_EVERY - time.monotonic())
            self._report = asyncio.get_running_loop().call_later(wait, self._log)

    def _log(self) -> None:
        self._report = None
        self._logged_at = time.monotonic()
        key, connections, waiting = self._last
        limits = self.limits
        log.warning(
            "refused %d connection%s over the per-address caps (the last from %s, which "
            "held %d, %d of them waiting for a request head; caps: %s waiting, %s in all: "
            "WSFANOUT_MAX_WAITING_PER_ADDRESS, WSFANOUT_MAX_CONNECTIONS_PER_ADDRESS)",
            self._unlogged,
            "" if self._unlogged == 1 else "s",
            key,
            connections,
            waiting,
            limits.waiting or "no",
            limits.connections or "no",
        )
        self._unlogged = 0


def address_key(peername: Any) -> str | None:
    """What a connection is counted by: its IPv4 address, or its IPv6 address's /64 (an
    IPv4-mapped one as IPv4); None for anything else (a unix socket)."""
    if not isinstance(peername, tuple) or not peername or not isinstance(peername[0], str):
        return None
    host = peername[0]
    if ":" not in host:
        return host
    try:
        address = ipaddress.IPv6Address(host.partition("%")[0])
    except ValueError:
        return host
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((address, 64), strict=False))
