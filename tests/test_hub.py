"""hub: the local index and publish(), the one door."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from wsfanout import hub as hub_module
from wsfanout import protocol
from wsfanout.hub import Hub, UnavailableError
from wsfanout.outbox import Flusher, Outbox
from wsfanout.protocol import Kind, Publish, Source
from wsfanout.types import Message


async def nowhere(message: object) -> None:
    raise AssertionError("nothing is sent in these tests")


def outbox(user: str, *groups: str, send: Any = nowhere) -> Outbox:
    return Outbox(
        user=user,
        groups=groups,
        send=send,
        flusher=Flusher(),
        limit=10_000,
        batch_max=8,
        batch_bytes=10_000,
    )


@pytest.fixture
def hub() -> tuple[Hub, dict[str, Outbox]]:
    h = Hub()
    boxes = {
        "greg": outbox("greg", "boys"),
        "mike1": outbox("mike", "boys", "chess"),
        "mike2": outbox("mike", "boys", "chess"),
        "mikey": outbox("mikey"),
        "amanda": outbox("amanda", "girls"),
    }
    for box in boxes.values():
        h.add(box)
    return h, boxes


def reached(boxes: dict[str, Outbox]) -> set[str]:
    return {name for name, box in boxes.items() if box.queued_bytes}


@pytest.mark.parametrize(
    ("kind", "target", "expected"),
    [
        (Kind.BROADCAST, "", {"greg", "mike1", "mike2", "mikey", "amanda"}),
        (Kind.GROUP, "boys", {"greg", "mike1", "mike2"}),
        (Kind.GROUP, "chess", {"mike1", "mike2"}),
        (Kind.GROUP, "nobody-here", set()),
        (Kind.DIRECT, "mike", {"mike1", "mike2"}),
        (Kind.DIRECT, "MIKE", {"mike1", "mike2"}),
        (Kind.DIRECT, "amanda", {"amanda"}),
    ],
)
def test_publish_reaches_exactly_the_recipients(
    hub: tuple[Hub, dict[str, Outbox]], kind: Kind, target: str, expected: set[str]
) -> None:
    """Each kind reaches exactly its recipients, and counts them."""
    h, boxes = hub
    assert h.publish(Publish(kind, "hi", target, sender="greg")) is None  # delivered now
    assert reached(boxes) == expected
    assert h.stats.deliveries == len(expected)
    assert h.stats.published == {(kind.value, "websocket"): 1}


async def test_encoded_once_for_everyone() -> None:
    """Every recipient's socket is handed the very same encoded object."""
    sent: list[Message] = []

    async def record(message: Message) -> None:
        sent.append(message)

    h = Hub()
    boxes = [outbox(f"u{n}", send=record) for n in range(5)]
    writers = [asyncio.create_task(box.run()) for box in boxes]
    for box in boxes:
        h.add(box)
    await asyncio.sleep(0)
    h.publish(Publish(Kind.BROADCAST, "hi", sender="greg"))
    await asyncio.sleep(0)
    assert len(sent) == 5 and len({id(message["text"]) for message in sent}) == 1
    for box in boxes:
        box.close(1000)
    await asyncio.gather(*writers)


def test_backend_messages_say_via(hub: tuple[Hub, dict[str, Outbox]]) -> None:
    """A message from the API carries "via": "api"; one from a websocket carries no via."""
    h, _ = hub
    sent: list[Message] = []

    async def record(message: Message) -> None:
        sent.append(message)

    box = outbox("lone", "solo", send=record)
    h.add(box)
    h.publish(Publish(Kind.GROUP, "from the api", "solo", sender="billing", source=Source.API))
    h.publish(Publish(Kind.GROUP, "from a user", "solo", sender="greg"))
    box.close(1000)
    asyncio.run(box.run())
    events = orjson.loads(sent[0]["text"])
    assert [(e["from"], e.get("via")) for e in events] == [("billing", "api"), ("greg", None)]


def test_remove_cleans_every_index(hub: tuple[Hub, dict[str, Outbox]]) -> None:
    """A removed outbox gets nothing, and is no longer found; remove is idempotent."""
    h, boxes = hub
    h.remove(boxes["amanda"])
    h.remove(boxes["amanda"])
    h.publish(Publish(Kind.GROUP, "hi", "girls", sender="greg"))
    h.publish(Publish(Kind.DIRECT, "hi", "amanda", sender="greg"))
    assert reached(boxes) == set()
    assert not h.has_group("girls") and h.local_username("amanda") is None
    assert len(h) == 4 and h.local_username("MIKE") == "mike"


async def test_drained_hub_refuses_and_closes_outboxes(hub: tuple[Hub, dict[str, Outbox]]) -> None:
    """drain marks every outbox closing, in batches, and refuses later publishes."""
    h, boxes = hub
    await h.drain(1001, batch=2, pause=0)
    assert all(box.close_code == 1001 for box in boxes.values())
    with pytest.raises(UnavailableError, match="shutting down"):
        h.publish(Publish(Kind.BROADCAST, "hi", sender="greg"))
    with pytest.raises(UnavailableError, match="shutting down"):
        h.make_room(1)


async def test_a_connection_that_joins_while_draining_is_closed_too(
    hub: tuple[Hub, dict[str, Outbox]],
) -> None:
    """A handshake that was under way when draining began still gets the drain's code."""
    h, _ = hub
    await h.drain(1001, batch=10, pause=0)
    late = outbox("lisa", "girls")
    h.add(late)
    assert late.close_code == 1001
    assert not late.push(("x", 1, {"type": "websocket.send", "text": "x"}))


def frame_of(size: int, via: Source = Source.API) -> str:
    """An encoded message of about ``size`` bytes, from a backend (``via``) or a user."""
    publish = Publish(Kind.BROADCAST, "x" * (size - 100), "", sender="ops", source=via)
    return protocol.message(publish, 0.0)


def test_backend_messages_are_told_apart_by_their_via() -> None:
    assert protocol.from_backend(frame_of(200, Source.API))
    assert protocol.from_backend(frame_of(200, Source.AMQP))
    assert not protocol.from_backend(frame_of(200, Source.WEBSOCKET))
    tricky = Publish(Kind.BROADCAST, '","via":"api', "", sender="greg")
    assert not protocol.from_backend(protocol.message(tricky, 0.0))


async def test_a_backend_message_from_redis_waits_in_the_backlog_for_room() -> None:
    """What Redis hands this node from a backend is paced: into an outbox past half its
    bound, it waits in the backlog (the listener goes on) until the outbox is down to a
    quarter, then goes in; later backend messages keep their place behind it."""
    h = Hub(pace_timeout=5)
    box = outbox("greg")
    h.add(box)
    for _ in range(2):
        assert h._deliver(Kind.BROADCAST, "", frame_of(2_400)) is None  # 4,800 of 10,000
    assert h._deliver(Kind.BROADCAST, "", frame_of(2_400)) is None  # to the backlog
    assert h._deliver(Kind.BROADCAST, "", frame_of(200)) is None  # would fit: behind it
    await asyncio.sleep(0.05)
    assert box.queued_bytes < 5_000 and h.stats.paced == 1  # waits; pushed nothing yet
    box._take()  # the client reads: down to a quarter of the bound
    assert h._pacer is not None
    await asyncio.wait_for(h._pacer, 1)
    assert box.close_code is None
    assert [len(f[0]) for f in box._frames] == [len(frame_of(2_400)), len(frame_of(200))]


async def test_a_users_message_from_redis_passes_the_backlog_of_other_streams() -> None:
    """A user's message passes the backlog at once (it is not paced), unless its own stream
    waits there: then it keeps its place, so the stream goes out in offset order."""
    h = Hub(pace_timeout=5)
    box = outbox("greg", "boys")
    h.add(box)
    for _ in range(3):
        h._deliver(Kind.BROADCAST, "", frame_of(2_400))
    group = protocol.message(Publish(Kind.GROUP, "hi", "boys", sender="mike"), 0.0, 7)
    assert h._deliver(Kind.GROUP, "boys", group) is None
    assert box._frames[-1][0] == group and len(h._backlog) == 1
    same_stream = frame_of(300, Source.WEBSOCKET)
    assert h._deliver(Kind.BROADCAST, "", same_stream) is None
    assert box._frames[-1][0] == group and len(h._backlog) == 2
    box._take()
    assert h._pacer is not None
    await asyncio.wait_for(h._pacer, 1)
    assert [f[0] for f in box._frames][-2:] == [frame_of(2_400), same_stream]


async def test_an_outbox_that_never_drains_is_closed_after_the_pace_timeout() -> None:
    """A client that holds the backlog up for pace_timeout is closed with 1013 (once), and
    the event goes to everyone else."""
    h = Hub(pace_timeout=0.2)
    stuck, fine = outbox("greg"), outbox("mike")
    h.add(stuck)
    h.add(fine)
    stuck.push((frame_of(6_000), 6_000, {}))
    started = asyncio.get_running_loop().time()
    assert h._deliver(Kind.BROADCAST, "", frame_of(200)) is None
    assert h._pacer is not None
    await h._pacer
    assert 0.2 <= asyncio.get_running_loop().time() - started < 1
    assert stuck.close_code == 1013 and stuck.queued_bytes == 0
    assert fine.queued_bytes > 0 and fine.close_code is None


async def test_past_the_backlog_bound_the_listener_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past BACKLOG_BYTES, _deliver hands the listener something to await: Redis holds the
    rest until the backlog drains."""
    monkeypatch.setattr(hub_module, "BACKLOG_BYTES", 5_000)
    h = Hub(pace_timeout=5)
    box = outbox("greg")
    h.add(box)
    for _ in range(2):
        h._deliver(Kind.BROADCAST, "", frame_of(2_400))
    for _ in range(2):
        assert h._deliver(Kind.BROADCAST, "", frame_of(2_400)) is None  # backlog 4,800
    waiting = h._deliver(Kind.BROADCAST, "", frame_of(2_400))
    assert waiting is not None
    task = asyncio.ensure_future(waiting)
    await asyncio.sleep(0.05)
    assert not task.done()
    while h._backlog:
        box._take()
        await asyncio.sleep(0.01)
    await asyncio.wait_for(task, 1)


async def test_a_paced_publish_keeps_room_for_users_messages() -> None:
    """publish_paced fills an outbox to half its bound at most; an unpaced publish (a
    user's) still fits in the other half."""
    h = Hub(pace_timeout=0.2)
    box = outbox("greg")
    h.add(box)
    publish = Publish(Kind.BROADCAST, "y" * 2_000, "", source=Source.API)
    for _ in range(2):
        await h.publish_paced(publish)
    assert box.queued_bytes < 5_000
    paced = asyncio.create_task(h.publish_paced(publish))
    await asyncio.sleep(0.05)
    assert not paced.done()
    assert h.publish(Publish(Kind.BROADCAST, "z" * 4_000, "", sender="mike")) is None
    assert box.close_code is None  # the user's message fitted
    await paced  # nobody reads: closed after the pace timeout
    assert box.close_code == 1013


async def test_the_pace_timeout_is_per_user_not_per_socket() -> None:
    """A user who opens a fresh socket that never reads while the backlog waits on their
    last one gains nothing: their waiting adds up over all their sockets, and each of
    their full sockets is closed once the user's total reaches pace_timeout."""
    h = Hub(pace_timeout=1.0)
    first, fine = outbox("chuck"), outbox("mike")
    h.add(first)
    h.add(fine)
    first.push((frame_of(6_000), 6_000, {}))
    h._deliver(Kind.BROADCAST, "", frame_of(200))
    await asyncio.sleep(0.6)  # chuck's first socket has held the backlog up for 0.6 s
    second = outbox("chuck")  # a fresh one that will never read either
    h.add(second)
    second.push((frame_of(6_000), 6_000, {}))
    h._deliver(Kind.BROADCAST, "", frame_of(200))
    await asyncio.sleep(0.7)
    # Chuck's 1 s is spent (at 1.0 s): both closed. Counted per socket, the second
    # would hold the backlog up until 1.6 s.
    assert first.close_code == 1013 and second.close_code == 1013
    assert h._pacer is not None
    await asyncio.wait_for(h._pacer, 1)
    assert fine.close_code is None and fine.queued_bytes > 0
