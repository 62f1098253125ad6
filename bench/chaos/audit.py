"""The audit of a chaos run: from the publishers' log (what was sent, what was acknowledged)
and every reader's log (what the application was given), whether every acknowledged message
reached every reader meant to receive it exactly once, in offset order, or was covered by a
``recovered: false`` that named its stream.

Theory of operation. A reader's log is walked stream by stream, keeping where it stands
(epoch, offset) as the client does: a welcome sets it (the first one says where the reader
began), a message moves it on (a skipped offset is a gap nobody reported), and a reconnect's
welcome with another epoch, or a ``resumed`` naming the stream, jumps it. A jump is
*reported* when the ``resumed`` of that connection named the stream; else (no ``resumed``
came, or it did not name the stream) it is *silent*. Every acknowledged message's position
(its stream's epoch and offset) is known from the readers that got it. Then, for every
reader meant to receive it: delivered once is right; more than once is a duplicate; not at
all is *reported lost* if a reported jump covers its position, else *silently lost* (a gap,
a silent jump, or the reader never got that far, even after the drain). A message nobody got
has no known position: it is reported lost for a reader whose ``resumed`` named its stream
after it was sent, else silently lost.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .population import Population

EXAMPLES = 5


@dataclass
class Jump:
    reported: bool
    epoch: str  # the range of positions it skipped: (epoch, lo, hi], and maybe an epoch's end
    lo: float
    hi: float
    t: float
    why: str
    to: tuple[str, float] | None = None  # for a jump to another epoch: up to here in that one
    sent_before: float = math.inf  # covers only messages sent before this


@dataclass
class Timeline:
    """One reader's positions in one stream."""

    first: tuple[str, int]
    cur: list[Any]
    jumps: list[Jump] = field(default_factory=list)
    disorder: int = 0
    gaps: int = 0  # offsets skipped without a report (whatever was at them)

    def covers(self, epoch: str, offset: int, sent: float) -> Jump | None:
        for jump in self.jumps:
            if sent > jump.sent_before:
                continue
            if jump.epoch == epoch and jump.lo < offset <= jump.hi:
                return jump
            if jump.to is not None and jump.to[0] == epoch and offset <= jump.to[1]:
                return jump
        return None


class Reader:
    def __init__(self) -> None:
        self.streams: dict[str, Timeline] = {}
        self.pending: dict[str, Jump] = {}  # epoch changes awaiting this connection's resumed
        self.welcome: dict[str, tuple[str, int]] = {}
        self.rows: list[list[Any]] = []  # for examples: the welcomes and resumeds


class Audit:
    def __init__(self, population: Population) -> None:
        self.population = population
        self.readers: dict[int, Reader] = collections.defaultdict(Reader)
        self.sent: dict[str, tuple[str, str, float]] = {}  # id -> via, stream, time
        self.answer: dict[str, tuple[float, str]] = {}  # id -> time, outcome
        self.got: dict[str, dict[int, int]] = collections.defaultdict(dict)  # id -> reader -> n
        self.where: dict[str, collections.Counter[tuple[str, str, int]]] = collections.defaultdict(
            collections.Counter
        )
        self.unknown = 0
        self.unpositioned = 0  # welcomes without positions (history on: there should be none)

    # -- reading the logs -----------------------------------------------------------------

    def publishers(self, path: Path) -> None:
        for line in path.read_bytes().splitlines():
            row = orjson.loads(line)
            if row[0] == "p":
                self.sent[row[1]] = (row[2], row[3], row[4])
            else:
                self.answer[row[1]] = (row[2], row[3])

    def reader_log(self, path: Path) -> None:
        for line in path.read_bytes().splitlines():
            with_row = orjson.loads(line)
            kind, index, t = with_row[0], with_row[1], with_row[2]
            reader = self.readers[index]
            if kind == "w":
                self._welcome(reader, t, with_row[3])
                if not with_row[3]:
                    self.unpositioned += 1
                    self._unknown(reader, index)
            elif kind == "r":
                self._resumed(reader, t, with_row[4])
            elif kind == "m":
                self._message(reader, index, t, with_row[3], with_row[4], with_row[5])

    def _welcome(self, reader: Reader, t: float, streams: dict[str, list[Any]]) -> None:
        reader.rows.append(["welcome", t, streams])
        for stream, jump in reader.pending.items():  # the last connection's resumed never came
            jump.why = "a welcome to another epoch, and no resumed on that connection"
            reader.streams[stream].jumps.append(jump)
        reader.pending = {}
        reader.welcome = {}
        for stream, (epoch, offset) in streams.items():
            line = reader.streams.get(stream)
            reader.welcome[stream] = (epoch, offset)
            if line is None:
                reader.streams[stream] = Timeline((epoch, offset), [epoch, offset])
                continue
            if line.cur[0] == epoch and line.cur[1] <= offset:
                continue  # the server replays from where it stood
            old_epoch, old_offset = line.cur
            reader.pending[stream] = Jump(
                False, old_epoch, old_offset, math.inf, t, "", to=(epoch, offset)
            )
            line.cur = [epoch, offset]

    def _unknown(self, reader: Reader, index: int) -> None:
        """A welcome without positions (history on, the node sends none): the reader's
        streams it had none for are met without an epoch, so that a later welcome that
        takes them up is a jump, reported only if a resumed names them."""
        user, _ = self.population.clients[index]
        streams = ["all", f"user:{user}", *(f"group:{g}" for g in self.population.users[user])]
        for stream in streams:
            if stream not in reader.streams:
                reader.streams[stream] = Timeline(("?", 0), ["?", 0])

    def _resumed(self, reader: Reader, t: float, lost: list[str]) -> None:
        reader.rows.append(["resumed", t, lost])
        for stream, jump in reader.pending.items():
            jump.reported = stream in lost
            jump.why = "reported" if jump.reported else "another epoch, not named in resumed"
            reader.streams[stream].jumps.append(jump)
        for stream in lost:
            line, top = reader.streams.get(stream), reader.welcome.get(stream)
            if stream in reader.pending or line is None:
                continue
            if top is None:  # a welcome without positions: what was sent till now is lost
                why = "reported (a welcome without positions)"
                line.jumps.append(Jump(True, line.cur[0], line.cur[1], math.inf, t, why))
                line.jumps[-1].sent_before = t
                continue
            if line.cur[0] == top[0] and line.cur[1] < top[1]:  # goes on from the welcome's top
                line.jumps.append(Jump(True, top[0], line.cur[1], top[1], t, "reported"))
                line.cur[1] = top[1]
        reader.pending = {}

    def _message(
        self, reader: Reader, index: int, t: float, stream: str, offset: int, text: str
    ) -> None:
        line = reader.streams.get(stream)
        if line is None:  # a message on a stream no welcome named
            line = reader.streams[stream] = Timeline(("?", 0), ["?", 0])
        epoch, last = line.cur
        if epoch == "?":  # met without an epoch: where it began is not known
            pass
        elif offset < last:  # the same offset again is a duplicate, counted as one
            line.disorder += 1
        elif offset > last + 1:
            line.gaps += offset - last - 1
            line.jumps.append(Jump(False, epoch, last, offset - 1, t, "offsets skipped"))
        line.cur[1] = max(last, offset)
        if text not in self.sent:
            self.unknown += 1
            return
        got = self.got[text]
        got[index] = got.get(index, 0) + 1
        self.where[text][(stream, epoch, offset)] += 1

    # -- judging --------------------------------------------------------------------------

    def judge(self) -> dict[str, Any]:
        counts: collections.Counter[str] = collections.Counter()
        examples: dict[str, list[str]] = collections.defaultdict(list)
        readers_of: dict[str, list[int]] = {}
        vias: collections.Counter[str] = collections.Counter()
        for text, (via, stream, t_sent) in self.sent.items():
            outcome = self.answer.get(text, (0.0, "no answer"))[1]
            got = self.got.get(text, {})
            meant = readers_of.get(stream)
            if meant is None:
                meant = readers_of[stream] = self.population.readers(stream)
            meant_set = set(meant)
            wrong = [r for r in got if r not in meant_set]
            counts["misdelivered"] += len(wrong)
            if wrong:
                examples["misdelivered"].append(f"{text} ({stream}) reached readers {wrong[:5]}")
            positions = self.where.get(text, collections.Counter())
            published = len({(s, o) for s, _, o in positions})
            # A message published twice (a RabbitMQ redelivery, an HTTP retry) is one too
            # many: the publishers give each its idempotency key (the message_id), so the
            # service must drop the second.
            twice = "duplicated"
            if outcome != "ok":
                counts["not acknowledged"] += 1
                counts["not acknowledged, delivered somewhere"] += bool(got)
                for reader, n in got.items():
                    if n > 1:
                        counts[twice] += n - 1
                        examples[twice].append(
                            f"unacknowledged {text} ({via}, {stream}) given {n} times to "
                            f"reader {reader}; positions {dict(positions)}"
                        )
                continue
            counts["acknowledged"] += 1
            vias[via] += 1
            counts["published more than once"] += published > 1
            position = positions.most_common(1)[0][0] if positions else None
            for reader in meant:
                counts["expected deliveries"] += 1
                n = got.get(reader, 0)
                if n == 1:
                    counts["delivered once"] += 1
                    continue
                if n > 1:
                    counts["delivered once"] += 1
                    counts[twice] += n - 1
                    examples[twice].append(
                        f"{text} ({via}, {stream}) given {n} times to reader {reader}; "
                        f"positions {dict(positions)}"
                    )
                    continue
                verdict, why = self._missing(reader, stream, position, t_sent)
                counts[verdict] += 1
                if verdict == "silently lost":
                    examples[verdict].append(
                        f"{text} ({via}, {stream}, sent at {t_sent:.3f}, position {position}) "
                        f"never reached reader {reader}: {why}; "
                        f"its reconnects: {self._around(reader, t_sent)}"
                    )
        counts["out of order"] = sum(
            line.disorder for r in self.readers.values() for line in r.streams.values()
        )
        counts["offsets skipped without a report"] = sum(
            line.gaps for r in self.readers.values() for line in r.streams.values()
        )
        counts["deliveries of unknown ids"] = self.unknown
        counts["welcomes without positions"] = self.unpositioned
        return {"counts": counts, "vias": vias, "examples": examples}

    def _missing(
        self, index: int, stream: str, position: tuple[str, str, int] | None, t_sent: float
    ) -> tuple[str, str]:
        line = self.readers[index].streams.get(stream)
        if line is None:
            return "silently lost", "the reader never had that stream"
        if position is not None:
            _, epoch, offset = position
            jump = line.covers(epoch, offset, t_sent)
            if jump is not None:
                verdict = "reported lost" if jump.reported else "silently lost"
                return verdict, f"{jump.why} at {jump.t:.3f}"
            if line.first[0] == epoch and offset <= line.first[1]:
                return "before the reader began", ""
            if line.cur[0] == epoch and offset > line.cur[1]:
                return "silently lost", f"the reader stands at {line.cur} after the drain"
        # Its position is unknown (nobody got it) or in an epoch this reader never saw:
        # the reader's first jump in that stream after it was sent decides.
        after = [jump for jump in line.jumps if jump.t >= t_sent]
        if after:
            jump = min(after, key=lambda jump: jump.t)
            return ("reported lost" if jump.reported else "silently lost"), jump.why
        return "silently lost", "no jump or loss report after it was sent"

    def _around(self, index: int, t: float) -> str:
        rows = [row for row in self.readers[index].rows if t - 30 <= row[1] <= t + 60]
        return "; ".join(f"{kind} at {at:.3f} {str(what)[:200]}" for kind, at, what in rows[:6])


FAILURES = ("silently lost", "duplicated", "out of order", "misdelivered")


def main(folder: Path, population: Population, seed: int, queue_left: int) -> int:
    audit = Audit(population)
    audit.publishers(folder / "publishers.log")
    for path in sorted(folder.glob("readers*.log")):
        audit.reader_log(path)
    result = audit.judge()
    counts = result["counts"]
    vias = ", ".join(f"{via} {n}" for via, n in sorted(result["vias"].items()))
    print(f"\naudit of seed {seed} ({folder})")
    print(f"  acknowledged messages               {counts['acknowledged']} ({vias})")
    somewhere = counts["not acknowledged, delivered somewhere"]
    print(f"  not acknowledged                    {counts['not acknowledged']} "
          f"({somewhere} of them delivered somewhere)")  # fmt: skip
    print(f"  published twice                     {counts['published more than once']}")
    print(f"  expected deliveries                 {counts['expected deliveries']}")
    names = ("delivered once", "reported lost", "silently lost", "duplicated",
             "out of order",
             "misdelivered", "before the reader began", "offsets skipped without a report",
             "deliveries of unknown ids", "welcomes without positions")  # fmt: skip
    for name in names:
        print(f"  {name:<36}{counts[name]}")
    print(f"  RabbitMQ queue left                 {queue_left}")
    failed = [name for name in FAILURES if counts[name]]
    for name in failed:
        print(f"\n{name}: {counts[name]}; for example:")
        for example in result["examples"][name][:EXAMPLES]:
            print(f"  - {example}")
    print(f"\n{'FAILED: ' + ', '.join(failed) if failed else 'PASSED'} (seed {seed})")
    return 1 if failed else 0
