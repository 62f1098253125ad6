"""What one connection may send: the inbound rate, and when sending becomes a flood.

Theory of operation. A token bucket per connection (``rate`` frames a second, at most
``burst`` at once) decides each frame as the reader takes it. Within the rate a frame is
taken (``TAKE``). Past it, the first frame is answered with one ``rate_limited`` error
(``TELL``), and for ``FLOOD_WINDOW`` seconds the frames over the rate are dropped (``DROP``),
answered only if they carry an ``id`` (a client's request must not wait in vain for its
answer): a flood is not answered frame by frame beyond that. More than ``burst`` of them
within that window is a flood (``FLOOD``: the reader closes
with 1008). A run of more than ``burst`` refused frames in a row (bad JSON, unknown targets) is
a flood too, whatever the rate: the reader takes frames only as fast as it can handle them, so a
flood that outpaces it can look like a client within the rate, and a client that never reads
its errors fills its outbox with them.

Sans-I/O: the reader passes the time in; nothing here awaits, but ``SlowLane``.

The slow lane. A frame that is refused or over the rate costs little, but a flood is many
connections at once (a user's 100 sockets), each ready again at every turn of the event loop:
one frame each per turn made every turn 100 frames long (some 10-30 ms, and 100 ms at a
flood's first read), and another user's message takes several turns to go round. So after
such a frame a reader waits in the process's one ``SlowLane``, which lets at most
``SLOW_LANE_PER_TURN`` readers on per turn of the loop, first come first served: a turn stays
short whatever the number of flooding connections, and the flood is still read as fast as
the loop has nothing else to do (it is cut off as soon, in CPU time).
"""

from __future__ import annotations

import asyncio
import collections
import enum
from typing import Final

FLOOD_WINDOW: Final = 1.0  # seconds after a rate_limited error in which more than the burst floods
SLOW_LANE_PER_TURN: Final = 8  # readers the slow lane lets on per turn of the event loop


class Verdict(enum.Enum):
    """What becomes of one frame."""

    TAKE = "take"  # within the rate
    TELL = "tell"  # over it: answered with one rate_limited error, and dropped
    DROP = "drop"  # over it again within the window: dropped (answered only if it has an id)
    FLOOD = "flood"  # more than the burst dropped within the window: close the connection


class Inbound:
    """The inbound bounds of one connection (two floats and three counters: tens of
    thousands of these live at once)."""

    __slots__ = ("_dropped", "_last", "_refused", "_tokens", "_told_until", "burst", "rate")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate  # frames per second; 0: no limit
        self.burst = burst
        self._tokens = float(burst)
        self._last = now
        self._told_until = 0.0  # the end of the last rate_limited error's window
        self._dropped = 0  # frames dropped within that window
        self._refused = 0  # frames refused in a row

    def check(self, now: float) -> Verdict:
        """Decide one frame read at ``now`` (``time.monotonic()``)."""
        rate = self.rate
        if rate <= 0:
            return Verdict.TAKE
        tokens = min(self.burst, self._tokens + (now - self._last) * rate)
        self._last = now
        if tokens >= 1:
            self._tokens = tokens - 1
            return Verdict.TAKE
        self._tokens = tokens
        if now >= self._told_until:
            self._told_until, self._dropped = now + FLOOD_WINDOW, 0
            return Verdict.TELL
        self._dropped += 1
        return Verdict.FLOOD if self._dropped > self.burst else Verdict.DROP

    def refused(self) -> bool:
        """A taken frame was refused (answered with an error): True once that makes a run
        of more than the burst."""
        self._refused += 1
        return self._refused > self.burst

    def accepted(self) -> None:
        """A taken frame was accepted: a run of refused frames ends."""
        self._refused = 0

    @property
    def refused_in_a_row(self) -> int:
        return self._refused


def frame_size(frame: str | bytes, limit: int) -> int:
    """A frame's size in bytes, as far as comparing it with ``limit`` needs: a str's length in
    characters is at most its UTF-8 size and at least a quarter of it, so most texts are not
    encoded to be measured."""
    if isinstance(frame, bytes) or len(frame) * 4 <= limit:
        return len(frame)
    return len(frame.encode())


class SlowLane:
    """Where readers wait after a refused or over-rate frame: at most ``per_turn`` of them go
    on per turn of the event loop, in the order they came (one per process)."""

    def __init__(self, per_turn: int = SLOW_LANE_PER_TURN) -> None:
        self.per_turn = per_turn
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._due: asyncio.AbstractEventLoop | None = None  # a release is due there next turn

    async def wait(self) -> None:
        """Let other tasks run, and come back when this reader's place in the lane comes."""
        loop = asyncio.get_running_loop()
        turn: asyncio.Future[None] = loop.create_future()
        self._waiting.append(turn)
        if self._due is not loop:
            self._due = loop
            loop.call_soon(self._release, loop)
        await turn  # cancelled: its place is skipped

    def _release(self, loop: asyncio.AbstractEventLoop) -> None:
        waiting, left = self._waiting, self.per_turn
        while waiting and left:
            turn = waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                left -= 1
        if waiting:
            loop.call_soon(self._release, loop)  # the next turn: after what was woken here
        else:
            self._due = None

    def __len__(self) -> int:
        return len(self._waiting)
