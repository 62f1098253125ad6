"""pacing: room for a backend's events, each user's allowance for holding them up, and the
backlog of what the backplane hands a node, driven in-process (no Redis) through the Pacer's
doors, with readers that read only when a test says so. Waits are for conditions, with
generous timeouts; a wall-clock bound is used only where it is what a test is about (the
allowance), and then as loose as the behaviour allows."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection

import pytest

from tests.outboxes import Reader, eventually, outbox
from wsfanout import protocol
from wsfanout.flusher import Flusher
from wsfanout.outbox import Item, Outbox, item
from wsfanout.pacing import BACKLOG_BYTES, GRACE, DrainingError, HubStats, Pacer
from wsfanout.protocol import Kind, Publish, Source

WAIT = 10.0  # seconds a condition may take under load before a test fails


class Node:
    """A pacer over a few readers, indexed as the hub indexes them (everyone, by user,
    by group), pushing to them as the hub does."""

    def __init__(self, pace_timeout: float = 30.0, backlog_bytes: int = BACKLOG_BYTES) -> None:
        self.readers: list[Reader | Gated] = []
        self.stats = HubStats()
        self.pacer = Pacer(self.recipients, self.push, self.stats, pace_timeout, backlog_bytes)

    def connect(self, user: str, *groups: str) -> Reader:
        reader = Reader(user, *groups)
        self.readers.append(reader)
        return reader

    def recipients(self, kind: Kind, target: str) -> Collection[Outbox]:
        outboxes = [reader.outbox for reader in self.readers]
        if kind is Kind.BROADCAST:
            return outboxes
        if kind is Kind.GROUP:
            return [outbox for outbox in outboxes if target in outbox.groups]
        return [outbox for outbox in outboxes if outbox.user.lower() == target.lower()]

    def push(self, recipients: Collection[Outbox], entry: Item) -> None:
        for recipient in recipients:
            recipient.push(entry)

    def deliver(self, publish: Publish) -> None:
        """Hand the pacer an event as the backplane would (its listener never waits)."""
        frame = protocol.message(publish, 0.0)
        self.pacer.deliver(publish.kind, publish.target, frame)


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    n = Node()
    yield n
    for reader in n.readers:
        await reader.close()  # a closed outbox holds nothing up: the backlog runs out


def api(text: str, kind: Kind = Kind.BROADCAST, target: str = "") -> Publish:
    return Publish(kind, text, target, sender="ops", source=Source.API)


def user(text: str, kind: Kind = Kind.BROADCAST, target: str = "") -> Publish:
    return Publish(kind, text, target, sender="greg")


# room(): what the local engine asks before it fans a backend's event out


async def test_room_is_given_at_once_while_it_fits(node: Node) -> None:
    """Up to half an outbox's bound, room() has nothing to await; past it, it hands back
    a wait, which ends once the client has read the outbox down to a quarter."""
    greg = node.connect("greg")
    assert node.pacer.room(Kind.DIRECT, "greg", 4_000) is None
    assert node.stats.paced == 0
    greg.outbox.push(item(protocol.message(user("x" * 3_000), 0.0)))
    waiting = node.pacer.room(Kind.DIRECT, "greg", 3_000)
    assert waiting is not None and node.stats.paced == 1
    task = asyncio.ensure_future(waiting)
    for _ in range(5):
        await asyncio.sleep(0)
    assert not task.done()  # nobody reads
    greg.read()
    await asyncio.wait_for(task, WAIT)
    assert greg.outbox.queued_bytes <= greg.outbox.limit // 4 and greg.outbox.close_code is None


async def test_an_event_larger_than_an_outbox_is_not_waited_for(node: Node) -> None:
    """An event that could never fit does not wait (the outbox will refuse it)."""
    greg = node.connect("greg")
    greg.outbox.push(item(protocol.message(user("x" * 6_000), 0.0)))
    assert node.pacer.room(Kind.DIRECT, "greg", greg.outbox.limit + 1) is None
    waiting = node.pacer.room(Kind.DIRECT, "greg", 1_000)  # one that can, waits
    assert waiting is not None
    waiting.close()


async def test_a_wait_the_drain_ends_raises(node: Node) -> None:
    """When the hub begins draining, a wait for room ends in DrainingError: that event
    does not go out."""
    greg = node.connect("greg")
    greg.outbox.push(item(protocol.message(user("x" * 6_000), 0.0)))
    waiting = node.pacer.room(Kind.DIRECT, "greg", 100)
    assert waiting is not None
    task = asyncio.ensure_future(waiting)
    await asyncio.sleep(0)
    node.pacer.closed = True
    with pytest.raises(DrainingError, match="shutting down"):
        await asyncio.wait_for(task, WAIT)
    assert greg.outbox.close_code is None  # refused, not overflowed


def full_socket(node: Node, name: str) -> Reader:
    """A new socket of this user whose outbox is past half its bound (nothing read yet)."""
    socket = node.connect(name)
    socket.outbox.push(item(protocol.message(user("x" * 6_000, Kind.DIRECT, name), 0.0)))
    return socket


async def hold_up(node: Node, socket: Reader | Gated, seconds: float) -> float:
    """A paced event waits for this socket, which reads after ``seconds``: how long the
    wait took (the socket may have been closed first)."""
    waiting = node.pacer.room(Kind.DIRECT, socket.outbox.user, 100)
    assert waiting is not None
    loop = asyncio.get_running_loop()
    started = loop.time()
    task = asyncio.ensure_future(waiting)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        socket.read()
    await asyncio.wait_for(task, WAIT)
    return loop.time() - started


async def test_a_user_who_drains_within_the_grace_owes_nothing(node: Node) -> None:
    """Waits that a user's connections end within the grace are free, however many: a
    client that reads is never closed for the waits a large batch brings (were they
    charged, 20 of these would spend an allowance of 0.1 s and the grace)."""
    node.pacer.pace_timeout = 0.1
    for _ in range(20):
        socket = full_socket(node, "greg")
        await hold_up(node, socket, 0.02)
        assert socket.outbox.close_code is None


async def test_a_users_allowance_follows_them_over_waits_and_sockets(node: Node) -> None:
    """What a wait lasts past the grace is owed, over every wait and every socket of the
    user: a client that drains late holds up its first wait, then a new socket of the
    same user is closed (1013) before it drains, with what was left; a fresh socket of a
    user who has spent their allowance is closed at once, not given another."""
    node.pacer.pace_timeout = 1.0  # 1.25 s with the grace: a drain after 1 s owes 0.75 s
    first = full_socket(node, "chuck")
    assert await hold_up(node, first, 1.0) >= 1.0
    assert first.outbox.close_code is None
    second = full_socket(node, "chuck")
    assert await hold_up(node, second, 1.0) < 0.8  # 0.5 s was left, and a little came back
    assert second.outbox.close_code == 1013
    fresh = full_socket(node, "chuck")
    assert await hold_up(node, fresh, 1.0) < 0.2  # all of it is owed
    assert fresh.outbox.close_code == 1013
    other = full_socket(node, "mike")  # others owe nothing
    assert await hold_up(node, other, 0.5) >= 0.5 and other.outbox.close_code is None


class Gated:
    """A connection whose client reads only while its gate is open: it can stop reading
    and start again (``Reader`` reads for good once told to)."""

    def __init__(self, node: Node, name: str) -> None:
        self.gate = asyncio.Event()
        self.flusher = Flusher()
        self.outbox = outbox(name, send=self._send, flusher=self.flusher)
        self._writer = asyncio.get_running_loop().create_task(self.outbox.run())
        node.readers.append(self)

    async def _send(self, message: object) -> None:
        await self.gate.wait()

    async def fill(self) -> None:
        """Stop reading, and be sent enough to be past half the outbox's bound: the first
        event waits in the send, the second in the outbox."""
        self.gate.clear()
        frame = item(protocol.message(user("x" * 6_000, Kind.DIRECT, self.outbox.user), 0.0))
        self.outbox.push(frame)
        await eventually(lambda: self.outbox.queued_bytes == 0, WAIT)  # in the send
        self.outbox.push(frame)

    def read(self) -> None:
        self.gate.set()

    async def close(self) -> None:
        self.outbox.close(1000)
        self.gate.set()
        await self._writer
        await self.flusher.close()


async def test_a_socket_that_has_kept_pace_keeps_the_grace(node: Node) -> None:
    """A user whose socket that never reads was closed owes the whole allowance; their
    socket that has drained a wait before still gets the grace (a user's other tabs do not
    pay for one that hangs), a new one gets nothing."""
    node.pacer.pace_timeout = 0.2
    tab = Gated(node, "greg")
    await tab.fill()
    waiting = node.pacer.room(Kind.DIRECT, "greg", 100)
    assert waiting is not None
    await asyncio.sleep(0.05)
    tab.read()
    await asyncio.wait_for(waiting, WAIT)
    assert tab.outbox.close_code is None and tab.outbox.kept_pace
    hung = full_socket(node, "greg")
    assert await hold_up(node, hung, 5.0) < 5.0  # closed after its allowance
    assert hung.outbox.close_code == 1013
    await tab.fill()  # greg owes it all: the tab still has the grace
    assert await hold_up(node, tab, 0.1) >= 0.1
    assert tab.outbox.close_code is None
    new = full_socket(node, "greg")
    assert await hold_up(node, new, 1.0) < 0.2
    assert new.outbox.close_code == 1013


async def test_a_users_full_sockets_are_counted_once(node: Node) -> None:
    """A user's waiting is counted once however many of their sockets are full: two
    sockets never reading spend the user's allowance no faster than one would."""
    node.pacer.pace_timeout = 0.3
    sockets = [node.connect("chuck"), node.connect("chuck")]
    for socket in sockets:
        socket.outbox.push(item(protocol.message(user("x" * 6_000), 0.0)))
    waiting = node.pacer.room(Kind.DIRECT, "chuck", 100)
    assert waiting is not None
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(waiting, WAIT)
    assert [socket.outbox.close_code for socket in sockets] == [1013, 1013]
    # Counted per socket, the two would have spent it in half the time.
    assert loop.time() - started >= GRACE + 0.3


# deliver(): what the backplane hands a node, paced through the backlog


async def test_a_backend_event_that_does_not_fit_waits_in_the_backlog(node: Node) -> None:
    """A backend's event into an outbox past half its bound waits in the backlog (the
    listener goes on) until the outbox is down to a quarter; later backend events keep
    their place behind it, and other readers get theirs meanwhile."""
    greg, mike = node.connect("greg"), node.connect("mike")
    mike.read()
    texts = ["a" * 2_300, "b" * 2_300, "c" * 2_300, "d" * 100]
    for text in texts:
        node.deliver(api(text))  # the listener goes on
    node.deliver(user("probe", Kind.DIRECT, "mike"))
    await eventually(lambda: "probe" in mike.texts(), WAIT)
    assert greg.outbox.queued_bytes < greg.outbox.limit // 2 and node.stats.paced == 1
    greg.read()  # the client reads: the outbox empties, the backlog goes in
    await eventually(lambda: len(greg.texts()) == 4, WAIT)
    assert greg.texts() == texts and greg.outbox.close_code is None
    await eventually(lambda: len(mike.texts()) == 5, WAIT)
    assert mike.texts() == [*texts[:2], "probe", *texts[2:]]


async def test_a_users_event_passes_the_backlog_of_other_streams_only(node: Node) -> None:
    """A user's event is not paced: it passes the backlog at once, unless its own stream
    waits there; then it keeps its place, so each stream goes out in order."""
    greg = node.connect("greg", "boys")
    backend = ["a" * 2_300, "b" * 2_300, "c" * 2_300]
    for text in backend:
        node.deliver(api(text))  # c waits: everyone's stream is in the backlog
    node.deliver(user("hi", Kind.GROUP, "boys"))  # the boys' stream: passes
    node.deliver(user("same"))  # everyone's stream: behind c
    greg.read()
    await eventually(lambda: len(greg.texts()) == 5, WAIT)
    assert greg.texts() == ["a" * 2_300, "b" * 2_300, "hi", "c" * 2_300, "same"]


async def test_an_outbox_that_never_drains_is_closed_after_its_allowance(node: Node) -> None:
    """A client that holds the backlog up for its allowance is closed with 1013, and the
    event goes to everyone else; not before its allowance (the pace timeout and the grace)."""
    node.pacer.pace_timeout = 0.2
    stuck, fine = node.connect("greg"), node.connect("mike")
    node.deliver(user("x" * 5_900, Kind.DIRECT, "greg"))  # a user's: never paced
    loop = asyncio.get_running_loop()
    started = loop.time()
    node.deliver(api("y" * 100))
    await eventually(lambda: stuck.outbox.close_code is not None, WAIT)
    assert loop.time() - started >= GRACE + 0.2
    assert stuck.outbox.close_code == 1013 and stuck.outbox.queued_bytes == 0
    await eventually(lambda: fine.outbox.queued_bytes > 0, WAIT)
    assert fine.outbox.close_code is None


async def test_the_backlog_counts_a_users_waiting_over_all_their_sockets(node: Node) -> None:
    """A user who opens a fresh socket that never reads while the backlog waits on their
    last one gains nothing: once their first socket has spent their allowance, the fresh
    one is closed as soon as the backlog reaches it, not an allowance later."""
    node.pacer.pace_timeout = 1.0
    first, fine = node.connect("chuck"), node.connect("mike")
    node.deliver(user("x" * 5_900, Kind.DIRECT, "chuck"))
    node.deliver(api("y" * 100))  # waits on chuck's first socket
    second = node.connect("chuck", "late")  # a fresh one that never reads
    second.outbox.push(item(protocol.message(user("z" * 5_900), 0.0)))
    node.deliver(api("w" * 100, Kind.GROUP, "late"))  # behind y in the backlog
    await eventually(lambda: first.outbox.close_code is not None, WAIT)
    loop = asyncio.get_running_loop()
    closed = loop.time()
    await eventually(lambda: second.outbox.close_code is not None, WAIT)
    # Counted per socket, the second would hold the backlog up a whole allowance more.
    assert loop.time() - closed < node.pacer.pace_timeout
    assert first.outbox.close_code == 1013 and second.outbox.close_code == 1013
    await eventually(lambda: fine.outbox.queued_bytes > 0, WAIT)
    assert fine.outbox.close_code is None


async def test_past_the_backlog_bound_its_holders_are_closed_not_the_listener() -> None:
    """Past the backlog's bound the listener still never waits: the connection that holds
    the backlog up is closed with 1013 after the grace, however much allowance it had,
    and the others get every event, in order."""
    node = Node(pace_timeout=60.0, backlog_bytes=5_000)
    greg, mike = node.connect("greg"), node.connect("mike")
    mike.read()
    try:
        backend = [letter * 2_300 for letter in "abcde"]  # a, b in; c, d, e: 7 kB backlog
        for text in backend:
            node.deliver(api(text))
        await eventually(lambda: greg.outbox.close_code is not None, WAIT)
        assert greg.outbox.close_code == 1013
        await eventually(lambda: len(mike.texts()) == 5, WAIT)
        assert mike.texts() == backend
    finally:
        for reader in node.readers:
            await reader.close()


async def test_under_the_backlog_bound_a_reader_is_waited_for() -> None:
    """Under the bound, the same backlog waits for a client that reads late (within its
    allowance): it gets every event, in order."""
    node = Node(pace_timeout=60.0, backlog_bytes=50_000)
    greg, mike = node.connect("greg"), node.connect("mike")
    mike.read()
    try:
        backend = [letter * 2_300 for letter in "abcde"]
        for text in backend:
            node.deliver(api(text))
        await eventually(lambda: len(mike.texts()) >= 2, WAIT)
        await asyncio.sleep(2 * GRACE)
        greg.read()
        await eventually(lambda: len(greg.texts()) == 5 and len(mike.texts()) == 5, WAIT)
        assert greg.texts() == backend and mike.texts() == backend
        assert greg.outbox.close_code is None
    finally:
        for reader in node.readers:
            await reader.close()


async def test_a_drain_empties_the_backlog_without_pushing(node: Node) -> None:
    """Once the hub drains, the backlog goes out to nobody (every connection is closing)."""
    greg = node.connect("greg")
    node.deliver(user("x" * 5_900, Kind.DIRECT, "greg"))
    node.deliver(api("y" * 3_100))
    assert len(backlog_tasks()) == 1
    queued = greg.outbox.queued_bytes
    node.pacer.closed = True
    await eventually(lambda: not backlog_tasks(), WAIT)
    assert greg.outbox.queued_bytes == queued and greg.outbox.close_code is None


def backlog_tasks() -> list[asyncio.Task[object]]:
    return [task for task in asyncio.all_tasks() if task.get_name() == "wsfanout-pacer"]


async def test_closing_stops_the_backlogs_task(node: Node) -> None:
    """A backlog held up by a client that never reads has a task pacing it out; closing
    the pacer (the service closing) ends that task, and nothing more is pushed."""
    greg = node.connect("greg")
    node.deliver(user("x" * 5_900, Kind.DIRECT, "greg"))
    node.deliver(api("y" * 3_100))  # into the backlog
    assert len(backlog_tasks()) == 1
    queued = greg.outbox.queued_bytes
    await asyncio.wait_for(node.pacer.close(), WAIT)
    assert backlog_tasks() == []
    assert greg.outbox.queued_bytes == queued
