"""outbox: bounded queue, flusher fast path, writer slow path, batching, overflow, close."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from wsfanout import protocol
from wsfanout.flusher import SETTLE_TURNS, Flusher
from wsfanout.outbox import Outbox, State, item
from wsfanout.protocol import Kind, Publish
from wsfanout.types import Message


class Sink:
    """A send() that records frames, and which task sent each (the flusher or the writer);
    clear ``gate`` to make it block like a full socket."""

    def __init__(self) -> None:
        self.frames: list[Any] = []
        self.senders: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.cancelled = False
        self.fail: Exception | None = None

    async def __call__(self, message: Message) -> None:
        task = asyncio.current_task()
        self.senders.append(task.get_name() if task is not None else "")
        if self.fail is not None:
            raise self.fail
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        self.frames.append(orjson.loads(message["text"]))


def make(
    sink: Sink,
    limit: int = 1000,
    batch_max: int = 4,
    on_overflow: Any = None,
    flusher: Flusher | None = None,
) -> Outbox:
    return Outbox(
        user="u",
        groups=(),
        send=sink,
        flusher=flusher or Flusher(),
        limit=limit,
        batch_max=batch_max,
        batch_bytes=10_000,
        on_overflow=on_overflow,
    )


def event(n: int) -> tuple[str, int, Message]:
    return item(orjson.dumps({"n": n}).decode())


FLUSHER = "wsfanout-flusher"
WRITER = "writer"


async def started(outbox: Outbox) -> asyncio.Task[int]:
    """The writer task, once it has run up to waiting for events."""
    writer = asyncio.create_task(outbox.run(), name=WRITER)
    await asyncio.sleep(0)
    return writer


async def test_an_idle_writer_is_not_woken_for_a_lone_event() -> None:
    """A lone event goes out as an object, sent by the flusher, not by the writer's task."""
    sink = Sink()
    outbox = make(sink)
    writer = await started(outbox)
    outbox.push(event(0))
    await asyncio.sleep(0)
    assert sink.frames == [{"n": 0}]
    assert sink.senders == [FLUSHER]
    outbox.close(1000)
    assert await asyncio.wait_for(writer, 1) == 1000


async def test_back_to_back_events_leave_as_batches() -> None:
    """Events pushed before the publisher yields are sent as arrays of up to batch_max."""
    sink = Sink()
    outbox = make(sink)
    writer = await started(outbox)
    for n in range(7):
        outbox.push(event(n))
    await asyncio.sleep(0)
    assert sink.frames == [[{"n": n} for n in range(4)], [{"n": n} for n in range(4, 7)]]
    outbox.close(1000)
    await writer


async def test_blocked_send_is_finished_by_the_writer_in_order() -> None:
    """A send that would block is handed to the writer; later events follow in order."""
    sink = Sink()
    outbox = make(sink, batch_max=1)
    writer = await started(outbox)
    sink.gate.clear()
    outbox.push(event(0))
    await asyncio.sleep(0)
    for n in range(1, 4):
        outbox.push(event(n))
    await asyncio.sleep(0.01)
    assert sink.frames == []
    sink.gate.set()
    await asyncio.sleep(0.01)
    assert sink.frames == [{"n": n} for n in range(4)]
    # The flusher started the blocked send; the writer finished it and sent the rest.
    assert sink.senders == [FLUSHER, WRITER, WRITER, WRITER]
    outbox.push(event(4))
    await asyncio.sleep(0)
    assert sink.frames[-1] == {"n": 4}
    assert sink.senders[-1] == FLUSHER  # back to the fast path
    outbox.close(1000)
    await writer


async def test_cancelling_a_blocked_writer_cancels_its_send() -> None:
    """Cancelling the writer while it finishes a blocked send cancels that send too."""
    sink = Sink()
    outbox = make(sink)
    writer = await started(outbox)
    sink.gate.clear()
    outbox.push(event(0))
    await asyncio.sleep(0.01)
    writer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writer
    assert sink.cancelled


async def test_send_errors_reach_the_writer() -> None:
    """An exception from send() in the fast path ends the writer with that exception."""
    sink = Sink()
    outbox = make(sink)
    writer = await started(outbox)
    sink.fail = RuntimeError("boom")
    outbox.push(event(0))
    with pytest.raises(RuntimeError, match="boom"):
        await asyncio.wait_for(writer, 1)


async def test_batch_max_one_never_batches() -> None:
    """batch_max=1 sends one event per frame."""
    sink = Sink()
    outbox = make(sink, batch_max=1)
    for n in range(3):
        outbox.push(event(n))
    outbox.close(1000)
    await outbox.run()
    assert sink.frames == [{"n": 0}, {"n": 1}, {"n": 2}]


async def test_overflow_drops_everything_and_reports_once() -> None:
    """Passing the byte bound empties the outbox, sets 1013, and calls back once."""
    calls: list[int] = []
    outbox = make(Sink(), limit=20, on_overflow=lambda: calls.append(1))
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
    sink = Sink()
    outbox = make(sink)
    outbox.push(event(1))
    outbox.close(1001)
    assert not outbox.push(event(2))
    assert await asyncio.wait_for(outbox.run(), 1) == 1001
    assert sink.frames == [{"n": 1}]


async def test_a_close_by_a_deadline_ends_a_send_blocked_now() -> None:
    """close(code, by): a send blocked with no timeout of its own gives up at ``by`` (1013,
    and what is queued is dropped), as a writer stuck on a client that does not read must
    when the server stops."""
    sink = Sink()
    outbox = make(sink, batch_max=1)
    writer = await started(outbox)
    sink.gate.clear()
    for n in range(3):
        outbox.push(event(n))
    await asyncio.sleep(0.01)  # the writer is in the first send, which blocks
    outbox.close(1001, by=asyncio.get_running_loop().time() + 0.05)
    assert await asyncio.wait_for(writer, 5) == protocol.CloseCode.TRY_AGAIN_LATER
    assert sink.cancelled and sink.frames == [] and outbox.queued_bytes == 0
    assert outbox.reason is not None and "server stopped" in outbox.reason


async def test_a_close_by_a_deadline_flushes_a_client_that_reads() -> None:
    """close(code, by) for a client that reads: what is queued goes out, then the code."""
    sink = Sink()
    outbox = make(sink, batch_max=1)
    for n in range(3):
        outbox.push(event(n))
    outbox.close(1001, by=asyncio.get_running_loop().time() + 5)
    assert await asyncio.wait_for(outbox.run(), 1) == 1001
    assert sink.frames == [{"n": n} for n in range(3)]


async def test_stats_count_frames_and_batches() -> None:
    """The flusher's stats count frames, events and batch sizes."""
    sink = Sink()
    flusher = Flusher()
    outbox = make(sink, flusher=flusher)
    writer = await started(outbox)
    for n in range(5):
        outbox.push(event(n))
    await asyncio.sleep(0)
    stats = flusher.stats
    assert (stats.frames, stats.events) == (2, 5)
    assert stats.batch_sizes[0] == 1 and stats.batch_sizes[2] == 1  # one of 1, one of 4
    outbox.close(1000)
    await writer


@pytest.mark.parametrize(
    ("steps", "state", "code"),
    [
        ([], State.OPEN, None),
        (["close 1000"], State.CLOSING, 1000),
        (["close 1000", "close 1011"], State.CLOSING, 1000),  # the first reason stands
        (["overflow"], State.CLOSED, 1013),
        (["overflow", "close 1000"], State.CLOSED, 1013),
        (["close 1001", "run"], State.CLOSED, 1001),
        (["overflow", "run"], State.CLOSED, 1013),
    ],
)
async def test_states(steps: list[str], state: State, code: int | None) -> None:
    """open -> closing -> closed, or straight to closed on overflow; pushes stop once not open."""
    outbox = make(Sink(), limit=20)
    for step in steps:
        if step == "overflow":
            outbox.push(event(1))
            outbox.push(event(2))
            outbox.push(event(3))
        elif step == "run":
            assert await asyncio.wait_for(outbox.run(), 1) == code
        else:
            outbox.close(int(step.split()[1]))
    assert (outbox.state, outbox.close_code) == (state, code)
    assert outbox.push(event(9)) is (state is State.OPEN)


async def test_a_floor_drops_what_a_joining_clients_reply_covers() -> None:
    """After floor(), messages of a stream at or below its offset are dropped, queued or
    still to come; the first one above lifts that stream's floor; others pass."""
    sink = Sink()
    outbox = make(sink, batch_max=1)

    def message(stream: str, offset: int) -> Any:
        kind, _, target = stream.partition(":")
        publish = Publish(Kind.GROUP if kind == "group" else Kind.BROADCAST, "x", target)
        return item(protocol.message(publish, 0.0, offset))

    outbox.push(message("all", 4))
    outbox.push(message("all", 5))
    outbox.push(item(protocol.ack("a1")))
    outbox.floor({"all": 5, "group:boys": 2})
    for entry in (message("all", 5), message("group:boys", 1), message("all", 6)):
        outbox.push(entry)
    outbox.push(message("all", 3))  # cannot happen (streams come in order): floor is gone
    outbox.push(message("group:boys", 3))
    assert outbox.floors is None
    outbox.close(1000)
    assert await outbox.run() == 1000
    assert [(e.get("stream"), e.get("offset")) for e in sink.frames] == [
        (None, None),
        ("all", 6),
        ("all", 3),
        ("group:boys", 3),
    ]


class Direct:
    """A server connection that writes now (outbox.DirectWriter), recording each message;
    ``open`` False makes it decline, as a full transport does."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.open = True

    def write_now(self, message: Message) -> bool:
        if self.open:
            self.messages.append(message)
        return self.open


async def test_recipients_of_the_same_events_share_one_batch_message() -> None:
    """Outboxes holding the same events are sent the same message object, so its text (and
    the server's frame) is built once; another outbox's different events get their own."""
    flusher = Flusher()
    sinks = [Sink() for _ in range(4)]
    outboxes = [make(sink, flusher=flusher) for sink in sinks]
    directs = [Direct() for _ in outboxes]
    for outbox, direct in zip(outboxes, directs, strict=True):
        outbox.direct = direct
    writers = [await started(outbox) for outbox in outboxes]
    shared = [event(n) for n in range(3)]
    for outbox in outboxes[:3]:
        for entry in shared:
            outbox.push(entry)
    for entry in [shared[0], event(9), shared[2]]:  # same first and last, not the same events
        outboxes[3].push(entry)
    for _ in range(SETTLE_TURNS + 1):  # a burst: the flusher waits while it may grow
        await asyncio.sleep(0)
    sent = [direct.messages for direct in directs]
    assert all(len(messages) == 1 for messages in sent), sent
    assert sent[0][0] is sent[1][0] is sent[2][0]
    assert orjson.loads(sent[0][0]["text"]) == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert orjson.loads(sent[3][0]["text"]) == [{"n": 0}, {"n": 9}, {"n": 2}]
    assert all(not sink.frames for sink in sinks)  # nothing went through send()
    for outbox, writer in zip(outboxes, writers, strict=True):
        outbox.close(1000)
        await writer


async def test_a_burst_still_arriving_leaves_in_one_frame() -> None:
    """Events published before the flusher could run, and more on the next turns of the loop
    (a publisher's reader handed a few frames at a time): the flush waits until they stop
    coming, and they leave as one batch; a lone event is sent on the flusher's first turn."""
    outbox = make(Sink(), batch_max=64)
    direct = Direct()
    outbox.direct = direct
    writer = await started(outbox)
    outbox.push(event(0))
    await asyncio.sleep(0)
    assert len(direct.messages) == 1  # alone: no wait
    outbox.push(event(1))
    outbox.push(event(2))
    for n in range(3, 6):  # one more each turn, as a reader handed a few frames at a time
        await asyncio.sleep(0)
        outbox.push(event(n))
    for _ in range(SETTLE_TURNS + 1):
        await asyncio.sleep(0)
    assert len(direct.messages) == 2, direct.messages
    assert orjson.loads(direct.messages[1]["text"]) == [{"n": n} for n in range(1, 6)]
    outbox.close(1000)
    await writer


async def test_a_burst_that_fills_a_frame_leaves_without_waiting() -> None:
    """A burst already holding a full frame's bytes (few events, each large) is flushed on
    the flusher's first turn: waiting could not make its frames fuller."""
    outbox = make(Sink(), limit=100_000, batch_max=64)
    direct = Direct()
    outbox.direct = direct
    writer = await started(outbox)
    big = [item(orjson.dumps({"n": n, "pad": "x" * 4000}).decode()) for n in range(3)]
    for entry in big:  # 12 KB: over batch_bytes (10,000)
        outbox.push(entry)
    await asyncio.sleep(0)
    assert len(direct.messages) == 2, direct.messages  # two events, then the third
    outbox.push(event(9))  # arrives after: its own frame
    for _ in range(SETTLE_TURNS + 1):
        await asyncio.sleep(0)
    assert [
        len(orjson.loads(m["text"])) if m["text"].startswith("[") else 1 for m in direct.messages
    ] == [2, 1, 1]
    outbox.close(1000)
    await writer


async def test_a_declined_direct_write_goes_through_send() -> None:
    """When the server's connection cannot write now (its buffer is full, say), the frame
    goes through send() as before, in order."""
    sink = Sink()
    outbox = make(sink)
    direct = Direct()
    outbox.direct = direct
    writer = await started(outbox)
    outbox.push(event(0))
    await asyncio.sleep(0)
    direct.open = False
    outbox.push(event(1))
    await asyncio.sleep(0)
    assert [orjson.loads(m["text"]) for m in direct.messages] == [{"n": 0}]
    assert sink.frames == [{"n": 1}]
    outbox.close(1000)
    assert await asyncio.wait_for(writer, 1) == 1000


class LazyWriter:
    """``Outbox.lazy``'s ``start_writer``: starts the writer's task, and counts the starts."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.task: asyncio.Task[int] | None = None
        self.starts = 0

    def __call__(self) -> asyncio.Task[int]:
        self.starts += 1
        if self.task is None:
            self.task = asyncio.create_task(self.outbox.run(), name=WRITER)
        return self.task


async def test_a_lazy_writer_starts_only_when_a_send_blocks() -> None:
    """Sends that complete leave the writer unstarted; the first that blocks starts it, and
    it finishes that send and what was queued behind it, in order."""
    sink = Sink()
    outbox = make(sink, batch_max=1)
    writer = LazyWriter(outbox)
    outbox.lazy(writer)
    for n in range(3):
        outbox.push(event(n))
        await asyncio.sleep(0)
    assert writer.starts == 0 and sink.senders == [FLUSHER] * 3
    sink.gate.clear()  # the socket is full: the next send blocks
    outbox.push(event(3))
    outbox.push(event(4))
    await asyncio.sleep(0.01)
    assert writer.starts == 1
    sink.gate.set()
    await asyncio.sleep(0.01)
    assert [frame["n"] for frame in sink.frames] == [0, 1, 2, 3, 4]
    assert sink.senders[-1] == WRITER
    outbox.close(1000)
    assert writer.task is not None and await writer.task == 1000


async def test_a_lazy_writer_starts_to_close_not_to_send_what_was_queued_before() -> None:
    """Closing an outbox whose writer never started starts it (it returns the code); events
    queued before the outbox was made lazy go out with the flusher, no writer started."""
    sink = Sink()
    outbox = make(sink)
    writer = LazyWriter(outbox)
    outbox.lazy(writer)
    outbox.close(1001)
    assert writer.starts == 1 and writer.task is not None and await writer.task == 1001
    queued = make(sink)
    queued.push(event(7))
    early = LazyWriter(queued)
    queued.lazy(early)
    await asyncio.sleep(0.01)
    assert sink.frames[-1] == {"n": 7} and sink.senders[-1] == FLUSHER
    assert early.starts == 0
    queued.close(1000)
    assert early.task is not None and await early.task == 1000


class CancelledAtOnce(LazyWriter):
    """A writer whose connection ends in the turn it is started: cancelled before it runs."""

    def __call__(self) -> asyncio.Task[int]:
        task = super().__call__()
        task.cancel()
        return task


async def test_a_send_whose_lazy_writer_was_cancelled_before_it_ran_is_ended() -> None:
    """The flusher's send blocks, and the writer started to finish it is cancelled before it
    runs: ``drop_inflight`` ends that send, which releases what it held (as hypercorn's send
    holds its stream's lock)."""
    sink = Sink()
    lock = asyncio.Lock()

    async def send(message: Message) -> None:
        async with lock:
            await sink(message)

    outbox = make(sink)
    outbox._send = send
    writer = CancelledAtOnce(outbox)
    outbox.lazy(writer)
    sink.gate.clear()
    outbox.push(event(1))
    for _ in range(5):  # the flusher runs, its send blocks, the writer is started
        await asyncio.sleep(0)
    assert writer.task is not None and writer.task.cancelled()
    assert lock.locked()  # run() never started: nothing ended the flusher's send
    outbox.drop_inflight()
    assert not lock.locked()
