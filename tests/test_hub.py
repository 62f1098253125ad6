"""hub: the local index and publish(), the one door."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

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


def frame_of(size: int) -> str:
    return orjson.dumps({"type": "message", "text": "x" * (size - 30)}).decode()


async def test_delivery_from_the_backplane_waits_for_room_then_pushes() -> None:
    """What Redis hands this node is paced: into an outbox past half its bound, the next
    event waits until the outbox is down to a quarter, then goes in (nothing dropped)."""
    h = Hub(pace_timeout=5)
    box = outbox("greg")
    h.add(box)
    for _ in range(2):
        assert h._deliver(Kind.BROADCAST, "", frame_of(2_400)) is None  # 4,800 of 10,000
    waiting = h._deliver(Kind.BROADCAST, "", frame_of(2_400))
    assert waiting is not None and h.stats.paced == 1
    task = asyncio.create_task(waiting)
    await asyncio.sleep(0.05)
    assert not task.done() and box.queued_bytes < 5_000  # waits; pushed nothing yet
    box._take()  # the client reads: down to a quarter of the bound
    await asyncio.wait_for(task, 1)
    assert box.close_code is None and len(box._frames) == 1


async def test_an_outbox_that_never_drains_is_closed_after_the_pace_timeout() -> None:
    """A client that does not read within pace_timeout is closed with 1013 (once), and the
    event goes to everyone else."""
    h = Hub(pace_timeout=0.2)
    stuck, fine = outbox("greg"), outbox("mike")
    h.add(stuck)
    h.add(fine)
    stuck.push((frame_of(6_000), 6_000, {}))
    waiting = h._deliver(Kind.BROADCAST, "", frame_of(100))
    assert waiting is not None
    started = asyncio.get_running_loop().time()
    await waiting
    assert 0.2 <= asyncio.get_running_loop().time() - started < 1
    assert stuck.close_code == 1013 and stuck.queued_bytes == 0
    assert fine.queued_bytes > 0 and fine.close_code is None


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
