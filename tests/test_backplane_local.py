"""backplane/local.py: the local engine (one node), through the hub's doors."""

from __future__ import annotations

import asyncio

import pytest

from tests.outboxes import Reader, outbox
from wsfanout.backplane import LocalBackplane
from wsfanout.history import History
from wsfanout.hub import Hub
from wsfanout.protocol import Kind, Position, Publish


def broadcast(text: str) -> Publish:
    return Publish(Kind.BROADCAST, text, sender="greg")


async def test_a_join_is_one_step_of_the_event_loop() -> None:
    """With history in memory, join() adds the connection and reads its positions without
    yielding to the loop: a publisher running every step gets nothing in between, so the
    replay and the live messages meet with no gap and no duplicate."""
    h = Hub(LocalBackplane(History(1000, 60)))
    loop = asyncio.get_running_loop()
    ticks = 0
    reached = {50: asyncio.Event(), 200: asyncio.Event()}

    def tick() -> None:
        nonlocal ticks
        ticks += 1
        h.publish(broadcast(str(ticks)))
        if ticks in reached:
            reached[ticks].set()
        if ticks < 200:
            loop.call_soon(tick)

    first = await h.join(outbox("mike"), ["all"], {})
    assert first.positions is not None
    epoch = first.positions["all"].epoch
    loop.call_soon(tick)
    await reached[50].wait()
    amanda = Reader("amanda")
    amanda.read()
    before = ticks
    joined = await h.join(amanda.outbox, ["all"], {"all": Position(epoch, 10)})
    assert ticks == before  # no other callback ran during the join
    assert joined.positions == {"all": Position(epoch, before)} and joined.lost == []
    assert [f'"text":"{n}"' in frame for n, frame in enumerate(joined.replay, 11)] == [True] * (
        before - 10
    )
    await reached[200].wait()
    await amanda.close()
    assert [event["offset"] for event in amanda.events] == list(range(before + 1, 201))


async def test_a_resume_too_old_or_of_another_epoch_is_lost() -> None:
    """A resume past what the history keeps, or of an epoch this node never gave, is lost
    (the client refetches); a stream it did not ask about is neither."""
    h = Hub(LocalBackplane(History(3, 60)))
    h.add(outbox("mike"))
    for n in range(5):
        h.publish(broadcast(str(n)))
    streams = ["all", "user:greg"]
    joined = await h.join(outbox("greg"), streams, {"all": Position("nope", 4)})
    assert joined.lost == ["all"] and joined.replay == []
    assert joined.positions is not None
    epoch = joined.positions["all"].epoch
    joined = await h.join(outbox("greg"), streams, {"all": Position(epoch, 1)})
    assert joined.lost == ["all"]  # only 3 kept: 3, 4, 5
    joined = await h.join(outbox("greg"), streams, {"all": Position(epoch, 2)})
    assert joined.lost == [] and len(joined.replay) == 3


async def test_without_history_a_join_has_no_positions() -> None:
    """History off: no positions, and every stream asked for is lost."""
    h = Hub(LocalBackplane())
    joined = await h.join(outbox("greg"), ["all", "user:greg"], {"all": Position("e", 1)})
    assert (joined.positions, joined.replay, joined.lost) == (None, [], ["all"])


async def test_first_and_last_connections_are_announced_once() -> None:
    """A user's first connection tells the groups in ``announce`` they are online (the
    user's own connection too), their last one that they are offline; other tabs nothing.
    A group they left hears nothing more of them."""
    h = Hub(LocalBackplane())
    amanda = Reader("amanda", "girls", "chess")
    h.add(amanda.outbox)
    tabs = [outbox("lisa", "girls", "chess") for _ in range(2)]
    for tab in tabs:
        h.add(tab, announce=("girls", "chess"))
    assert tabs[0].queued_bytes > 0 and tabs[1].queued_bytes == 0
    h.regroup("lisa", "chess", False)
    h.remove(tabs[0])
    h.remove(tabs[1])
    await amanda.close()
    assert [(e["type"], e.get("group")) for e in amanda.events] == [
        ("online", "girls"),
        ("online", "chess"),
        ("offline", "girls"),
    ]


async def test_there_is_always_room_and_no_one_else_to_tell() -> None:
    """The local engine takes every batch, tells no other node, and has nothing of its
    own for /healthz."""
    engine = LocalBackplane()
    h = Hub(engine)
    h.make_room(1_000_000)
    await engine.control({"type": "revoke", "user": "greg"})
    assert await engine.health() == {}
    assert engine.healthy
    await engine.close()


def test_an_engine_used_before_a_hub_has_it_says_so() -> None:
    """An engine is bound to its hub when the hub is made: used before, it fails loudly."""
    with pytest.raises(RuntimeError, match="not bound"):
        LocalBackplane().publish(Kind.BROADCAST, "", "{", "}")
