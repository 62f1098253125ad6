"""The local index of open connections, and ``publish()``: the one door for every message.

The index is sans-I/O: it only maps everyone, users and groups to outboxes.
Every source (a websocket, the HTTP API, RabbitMQ) hands the hub a ``Publish``
through ``publish()``, a plain ``def``: the event is encoded once, and without a
backplane the same object goes to every local recipient's outbox at once, never
awaiting anyone. With a backplane the encoded event goes to Redis once, and every
node (this one included) fans it out locally when it comes back; ``publish()``
then returns a future that settles when Redis has it. Either way, what the hub
cannot take now (it is shutting down, Redis is away) raises ``UnavailableError``.

Pacing. A backend's batch can be larger than an outbox holds; pushed at once it would
close every recipient with 1013, reading or not. So backends' events are paced:
``publish_paced()`` (the API and RabbitMQ, one batch at a time) and, with a backplane,
the backlog of backend events Redis hands this node (``_deliver``, fanned out in order by
a task of its own). A paced event fills an outbox only up to half its bound (the other
half stays free for users' messages, which are never paced and never wait), and when a
recipient is past that, waits until the outbox is down to a quarter. A client that holds
one batch (or one run of backlog) up for ``pace_timeout`` seconds in all does not keep
up, and is closed with 1013 (``Outbox.overflow``). The wait polls the few full outboxes
with a short, growing sleep: nothing is added to the path of an event that fits.

Positions (DESIGN 5.1). With history on, a message gets its stream's next offset where it
is fanned out from: the in-memory ``History`` (no backplane), in the same step as the
push, or Redis (``backplane.py``), which publishes in offset order. A paced event gets its
offset only once it goes out, and a user's event waits behind a stream's backlog, so each
stream reaches every client in offset order. ``join()`` adds a connection and finds where
its streams stand and what it missed: with no backplane in one step (nothing can be
published in between); with one, live events queue in the outbox while Redis is read, and
those the reply already covers are dropped (``Outbox.floor``).

Presence (DESIGN 5.2). A user's first connection here, and their last, are told to every
node through the backplane (which knows whether it is their first or last anywhere), or,
with no backplane, fanned out here as ``online`` / ``offline`` events to each group the
connection announces to (the ones small enough, chosen by the caller).

Control (DESIGN 5.3). What the operator changes reaches the connections here through
``disconnect()`` (a revoked session: 1008) and ``regroup()`` / ``set_groups()`` (a user's
groups: the index, the outbox's groups, the backplane's subscriptions and presence change
together, and the connection is told ``joined`` / ``left`` in order with the messages).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Final

from . import protocol
from .backplane import Backplane, BackplaneUnavailableError, OnControl
from .history import History
from .outbox import Item, Outbox, item
from .protocol import Kind, Position, Publish

log = logging.getLogger(__name__)

PACE_POLL: Final = (0.001, 0.02)  # the first and the longest sleep while waiting for room
BACKLOG_BYTES: Final = 16 * 1024 * 1024  # backend events from Redis held here while paced
OFFSET_BYTES: Final = 30  # what ',"offset":N' adds to a message, at most
RESYNC_BATCH: Final = 500  # connections closed at a time after losing Redis ...
RESYNC_PAUSE: Final = 0.05  # ... this many seconds apart, so their resumes come in waves


@dataclass(slots=True)
class HubStats:
    """Counters kept per publish, never per recipient."""

    published: dict[tuple[str, str], int] = field(default_factory=dict)
    deliveries: int = 0
    slow_consumers: int = 0
    paced: int = 0  # publishes that waited for room in some outbox


@dataclass(slots=True)
class Joined:
    """What a connection joining the hub is told: where its streams stand (None when
    there is no history, or Redis could not say), what it missed (in order), and which
    of the streams it asked to resume could not be recovered."""

    positions: dict[str, Position] | None
    replay: list[str]
    lost: list[str]


class UnavailableError(Exception):
    """The hub cannot take a publish now (shutting down, backplane away): try again."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Hub:
    """Who is connected here: everyone, by user, and by group."""

    def __init__(
        self,
        backplane: Backplane | None = None,
        pace_timeout: float = 5.0,
        history: History | None = None,
    ) -> None:
        self.pace_timeout = pace_timeout
        self.history = history if backplane is None else None
        self._backlog: collections.deque[tuple[Kind, str, Item]] = collections.deque()
        self._backlog_streams: dict[tuple[Kind, str], int] = {}  # events of each in the backlog
        self._backlog_bytes = 0
        self._backlog_room = asyncio.Event()
        self._pacer: asyncio.Task[None] | None = None
        self._all: set[Outbox] = set()
        self._users: dict[str, set[Outbox]] = {}
        self._groups: dict[str, set[Outbox]] = {}
        # user (case-folded) -> their name at arrival, and the groups told of their presence
        self._announce: dict[str, tuple[str, tuple[str, ...]]] = {}
        self.stats = HubStats()
        self.closed = False
        self._close_code = 0  # what drain() closes with; a latecomer gets it too
        self._empty: asyncio.Event | None = None
        self._resync: asyncio.Task[None] | None = None
        self._on_missed: Callable[[], None] | None = None
        self.backplane = backplane

    def start(
        self, on_control: OnControl | None = None, on_missed: Callable[[], None] | None = None
    ) -> None:
        """Start sharing fan-out with other nodes, if there is a backplane; other nodes'
        control changes go to ``on_control``; ``on_missed`` is called when this node is
        back on Redis after losing it."""
        if self.backplane is not None:
            self._on_missed = on_missed
            self.backplane.start(self._deliver, self._missed, on_control)

    def _missed(self) -> None:
        """Back on Redis after losing it: what was published meanwhile never reached this
        node's connections, nor did the operator's changes (revocations, memberships).
        Close them (1012, a batch at a time) so that they reconnect, through the
        handshake's checks, and (with history) resume what they missed."""
        if self._on_missed is not None:
            self._on_missed()
        if self.backplane is None or self.closed or not self._all:
            return
        log.warning(
            "back on Redis: closing %d connections with 1012 so that they reconnect and resume",
            len(self._all),
        )
        self._resync = asyncio.get_running_loop().create_task(
            self._close_all(protocol.CloseCode.SERVICE_RESTART, RESYNC_BATCH, RESYNC_PAUSE)
        )

    def __len__(self) -> int:
        return len(self._all)

    def add(self, outbox: Outbox, announce: tuple[str, ...] = ()) -> None:
        """Index an outbox under everyone, its user (case-folded) and its groups.

        A user or group seen here for the first time is subscribed to on the backplane.
        A user's first connection here is announced (``online``) to the groups in
        ``announce``, and their last disconnection will be, as ``offline``.
        An outbox added while the hub drains (its handshake was under way) is closed at once.
        """
        if self.closed:
            outbox.close(self._close_code)
        self._all.add(outbox)
        user = outbox.user.lower()
        first = _add(self._users, user, outbox)
        for group in outbox.groups:
            if _add(self._groups, group, outbox) and self.backplane is not None:
                self.backplane.want(Kind.GROUP, group)
        if first:
            self._announce[user] = (outbox.user, announce)  # the name presence knows them by
            if self.backplane is not None:
                self.backplane.want(Kind.DIRECT, user)
                self.backplane.arrive(outbox.user, outbox.groups, announce)
            else:
                self._arrival("online", outbox.user, announce)

    def remove(self, outbox: Outbox) -> None:
        """Forget an outbox; unknown ones are ignored, so cleanup may run twice.

        A user or group with no connection left here is unsubscribed from.
        """
        if outbox not in self._all:
            return
        self._all.discard(outbox)
        user = outbox.user.lower()
        last = _discard(self._users, user, outbox)
        for group in outbox.groups:
            if _discard(self._groups, group, outbox) and self.backplane is not None:
                self.backplane.unwant(Kind.GROUP, group)
        if last:
            name, announce = self._announce.pop(user, (outbox.user, ()))
            if self.backplane is not None:
                self.backplane.unwant(Kind.DIRECT, user)
                self.backplane.depart(name)
            else:
                self._arrival("offline", name, announce)
        if not self._all and self._empty is not None:
            self._empty.set()

    def _arrival(self, kind: str, user: str, groups: tuple[str, ...]) -> None:
        """``online`` / ``offline`` to each of these groups, fanned out here (no backplane)."""
        for group in groups:
            self._push(self._groups.get(group, ()), item(protocol.arrival(kind, user, group)))

    # Control (DESIGN 5.3): what the operator changes reaches open connections here

    def disconnect(self, user: str, session: str | None, reason: str) -> int:
        """Close this user's connections here (only those of ``session``, if given) with
        1008, after a ``forbidden`` error frame saying ``reason``; how many."""
        closing = [
            outbox
            for outbox in self._users.get(user.lower(), ())
            if session is None or outbox.session == session
        ]
        frame = item(protocol.error(protocol.ErrorCode.FORBIDDEN, reason))
        for outbox in closing:
            outbox.push(frame)
            outbox.close(protocol.CloseCode.POLICY)
        return len(closing)

    def regroup(self, user: str, group: str, member: bool) -> int:
        """This user was added to (``member``) or removed from a group: their connections
        here start (or stop) getting its messages, told by a ``joined`` (``left``) event
        queued before any of them (after the last); how many connections changed."""
        event = item(protocol.membership("joined" if member else "left", group))
        changed = 0
        outboxes = self._users.get(user.lower(), set())
        for outbox in outboxes:
            if (group in outbox.groups) is member:
                continue
            if member:
                outbox.groups = (*outbox.groups, group)
                if _add(self._groups, group, outbox) and self.backplane is not None:
                    self.backplane.want(Kind.GROUP, group)
            else:
                outbox.groups = tuple(g for g in outbox.groups if g != group)
                if _discard(self._groups, group, outbox) and self.backplane is not None:
                    self.backplane.unwant(Kind.GROUP, group)
            outbox.push(event)
            changed += 1
        if changed:
            name, announce = self._announce[user.lower()]
            if not member:  # no more online / offline events to a group they left
                self._announce[user.lower()] = (name, tuple(g for g in announce if g != group))
            if self.backplane is not None:
                self.backplane.regroup(name, self._user_groups(user), () if member else (group,))
        return changed

    def set_groups(self, user: str, groups: list[str]) -> None:
        """This user's connections here are now in exactly these groups (``regroup``)."""
        wanted, current = set(groups), set(self._user_groups(user))
        for group in sorted(wanted - current):
            self.regroup(user, group, True)
        for group in sorted(current - wanted):
            self.regroup(user, group, False)

    def drop_group(self, group: str) -> int:
        """A group was deleted: every connection here in it is told ``left``."""
        users = {outbox.user for outbox in self._groups.get(group, ())}
        return sum(self.regroup(user, group, False) for user in users)

    def _user_groups(self, user: str) -> tuple[str, ...]:
        """The groups of any of this user's connections here."""
        return tuple(sorted({g for o in self._users.get(user.lower(), ()) for g in o.groups}))

    async def present(self, kind: Kind, target: str) -> bool:
        """Whether someone is online in this group (or as this user), here or on any node;
        False when the backplane cannot say."""
        if self._recipients(kind, target):
            return True
        if self.backplane is None:
            return False
        try:
            return await self.backplane.present(kind, target)
        except BackplaneUnavailableError:
            return False

    async def online(self, group: str, limit: int) -> tuple[list[str], int]:
        """The group's online users, on every node: up to ``limit`` names, and the count.

        Raises:
            UnavailableError: the backplane cannot say now.
        """
        if self.backplane is not None:
            try:
                return await self.backplane.online(group, limit)
            except BackplaneUnavailableError as exc:
                raise UnavailableError(str(exc)) from None
        users = sorted({outbox.user for outbox in self._groups.get(group, ())})
        return users[:limit], len(users)

    async def join(
        self,
        outbox: Outbox,
        streams: list[str],
        seen: dict[str, Position],
        announce: tuple[str, ...] = (),
    ) -> Joined:
        """``add()`` the outbox, then find where its streams stand and what it missed
        since ``seen`` (for the streams it listens to): nothing it is sent twice, nothing
        published meanwhile missed (see Positions). A replay is bounded like the outbox:
        a stream whose missed messages would take it past ``outbox.limit`` bytes is lost
        instead (the client is told, and refetches)."""
        asked = [stream for stream in streams if stream in seen]
        history, backplane = self.history, self.backplane
        self.add(outbox, announce)
        if history is not None:  # no await from the add() until all is read
            positions = {stream: history.position(stream) for stream in streams}
            found = {stream: history.since(stream, seen[stream]) for stream in asked}
            return _replay(positions, found, outbox.limit)
        if backplane is None or not backplane.history:
            return Joined(None, [], asked)
        # Read positions only once this node hears the connection's streams: what is
        # published after the read then reaches the outbox.
        wanted = [(Kind.DIRECT, outbox.user), *((Kind.GROUP, g) for g in outbox.groups)]
        if not await backplane.subscribed(wanted):
            log.info("a welcome without positions: Redis did not confirm the subscriptions")
            return Joined(None, [], asked)
        try:
            read = await backplane.positions(streams, seen, outbox.limit)
        except BackplaneUnavailableError as exc:
            log.info("a welcome without positions: %s", exc.reason)
            return Joined(None, [], asked)
        positions = {stream: where for stream, (where, _) in read.items()}
        # Live events that came (or are on their way) while Redis was read: the reply
        # covers those up to the tops.
        outbox.floor({stream: where.offset for stream, where in positions.items()})
        return _replay(positions, {stream: read[stream][1] for stream in asked}, outbox.limit)

    async def emptied(self) -> None:
        """Wait until no connection is left."""
        if self._all:
            if self._empty is None or self._empty.is_set():
                self._empty = asyncio.Event()
            await self._empty.wait()

    def has_group(self, name: str) -> bool:
        """Whether a member of this group is connected here (so the group exists)."""
        return name in self._groups

    def local_username(self, name: str) -> str | None:
        """The exact username of a connected user with this username (any case)."""
        outboxes = self._users.get(name.lower())
        return next(iter(outboxes)).user if outboxes else None

    def outboxes(self) -> list[Outbox]:
        """A snapshot of every local connection's outbox."""
        return list(self._all)

    def publish(self, publish: Publish) -> asyncio.Future[None] | None:
        """The one door: fan a message out to its recipients on every node.

        ``publish.target`` must already be resolved: the group's name, or the exact
        username for a direct message.

        Returns:
            None when it was delivered here and now (no backplane); otherwise a future
            that settles when the backplane has taken it, or fails with UnavailableError.

        Raises:
            UnavailableError: the hub is shutting down, or the backplane is away.
        """
        if self.closed:
            raise UnavailableError("the server is shutting down")
        head, tail = protocol.message_parts(publish, time.time())
        backplane = self.backplane
        if backplane is None:
            self._fan_out(publish, head, tail)
            done = None
        else:
            try:
                sent = backplane.publish(publish.kind, publish.target, head, tail)
            except BackplaneUnavailableError as exc:
                raise UnavailableError(str(exc)) from None
            done = asyncio.get_running_loop().create_future()
            sent.add_done_callback(functools.partial(_settle, done))
        self._count(publish)
        return done

    async def publish_paced(
        self, publish: Publish, waited: dict[str, float] | None = None
    ) -> asyncio.Future[None] | None:
        """``publish()``, but first wait for room in the recipients' outboxes (see Pacing).

        ``waited`` carries how long each user has held this batch up so far (pass the
        same dict for every publish of a batch). With a backplane, every node paces what
        it receives (``_deliver``), so this is ``publish()``.

        Raises:
            UnavailableError: as ``publish()``; also when shutting down during the wait.
        """
        if self.backplane is not None or self.closed:
            return self.publish(publish)
        head, tail = protocol.message_parts(publish, time.time())
        size = len(head.encode()) + len(tail.encode()) + OFFSET_BYTES
        full = _full(self._recipients(publish.kind, publish.target), size)
        if full:
            self.stats.paced += 1
            await self._room(full, size, {} if waited is None else waited)
            if self.closed:
                raise UnavailableError("the server is shutting down")
        self._fan_out(publish, head, tail)  # its offset only now: streams stay in order
        self._count(publish)
        return None

    def _fan_out(self, publish: Publish, head: str, tail: str) -> None:
        """Give a message its offset (with history on) and push it to the local recipients."""
        history = self.history
        if history is None:
            frame = head + tail
        else:
            frame = history.append(protocol.stream_of(publish.kind, publish.target), head, tail)
        self._push(self._recipients(publish.kind, publish.target), item(frame))

    def _count(self, publish: Publish) -> None:
        published = self.stats.published
        key = (publish.kind.value, publish.source.value)
        published[key] = published.get(key, 0) + 1

    def _deliver(self, kind: Kind, target: str, frame: str) -> Awaitable[None] | None:
        """What the backplane hands this node. A user's message, or a backend's that fits,
        is fanned out now; a backend's that does not (or that others wait ahead of) joins
        the backlog, which a task of its own paces out in order. Only past BACKLOG_BYTES
        does the backplane get something to await (Redis then holds the rest)."""
        entry = item(frame)
        backlog = self._backlog
        key = (kind, target)
        if not protocol.from_backend(frame):
            # A user's event passes the backlog, unless its own stream waits there: a
            # stream goes out in offset order.
            if not backlog or key not in self._backlog_streams:
                self._push(self._recipients(kind, target), entry)
                return None
        elif not backlog:
            recipients = self._recipients(kind, target)
            if not _full(recipients, entry[1]):
                self._push(recipients, entry)
                return None
        backlog.append((kind, target, entry))
        self._backlog_streams[key] = self._backlog_streams.get(key, 0) + 1
        self._backlog_bytes += entry[1]
        if self._pacer is None or self._pacer.done():
            self._pacer = asyncio.get_running_loop().create_task(
                self._pace_backlog(), name="wsfanout-pacer"
            )
        if self._backlog_bytes > BACKLOG_BYTES:
            self._backlog_room.clear()
            return self._backlog_drains()
        return None

    async def _backlog_drains(self) -> None:
        await self._backlog_room.wait()

    async def _pace_backlog(self) -> None:
        """Fan the backlog out in order, each event once its recipients have room."""
        backlog = self._backlog
        waited: dict[str, float] = {}  # for this run of backlog: how long each user held it up
        try:
            while backlog:
                kind, target, entry = backlog[0]
                full = _full(self._recipients(kind, target), entry[1])
                if full and not self.closed:
                    self.stats.paced += 1
                    await self._room(full, entry[1], waited)
                backlog.popleft()
                self._backlog_bytes -= entry[1]
                streams = self._backlog_streams
                if (left := streams[kind, target] - 1) > 0:
                    streams[kind, target] = left
                else:
                    del streams[kind, target]
                if not self.closed:
                    self._push(self._recipients(kind, target), entry)
                if self._backlog_bytes <= BACKLOG_BYTES:
                    self._backlog_room.set()
        finally:
            self._backlog_room.set()

    async def _room(self, full: list[Outbox], size: int, waited: dict[str, float]) -> None:
        """Wait until each of these outboxes has room again (down to a quarter of its
        bound), or is closed. A user whose connections have held this batch up for
        ``pace_timeout`` seconds in all (counted once per user, however many of their
        sockets are full) does not keep up: those outboxes are overflowed (closed with
        1013). Counting per user, not per socket, means opening a fresh socket that never
        reads every few seconds buys no more than one does."""
        loop = asyncio.get_running_loop()
        delay, longest = PACE_POLL
        budget = self.pace_timeout
        last = loop.time()
        while full and not self.closed:
            await asyncio.sleep(delay)
            delay = min(delay * 2, longest)
            now = loop.time()
            spent, last = now - last, now
            full = [o for o in full if o.close_code is None and o.queued_bytes > _resume(o, size)]
            for user in {outbox.user.lower() for outbox in full}:
                waited[user] = waited.get(user, 0.0) + spent
            still = []
            for outbox in full:
                if waited[outbox.user.lower()] >= budget:
                    outbox.overflow()
                else:
                    still.append(outbox)
            full = still

    def make_room(self, count: int) -> None:
        """Check that ``count`` publishes can be taken now, before taking any of them.

        Raises:
            UnavailableError: the hub is shutting down, or the backplane cannot take them.
        """
        if self.closed:
            raise UnavailableError("the server is shutting down")
        if self.backplane is not None:
            try:
                self.backplane.make_room(count)
            except BackplaneUnavailableError as exc:
                raise UnavailableError(str(exc)) from None

    def _recipients(self, kind: Kind, target: str) -> Collection[Outbox]:
        if kind is Kind.BROADCAST:
            return self._all
        if kind is Kind.GROUP:
            return self._groups.get(target, ())
        return self._users.get(target.lower(), ())

    def _push(self, recipients: Collection[Outbox], entry: Item) -> None:
        """Hand an encoded event to every local recipient."""
        for outbox in recipients:
            outbox.push(entry)
        self.stats.deliveries += len(recipients)

    async def drain(self, code: int, batch: int, pause: float) -> None:
        """Stop taking publishes and ask every connection's writer to finish with ``code``,
        ``batch`` connections at a time, ``pause`` seconds apart, so a big node does not
        send every close (and cause every reconnect) at once."""
        self.closed = True
        self._close_code = code
        await self._close_all(code, batch, pause)

    async def _close_all(self, code: int, batch: int, pause: float) -> None:
        outboxes = self.outboxes()
        for start in range(0, len(outboxes), batch):
            if start:
                await asyncio.sleep(pause)
            for outbox in outboxes[start : start + batch]:
                outbox.close(code)


def _replay(
    positions: dict[str, Position], found: dict[str, list[str] | None], budget: int
) -> Joined:
    """What a joining connection is sent: the missed messages of each stream that can be
    recovered, within ``budget`` bytes in all; the others are lost."""
    replay: list[str] = []
    lost = []
    for stream, missed in found.items():
        size = sum(len(frame) for frame in missed) if missed is not None else 0
        if missed is None or size > budget:
            lost.append(stream)
        else:
            replay += missed
            budget -= size
    return Joined(positions, replay, lost)


def _full(recipients: Collection[Outbox], size: int) -> list[Outbox]:
    """The open outboxes that a paced publish of ``size`` bytes would fill past half their
    bound, and that waiting can bring lower (``_resume``). An event larger than a whole
    outbox is not waited for: it can never fit."""
    return [
        o
        for o in recipients
        if (queued := o.queued_bytes) + size > o.limit // 2
        and queued > _resume(o, size)
        and o.close_code is None
        and size <= o.limit
    ]


def _resume(outbox: Outbox, size: int) -> int:
    """How low a full outbox must get before a paced event of ``size`` bytes goes in: a
    quarter of its bound (so that events go in many at a time), and room for this one."""
    limit = outbox.limit
    return min(limit // 4, limit - size)


def _settle(done: asyncio.Future[None], sent: asyncio.Future[None]) -> None:
    """Pass the backplane's answer on, in the hub's own terms."""
    if done.done():
        return
    if sent.cancelled():
        done.set_exception(UnavailableError("the backplane is shutting down"))
    elif (exc := sent.exception()) is not None:
        done.set_exception(UnavailableError(str(exc)))
    else:
        done.set_result(None)


def _add(index: dict[str, set[Outbox]], key: str, outbox: Outbox) -> bool:
    """Add to a key's set; True if the key is new."""
    members = index.get(key)
    if members is None:
        index[key] = {outbox}
        return True
    members.add(outbox)
    return False


def _discard(index: dict[str, set[Outbox]], key: str, outbox: Outbox) -> bool:
    """Remove from a key's set; True if that emptied (and dropped) the key."""
    members = index.get(key)
    if members is not None:
        members.discard(outbox)
        if not members:
            del index[key]
            return True
    return False
