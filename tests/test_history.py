"""history: offsets, epochs and the bounded in-memory history of one node."""

from __future__ import annotations

import sys

import orjson

from wsfanout import protocol
from wsfanout.history import ENTRY_BYTES, History
from wsfanout.protocol import Kind, Position, Publish


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def append(history: History, stream: str, text: str) -> str:
    kind, _, target = stream.partition(":")
    publish = Publish(
        {"all": Kind.BROADCAST, "group": Kind.GROUP, "user": Kind.DIRECT}[kind],
        text,
        target,
        sender="greg",
    )
    return history.append(stream, *protocol.message_parts(publish, 1.0))


def texts(frames: list[str] | None) -> list[str] | None:
    return None if frames is None else [orjson.loads(frame)["text"] for frame in frames]


def test_offsets_count_up_per_stream_and_the_message_says_where_it_is() -> None:
    """Each stream counts from 1 on its own; the text carries its stream and offset."""
    history = History(10, 60)
    first = orjson.loads(append(history, "all", "a"))
    append(history, "group:boys", "b")
    second = orjson.loads(append(history, "all", "c"))
    assert (first["stream"], first["offset"], second["offset"]) == ("all", 1, 2)
    assert history.position("group:boys").offset == 1
    assert history.position("user:mike") == Position(history.position("user:mike").epoch, 0)


def test_since_replays_after_an_offset_in_order() -> None:
    """since() gives every message after the client's offset; none when it is current."""
    history = History(10, 60)
    for text in "abcde":
        append(history, "all", text)
    epoch = history.position("all").epoch
    assert texts(history.since("all", Position(epoch, 2))) == ["c", "d", "e"]
    assert history.since("all", Position(epoch, 5)) == []
    assert texts(history.since("all", Position(epoch, 0))) == list("abcde")


def test_another_epoch_or_a_future_offset_is_not_recoverable() -> None:
    history = History(10, 60)
    append(history, "all", "a")
    epoch = history.position("all").epoch
    assert history.since("all", Position(epoch + "x", 1)) is None
    assert history.since("all", Position(epoch, 2)) is None
    assert history.since("group:unknown", Position(epoch, 0)) is None


def test_a_history_shorter_than_the_gap_is_not_recoverable() -> None:
    """Only the last ``size`` messages are kept: a gap reaching past them is lost."""
    history = History(3, 60)
    for text in "abcde":
        append(history, "all", text)
    epoch = history.position("all").epoch
    assert history.since("all", Position(epoch, 1)) is None
    assert texts(history.since("all", Position(epoch, 2))) == ["c", "d", "e"]


def test_messages_older_than_the_ttl_are_not_replayed() -> None:
    clock = Clock()
    history = History(10, 60, clock=clock)
    append(history, "all", "old")
    clock.now += 61
    append(history, "all", "new")
    epoch = history.position("all").epoch
    assert history.since("all", Position(epoch, 0)) is None
    assert texts(history.since("all", Position(epoch, 1))) == ["new"]


def test_memory_is_bounded_over_all_streams() -> None:
    """Past max_bytes, the least recently published streams lose their oldest messages;
    past max_streams, the least recently used stream is forgotten (a new epoch)."""
    each = sys.getsizeof(append(History(1, 1), "all", "x" * 100)) + ENTRY_BYTES + 1  # 2 digits
    history = History(100, 60, max_bytes=10 * each, max_streams=3)
    for _ in range(5):
        append(history, "group:quiet", "q" * 100)
    quiet_epoch = history.position("group:quiet").epoch
    for _ in range(50):
        append(history, "all", "x" * 100)
    assert history.bytes <= 10 * each
    assert history.since("group:quiet", Position(quiet_epoch, 0)) is None
    assert len(history.since("all", Position(history.position("all").epoch, 40)) or []) == 10
    history.position("user:a")
    history.position("user:b")  # a fourth stream: the least recently used goes
    assert len(history) == 3
    assert history.position("group:quiet").epoch != quiet_epoch


def test_memory_is_counted_as_python_holds_it() -> None:
    """A text with one emoji is held at 4 bytes a character: it counts so."""
    history = History(10, 60)
    append(history, "all", "x" * 1000)
    ascii_bytes = history.bytes
    append(history, "group:boys", "x" * 999 + "\N{GRINNING FACE}")
    assert history.bytes - ascii_bytes > 3.5 * ascii_bytes - 1000


def test_the_least_recently_published_stream_is_trimmed_first() -> None:
    """A client joining (reading a stream's position) does not make a stream younger:
    past max_bytes, the stream published to longest ago loses its messages first."""
    each = sys.getsizeof(append(History(1, 1), "all", "x" * 200)) + ENTRY_BYTES + 1
    history = History(100, 60, max_bytes=20 * each)
    for _ in range(10):
        append(history, "group:old", "x" * 200)
    for _ in range(10):
        append(history, "group:new", "x" * 200)
    old, new = history.position("group:old"), history.position("group:new")  # joins
    append(history, "all", "x" * 200)
    assert history.since("group:old", Position(old.epoch, 0)) is None
    assert len(history.since("group:new", Position(new.epoch, 0)) or []) == 10


def test_recent_is_the_newest_messages_that_are_young_enough_and_fit() -> None:
    """``recent``: the last ``limit`` messages, oldest first, none older than the ttl,
    only as many of the newest as fit the budget; a new stream stands at offset 0."""
    clock = Clock()
    history = History(10, 60, clock=clock)
    append(history, "all", "old")
    clock.now += 61
    frames = [append(history, "all", text) for text in "abc"]
    where, found = history.recent("all", 10, 10_000)
    assert (where.offset, texts(found)) == (4, ["a", "b", "c"])  # "old" is past the ttl
    assert texts(history.recent("all", 2, 10_000)[1]) == ["b", "c"]
    budget = len(frames[1]) + len(frames[2])
    assert texts(history.recent("all", 10, budget)[1]) == ["b", "c"]
    assert texts(history.recent("all", 10, budget - 1)[1]) == ["c"]
    fresh = history.recent("group:chess", 5, 10_000)
    assert fresh == (history.position("group:chess"), []) and fresh[0].offset == 0
