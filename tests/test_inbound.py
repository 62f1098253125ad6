"""inbound: the per-connection rate, when sending becomes a flood (sans-I/O), and the slow
lane readers wait in after a refused or over-rate frame."""

from __future__ import annotations

import asyncio

import pytest

from wsfanout.inbound import FLOOD_WINDOW, Inbound, SlowLane, Verdict, frame_size


def test_within_the_burst_every_frame_is_taken() -> None:
    """A fresh connection may send its burst at once."""
    inbound = Inbound(rate=10, burst=5, now=0.0)
    assert [inbound.check(0.0) for _ in range(5)] == [Verdict.TAKE] * 5


def test_past_the_rate_one_is_told_then_dropped_then_a_flood() -> None:
    """Past the burst: one TELL, then DROPs, and the burst's worth more within the window
    is a FLOOD."""
    inbound = Inbound(rate=10, burst=3, now=0.0)
    verdicts = [inbound.check(0.0) for _ in range(3 + 1 + 3 + 1)]
    assert verdicts == [Verdict.TAKE] * 3 + [Verdict.TELL] + [Verdict.DROP] * 3 + [Verdict.FLOOD]


def test_a_new_window_tells_again_and_the_rate_refills() -> None:
    """After the window, a frame over the rate is told again (with a fresh count); tokens
    come back at the rate."""
    inbound = Inbound(rate=10, burst=2, now=0.0)
    assert [inbound.check(0.0) for _ in range(4)] == [
        Verdict.TAKE,
        Verdict.TAKE,
        Verdict.TELL,
        Verdict.DROP,
    ]
    assert inbound.check(0.1) is Verdict.TAKE  # one token back after 0.1 s
    later = FLOOD_WINDOW + 0.05
    assert inbound.check(later) is Verdict.TAKE
    assert inbound.check(later) is Verdict.TAKE
    assert inbound.check(later) is Verdict.TELL


@pytest.mark.parametrize("rate", [0.0, -1.0])
def test_no_rate_takes_everything(rate: float) -> None:
    """A rate of 0 turns the limit off."""
    inbound = Inbound(rate=rate, burst=1, now=0.0)
    assert {inbound.check(0.0) for _ in range(1000)} == {Verdict.TAKE}


def test_a_run_of_refused_frames_is_a_flood_and_an_accepted_one_ends_it() -> None:
    """More than the burst refused in a row is a flood; an accepted frame starts over."""
    inbound = Inbound(rate=0, burst=3, now=0.0)
    assert [inbound.refused() for _ in range(3)] == [False] * 3
    inbound.accepted()
    assert [inbound.refused() for _ in range(4)] == [False] * 3 + [True]
    assert inbound.refused_in_a_row == 4


@pytest.mark.parametrize(
    ("frame", "limit", "size"),
    [
        (b"\xff" * 10, 4, 10),
        ("abc", 100, 3),  # short: characters are enough
        ("é" * 30, 100, 60),  # long: encoded to be measured
        ("a" * 30, 100, 30),
    ],
)
def test_frame_size(frame: str | bytes, limit: int, size: int) -> None:
    """Bytes as they are; a text long enough to matter is measured in UTF-8."""
    assert frame_size(frame, limit) == size


async def test_the_slow_lane_lets_a_few_readers_on_per_turn_in_order() -> None:
    """30 readers wait at once: at most ``per_turn`` go on per turn of the loop, in the order
    they came, and a cancelled one's place is skipped (it takes no one's turn)."""
    lane, turn, went = SlowLane(per_turn=4), 0, []

    async def reader(n: int) -> None:
        await lane.wait()
        went.append((n, turn))

    readers = [asyncio.create_task(reader(n)) for n in range(30)]
    await asyncio.sleep(0)  # every reader waits now
    assert len(lane) == 30
    readers[5].cancel()
    while len(went) < 29:
        await asyncio.sleep(0)  # one turn of the loop
        turn += 1
        assert turn < 100, went
    assert [n for n, _ in went] == [n for n in range(30) if n != 5]
    per_turn = [sum(1 for _, t in went if t == at) for at in range(turn + 1)]
    assert max(per_turn) == 4, per_turn
    assert len(lane) == 0
