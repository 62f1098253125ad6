"""What one address may hold of a server process before the app sees anything: connections
that wait for a request, and connections in all. The adapters count them at the server's own
protocol objects (hypercorn_tcp.py, uvicorn.py), where the peer's address is known as the
connection is made, long before a request reaches any app.

Theory of operation. A connection is counted from the moment the server accepts it until it
is closed; it *waits* (``Wait``) while the server waits for it to send a whole request, head
and body: from its start until its first request is whole, and again from the end of a
response until the next request is whole. While it waits, the peer decides how long the
server is kept: a client that sends a head and then trickles its body makes the server wait
as surely as one that trickles its head. A new connection from an address that already holds
``PeerLimits.waiting`` waiting connections (or ``PeerLimits.connections`` in all) closes
that address's oldest connection idle between two requests (kept alive, its response sent),
if it has one (its client opens another when it needs one, as after the server's
keep-alive timeout), and is reset at once otherwise, before the server reads a byte of it:
its descriptor is free again at once, so a client that trickles heads or bodies from a few
addresses can hold no more than those caps, and everyone else is still accepted. A
connection whose first head is not whole within ``PeerLimits.head_timeout`` is closed, and
so is one whose request body is not whole within ``PeerLimits.body_timeout`` of its head
(the server would otherwise read a trickled body for as long as it trickles: uvicorn goes
on reading, and discarding, a body its app did not read, even after the answer). A request
without a body (a websocket's handshake, a GET) is whole with its head.

Addresses are counted as the server sees them: behind a reverse proxy every client is the
proxy's address (README: Behind a reverse proxy). IPv6 addresses count per /64, the block
one subscriber usually gets. Refusals are logged as one warning at once, then at most one a
minute with their count.
"""

from __future__ import annotations

import asyncio
import enum
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
    """The per-address caps of one server process (0: no cap), and the head and body
    timeouts."""

    head_timeout: float = 5.0  # seconds a new connection has to send a whole request head
    # Seconds a request's body has once its head is whole: the app's own bound on the bodies
    # it reads (http.read_body: 10 s, then 408) and a second for that answer to go out first.
    body_timeout: float = 11.0
    waiting: int = 256  # connections of one address waiting for a request (head or body)
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


class Wait(enum.Enum):
    """What a connection waits for of its peer, if anything."""

    HEAD = "its first request head"
    BODY = "the rest of a request's body"
    NEXT = "its next request head (kept alive)"
    NONE = "nothing: its request is whole (being answered, or a websocket)"


class Peer:
    """One connection's place in its address's counts. ``reading``, ``started``, ``waiting``
    and ``left`` may be called in any order, as often as the server likes."""

    __slots__ = ("_address", "_body_timer", "_peers", "transport", "wait")

    def __init__(self, peers: Peers, address: Address | None, transport: Any) -> None:
        self._peers = peers
        self._address = address  # None: not counted (a unix socket), or closed
        self.transport = transport  # the connection's asyncio transport, to close it
        self.wait = Wait.HEAD
        self._body_timer: asyncio.TimerHandle | None = None

    @property
    def fresh(self) -> bool:
        """No whole request head yet."""
        return self.wait is Wait.HEAD

    @property
    def is_waiting(self) -> bool:
        return self.wait is not Wait.NONE

    def reading(self) -> None:
        """A whole request head has come, its body not yet: the connection still waits (and
        is no longer idle); it is closed if the body is not whole within
        ``PeerLimits.body_timeout``."""
        self._become(Wait.BODY)
        if self._body_timer is None and not self.transport.is_closing():
            timeout = self._peers.limits.body_timeout
            self._body_timer = asyncio.get_running_loop().call_later(timeout, self._body_late)

    def started(self) -> None:
        """A whole request has come, head and body (the connection may be a websocket now)."""
        self._become(Wait.NONE)

    def waiting(self) -> None:
        """The connection waits for its next request head (kept alive). Nothing changes
        while it has not sent its first."""
        if self.wait is not Wait.HEAD:
            self._become(Wait.NEXT)

    def left(self) -> None:
        """The connection is closed."""
        self._stop_body_timer()
        address = self._address
        if address is None:
            return
        self._address = None
        address.connections -= 1
        if self.wait is not Wait.NONE:
            address.waiting -= 1
            address.idle.pop(self, None)
        if address.connections == 0:
            self._peers.forget(address)

    def close(self) -> None:
        """Close the connection (it is idle between two requests), and count it gone now."""
        self.left()
        if not self.transport.is_closing():
            self.transport.close()

    def _become(self, wait: Wait) -> None:
        before, self.wait = self.wait, wait
        if wait is not Wait.BODY:
            self._stop_body_timer()
        address = self._address
        if address is None or before is wait:
            return
        if before is Wait.NONE:
            address.waiting += 1
        elif wait is Wait.NONE:
            address.waiting -= 1
        if wait is Wait.NEXT:
            address.idle[self] = None
        else:
            address.idle.pop(self, None)

    def _stop_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_late(self) -> None:
        """The body is not whole in time: close the connection (the server sees its end)."""
        self._body_timer = None
        if self.wait is Wait.BODY and not self.transport.is_closing():
            self._peers.late += 1
            self.transport.close()


class Peers:
    """The counts, per address, of the connections one server process holds."""

    def __init__(self, limits: PeerLimits | None = None) -> None:
        self.limits = limits or PeerLimits()
        self._addresses: dict[str, Address] = {}
        self.refused = 0  # connections refused in all
        self.closed = 0  # idle connections closed to make room for a new one
        self.late = 0  # connections closed as their request's body was not whole in time
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
            "held %d, %d of them waiting for a request; caps: %s waiting, %s in all: "
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
