"""outage: an outage that fails many requests writes a few lines, each counting the quiet ones."""

from __future__ import annotations

import logging

import pytest

from wsfanout.outage import OutageLog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "wsfanout.outage"]


def test_the_first_failure_is_logged_at_once_and_the_rest_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One line for the first failure; the next line, once ``every`` has passed, says how
    many failed quietly in between."""
    clock = Clock()
    outages = OutageLog(every=10.0, clock=clock)
    error = OSError("connection refused")
    for _ in range(5):
        outages.failed("a login failed", error)
    assert lines(caplog) == ["a login failed: connection refused"]
    assert all(r.levelno == logging.ERROR for r in caplog.records)
    clock.now += 9.9
    outages.failed("a login failed", error)
    assert len(lines(caplog)) == 1
    clock.now += 0.1
    outages.failed("a publish failed", error)
    assert lines(caplog)[1] == (
        "a publish failed: connection refused (5 more failed since the last such line)"
    )
    clock.now += 10.0
    outages.failed("a publish failed", error)
    assert lines(caplog)[2] == "a publish failed: connection refused"  # none kept quiet


def test_every_zero_logs_every_failure(caplog: pytest.LogCaptureFixture) -> None:
    """With ``every`` at 0 nothing is kept quiet."""
    outages = OutageLog(every=0.0, clock=Clock())
    for n in range(3):
        outages.failed(f"request {n}", OSError("gone"))
    assert lines(caplog) == ["request 0: gone", "request 1: gone", "request 2: gone"]
