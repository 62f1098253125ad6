"""outbox: bounded queue, batching writer, overflow and close."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from wsfanout.outbox import Outbox, item
from wsfanout.types import Message


class Sink:
    def __init__(self) -> None:
        self.frames: list[Any] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, message: Message) -> None:
        await self.gate.wait()
        self.frames.append(orjson.loads(message["text"]))


def make(limit: int = 1000, batch_max: int = 4, on_overflow: Any = None) -> Outbox:
    return Outbox(
        user="u",
        groups=(),
        limit=limit,
        batch_max=batch_max,
        batch_bytes=10_000,
        on_overflow=on_overflow,
    )


def event(n: int) -> tuple[str, int]:
    return item(orjson.dumps({"n": n}).decode())


async def test_lone_events_go_alone_and_queued_ones_batch() -> None:
    """An event pushed to an idle writer goes as an object; a backlog goes as arrays."""
    outbox, sink = make(), Sink()
    writer = asyncio.create_task(outbox.run(sink))
    outbox.push(event(0))
    await asyncio.sleep(0.01)
    assert sink.frames == [{"n": 0}]
    sink.gate.clear()
    outbox.push(event(1))
    await asyncio.sleep(0.01)  # writer now blocked sending event 1
    for n in range(2, 8):
        outbox.push(event(n))
    sink.gate.set()
    outbox.close(1000)
    assert await asyncio.wait_for(writer, 1) == 1000
    assert sink.frames[1:] == [{"n": 1}, [{"n": n} for n in range(2, 6)], [{"n": 6}, {"n": 7}]]


async def test_batch_max_one_never_batches() -> None:
    """batch_max=1 sends one event per frame."""
    outbox, sink = make(batch_max=1), Sink()
    for n in range(3):
        outbox.push(event(n))
    outbox.close(1000)
    await outbox.run(sink)
    assert sink.frames == [{"n": 0}, {"n": 1}, {"n": 2}]


async def test_overflow_drops_everything_and_reports_once() -> None:
    """Passing the byte bound empties the outbox, sets 1013, and calls back once."""
    calls: list[int] = []
    outbox = make(limit=20, on_overflow=lambda: calls.append(1))
    assert outbox.push(event(1))
    assert outbox.push(event(2))
    assert outbox.queued_bytes == 14  # two 7-byte events
    assert not outbox.push(event(3))
    assert not outbox.push(event(4))
    assert outbox.close_code == 1013 and outbox.queued_bytes == 0 and calls == [1]


def test_size_counts_utf8_bytes() -> None:
    """Non-ASCII frames count their encoded size, not their characters."""
    assert item("é€")[1] == 5
    assert item("ab")[1] == 2


async def test_close_flushes_then_returns_code() -> None:
    """close() lets the writer send what is queued, then return the code; pushes stop."""
    outbox, sink = make(), Sink()
    outbox.push(event(1))
    outbox.close(1001)
    assert not outbox.push(event(2))
    assert await asyncio.wait_for(outbox.run(sink), 1) == 1001
    assert sink.frames == [{"n": 1}]
