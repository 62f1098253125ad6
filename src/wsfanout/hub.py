"""The local index of open connections, and ``publish()``: the one door for every message.

The index is sans-I/O: it only maps everyone, users and groups to outboxes. Every source (a
websocket, the HTTP API, RabbitMQ) hands the hub a ``Publish`` through ``publish()``, a plain
``def``: the event is encoded once and handed to the backplane's engine (``backplane/``),
which never awaits anyone. The local engine (one node) fans the same object out to every
local recipient's outbox at once, and ``publish()`` returns None; the Redis engine sends it
to Redis once, every node (this one included) fans it out locally when it comes back, and
``publish()`` returns a future that settles when Redis has it. Either way, what the hub
cannot take now (it is shutting down, Redis is away) raises ``UnavailableError``.

Pacing (``pacing.py``). Backends' events are paced so that a batch larger than an outbox
does not close its clients with 1013: ``publish_paced()`` (the API and RabbitMQ) waits for
room before the local engine fans it out; with Redis, every node paces the backend events
Redis hands it through a backlog of its own. Either way a client that holds backends up past
its small allowance is closed (1013), and users' messages are never paced.
``publish_paced()`` is a plain ``def`` too, handing back something to await (before the next
paced publish) only when it must wait for room; a wait the hub's drain ends does not go out.

Positions (DESIGN 5.1). With history on, a message gets its stream's next offset where it is
fanned out from: the local engine's in-memory ``History``, in the same step as the push, or
Redis, which publishes in offset order. A paced event gets its offset only once it goes out,
and a user's event waits behind a stream's backlog, so each stream reaches every client in
offset order. ``join()`` adds a connection and finds where its streams stand and what it
missed (``Backplane.positions``): the local engine reads them without awaiting anything, so
the add and the read are one step (nothing can be published in between); with Redis, live
events queue in the outbox while Redis is read, and those the reply already covers are
dropped (``Outbox.floor``).

Presence (DESIGN 5.2). A user's first connection here, and their last, are told to the
engine (``arrive`` / ``depart``), which knows whether it is their first or last anywhere and
sends ``online`` / ``offline`` events to each group the connection announces to (the ones
small enough, chosen by the caller).

Control (DESIGN 5.3). What the operator changes reaches the connections here through
``disconnect()`` (a revoked session: 1008) and ``regroup()`` / ``set_groups()`` (a user's
groups: the index, the outbox's groups, the engine's subscriptions and presence change
together, and the connection is told ``joined`` / ``left`` in order with the messages).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Collection

from . import protocol
from .backplane import (
    Backplane,
    BackplaneUnavailableError,
    Node,
    OnControl,
    OnPresence,
    Paced,
    Recent,
)
from .history import Joined, replay
from .outbox import Item, Outbox, item
from .pacing import BACKLOG_BYTES, DrainingError, HubStats, Pacer
from .protocol import Kind, Position, Publish

__all__ = ["Hub", "HubStats", "Joined", "UnavailableError"]

log = logging.getLogger(__name__)


class UnavailableError(Exception):
    """The hub cannot take a publish now (shutting down, backplane away): try again."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Hub:
    """Who is connected here: everyone, by user, and by group."""

    def __init__(
        self,
        backplane: Backplane,
        pace_timeout: float = 0.5,
        backlog_bytes: int = BACKLOG_BYTES,
    ) -> None:
        self.backplane = backplane
        self._all: set[Outbox] = set()
        self._users: dict[str, set[Outbox]] = {}
        self._groups: dict[str, set[Outbox]] = {}
        self._names: dict[str, str] = {}  # user (case-folded) -> their name at arrival
        self.stats = HubStats()
        self.closed = False
        self._close_code = 0  # what drain() closes with; a latecomer gets it too
        self._empty: asyncio.Event | None = None
        self._on_missed: Callable[[], None] | None = None
        self._pacer = Pacer(self._recipients, self._push, self.stats, pace_timeout, backlog_bytes)
        backplane.bind(
            Node(
                deliver=self._pacer.deliver,
                fan_out=self._fan_out,
                room=self._pacer.room,
                users_in=self._users_in,
                missed=self._missed,
                connections=self._connections,
            )
        )

    def start(
        self,
        on_control: OnControl | None = None,
        on_missed: Callable[[], None] | None = None,
        on_presence: OnPresence | None = None,
    ) -> None:
        """Start sharing fan-out with other nodes (if the engine has any); other nodes'
        control changes go to ``on_control``; ``on_missed`` is called when this node is
        back on the backplane after losing it; users coming online and going offline
        (``Backplane.start``) go to ``on_presence``."""
        self._on_missed = on_missed
        self.backplane.start(on_control, on_presence)

    def _missed(self) -> None:
        """Back on Redis after losing it: what was published meanwhile never reached this
        node's connections, nor did the operator's changes (revocations, memberships).
        Close them (1012) so that they reconnect, through the handshake's checks, and (with
        history) resume what they missed. All of them here and now, before the new
        subscription hands anything on: a connection given a message published after the
        gap would have its client move past the gap and resume after it, the gap neither
        given nor reported. The clients spread their returns (a random 0-1 s after 1012)."""
        if self._on_missed is not None:
            self._on_missed()
        if self.closed or not self._all:
            return
        log.warning(
            "back on Redis: closing %d connections with 1012 so that they reconnect and resume",
            len(self._all),
        )
        for outbox in self.outboxes():
            outbox.close(protocol.CloseCode.SERVICE_RESTART)

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
        backplane = self.backplane
        for group in outbox.groups:
            if _add(self._groups, group, outbox):
                backplane.want(Kind.GROUP, group)
        if first:
            self._names[user] = outbox.user  # the name presence knows them by
            backplane.want(Kind.DIRECT, user)
            backplane.arrive(outbox.user, outbox.groups, announce)
        else:
            backplane.recount(self._names[user])

    def remove(self, outbox: Outbox) -> None:
        """Forget an outbox; unknown ones are ignored, so cleanup may run twice.

        A user or group with no connection left here is unsubscribed from.
        """
        if outbox not in self._all:
            return
        self._all.discard(outbox)
        user = outbox.user.lower()
        last = _discard(self._users, user, outbox)
        backplane = self.backplane
        for group in outbox.groups:
            if _discard(self._groups, group, outbox):
                backplane.unwant(Kind.GROUP, group)
        if last:
            backplane.unwant(Kind.DIRECT, user)
            backplane.depart(self._names.pop(user, outbox.user))
        else:
            backplane.recount(self._names[user])
        if not self._all and self._empty is not None:
            self._empty.set()

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
        logged in with a session (not a token or the host's identity) here start (or stop)
        getting its messages, told by a ``joined`` (``left``) event
        queued before any of them (after the last); how many connections changed."""
        event = item(protocol.membership("joined" if member else "left", group))
        changed = 0
        backplane = self.backplane
        outboxes = self._users.get(user.lower(), set())
        for outbox in outboxes:
            # A token's or the host app's connection keeps the groups its issuer gave it.
            if outbox.session is None or (group in outbox.groups) is member:
                continue
            if member:
                outbox.groups = (*outbox.groups, group)
                if _add(self._groups, group, outbox):
                    backplane.want(Kind.GROUP, group)
            else:
                outbox.groups = tuple(g for g in outbox.groups if g != group)
                if _discard(self._groups, group, outbox):
                    backplane.unwant(Kind.GROUP, group)
            outbox.push(event)
            changed += 1
        if changed:
            # No more online / offline events to a group they left.
            left = () if member else (group,)
            backplane.regroup(self._names[user.lower()], self._user_groups(user), left)
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

    def _connections(self, user: str) -> int:
        return len(self._users.get(user.lower(), ()))

    def _users_in(self, group: str) -> set[str]:
        return {outbox.user for outbox in self._groups.get(group, ())}

    async def present(self, kind: Kind, target: str) -> bool:
        """Whether someone is online in this group (or as this user), here or on any node;
        False when the backplane cannot say."""
        if self._recipients(kind, target):
            return True
        try:
            return await self.backplane.present(kind, target)
        except BackplaneUnavailableError:
            return False

    async def online(self, group: str, limit: int) -> tuple[list[str], int]:
        """The group's online users, on every node: up to ``limit`` names, and the count.

        Raises:
            UnavailableError: the backplane cannot say now.
        """
        try:
            return await self.backplane.online(group, limit)
        except BackplaneUnavailableError as exc:
            raise UnavailableError(str(exc)) from None

    async def connections(self, users: list[str]) -> dict[str, int]:
        """``Backplane.connections``; raises ``UnavailableError`` if it cannot say."""
        try:
            return await self.backplane.connections(users)
        except BackplaneUnavailableError as exc:
            raise UnavailableError(str(exc)) from None

    async def recent(self, stream: str, limit: int, budget: int) -> Recent | None:
        """``Backplane.recent``; raises ``UnavailableError`` if the backplane cannot say."""
        try:
            return await self.backplane.recent(stream, limit, budget)
        except BackplaneUnavailableError as exc:
            raise UnavailableError(str(exc)) from None

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
        self.add(outbox, announce)
        read = await self.backplane.positions(outbox, streams, seen)
        if read is None:
            return Joined(None, [], asked)
        positions = {stream: where for stream, (where, _) in read.items()}
        return replay(positions, {stream: read[stream][1] for stream in asked}, outbox.limit)

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
            None when it was delivered here and now (the local engine); otherwise a
            future that settles when the backplane has taken it, or fails with
            UnavailableError.

        Raises:
            UnavailableError: the hub is shutting down, or the backplane is away.
        """
        if self.closed:
            raise UnavailableError("the server is shutting down")
        head, tail = protocol.message_parts(publish, time.time())
        try:
            sent = self.backplane.publish(publish.kind, publish.target, head, tail, publish.key)
        except BackplaneUnavailableError as exc:
            raise UnavailableError(str(exc)) from None
        self._count(publish)
        return None if sent is None else _settled(sent)

    def publish_paced(self, publish: Publish) -> Paced:
        """``publish()`` a backend's message, paced (see Pacing): with the local engine,
        once there is room in the recipients' outboxes; with Redis at once (every node
        paces what it receives).

        Returns:
            None when it was delivered here and now; a future as ``publish()`` returns;
            or, when it must wait for room first, a coroutine to await before the next
            paced publish (it publishes once there is room).

        Raises:
            UnavailableError: as ``publish()``; the coroutine also when the hub begins
            shutting down during the wait (then nothing of it goes out).
        """
        if self.closed:
            raise UnavailableError("the server is shutting down")
        head, tail = protocol.message_parts(publish, time.time())
        try:
            sent = self.backplane.publish_paced(
                publish.kind, publish.target, head, tail, publish.key
            )
        except BackplaneUnavailableError as exc:
            raise UnavailableError(str(exc)) from None
        if sent is None:
            self._count(publish)
            return None
        if isinstance(sent, asyncio.Future):
            self._count(publish)
            return _settled(sent)
        return self._paced(publish, sent)

    async def _paced(self, publish: Publish, waiting: Awaitable[None]) -> None:
        """Wait for room, then count the publish that went out."""
        try:
            await waiting
        except (DrainingError, BackplaneUnavailableError) as exc:
            raise UnavailableError(str(exc)) from None
        self._count(publish)

    def _fan_out(self, kind: Kind, target: str, frame: str) -> None:
        """Push an encoded event to the local recipients (``Node.fan_out``)."""
        self._push(self._recipients(kind, target), item(frame))

    def _count(self, publish: Publish) -> None:
        published = self.stats.published
        key = (publish.kind.value, publish.source.value)
        published[key] = published.get(key, 0) + 1

    def make_room(self, count: int) -> None:
        """Check that ``count`` publishes can be taken now, before taking any of them.

        Raises:
            UnavailableError: the hub is shutting down, or the backplane cannot take them.
        """
        if self.closed:
            raise UnavailableError("the server is shutting down")
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

    async def drain(self, code: int, batch: int, pause: float, by: float | None = None) -> None:
        """Stop taking publishes and ask every connection's writer to finish with ``code``,
        ``batch`` connections at a time, ``pause`` seconds apart, so a big node does not
        send every close (and cause every reconnect) at once; a writer still sending at loop
        time ``by`` gives up (``Outbox.close``)."""
        self.closed = self._pacer.closed = True
        self._close_code = code
        await self._close_all(code, batch, pause, by)

    async def close(self) -> None:
        """After ``drain``: stop the task the hub runs (the backlog's pacing), so that it
        does not outlive the service."""
        self.closed = True
        await self._pacer.close()

    async def _close_all(
        self, code: int, batch: int, pause: float, by: float | None = None
    ) -> None:
        outboxes = self.outboxes()
        for start in range(0, len(outboxes), batch):
            if start:
                await asyncio.sleep(pause)
            for outbox in outboxes[start : start + batch]:
                outbox.close(code, by)


def _settled(sent: asyncio.Future[None]) -> asyncio.Future[None]:
    """A future that settles as ``sent`` does, in the hub's terms."""
    done = asyncio.get_running_loop().create_future()
    sent.add_done_callback(functools.partial(_settle, done))
    return done


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
