"""hub: the local index and publish()."""

from __future__ import annotations

import pytest

from wsfanout.hub import Hub, HubClosedError
from wsfanout.outbox import Flusher, Outbox
from wsfanout.protocol import Kind


async def nowhere(message: object) -> None:
    raise AssertionError("nothing is sent in these tests")


def outbox(user: str, *groups: str) -> Outbox:
    return Outbox(
        user=user,
        groups=groups,
        send=nowhere,
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
        "mike1": outbox("Mike", "boys", "chess"),
        "mike2": outbox("mike", "boys", "chess"),
        "mikey": outbox("mikey"),
        "amanda": outbox("amanda", "girls"),
    }
    for box in boxes.values():
        h.add(box)
    return h, boxes


def received(box: Outbox) -> int:
    return len(box._frames)


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
    assert h.publish(kind, "greg", "hi", target=target) == len(expected)
    assert {name for name, box in boxes.items() if received(box)} == expected
    assert h.stats.deliveries == len(expected)


def test_encoded_once_for_everyone(hub: tuple[Hub, dict[str, Outbox]]) -> None:
    """Every recipient gets the very same encoded object."""
    h, boxes = hub
    h.publish(Kind.BROADCAST, "greg", "hi")
    frames = {id(box._frames[0]) for box in boxes.values()}
    assert len(frames) == 1


def test_remove_cleans_every_index(hub: tuple[Hub, dict[str, Outbox]]) -> None:
    """A removed outbox gets nothing, and empty index entries disappear; remove is idempotent."""
    h, boxes = hub
    h.remove(boxes["amanda"])
    h.remove(boxes["amanda"])
    assert "girls" not in h._groups and "amanda" not in h._users
    assert h.publish(Kind.GROUP, "greg", "hi", target="girls") == 0
    assert len(h) == 4 and h.connected("mike") == 2


async def test_drained_hub_refuses_and_closes_outboxes(hub: tuple[Hub, dict[str, Outbox]]) -> None:
    """drain marks every outbox closing, in batches, and refuses later publishes."""
    h, boxes = hub
    await h.drain(1001, batch=2, pause=0)
    assert all(box.close_code == 1001 for box in boxes.values())
    with pytest.raises(HubClosedError):
        h.publish(Kind.BROADCAST, "greg", "hi")
