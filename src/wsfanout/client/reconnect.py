"""What the client does after a connection ends or an attempt fails (DESIGN 11): the backoff,
and the table of close codes and handshake statuses.

Sans-I/O: nothing here touches a socket or the clock; the connection asks and obeys.

Theory of operation. Every way a connection can end is one ``Next``: retry after a backoff
(the server is away, refused us for now, or found us too slow), retry after a fixed wait
(a restart: a short random delay; a 429: its ``Retry-After``), renew the credential first (an
auth refusal: 1008, 401, 403), connect fresh without positions (a 400 on a resume), or stop
(closed by the application, refused for good). The backoff is full jitter: the n-th failure
in a row waits a uniformly random time between 0 and ``min(max_delay, min_delay * 2**n)``, so
clients that lost the same server at the same moment spread their returns over the window
instead of arriving together; a connection that lived ``reset_after`` seconds starts it over.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from typing import Final

from ..protocol import CloseCode

RESTART_JITTER: Final = 1.0  # seconds: the most a client waits after 1001 or 1012
MAX_RETRY_AFTER: Final = 300.0  # seconds: a Retry-After longer than this is held to it
MAX_EXPONENT: Final = 60  # 2**60 * any delay is past every ceiling; no float overflow


class Action(enum.Enum):
    RETRY = "retry"  # connect again, after ``Next.wait`` or the backoff
    RENEW = "renew"  # renew the credential once (get_token, or log in again), then connect
    FRESH = "fresh"  # drop the positions (the server refused them) and connect at once
    STOP = "stop"  # closed for good


# Why a state changed: the same words as the JavaScript client's (``Reason`` in
# clients/js/wsfanout.d.ts), so that an application reads both alike.
CLOSED: Final = "closed"  # close() was called
UNAUTHORIZED: Final = "unauthorized"  # 1008, 401, 403, a refused login: renew once, else stop
# (after a 1008, a client with nothing to renew tries its credentials once more: a host
# app's session behind them may have been renewed)
GOING_AWAY: Final = "going_away"  # 1001
RESTART: Final = "restart"  # 1012
SLOW_CONSUMER: Final = "slow_consumer"  # 1013
FLOODED: Final = "flooded"  # 1008 after a rate_limited or bad_message error: sent too fast
CONNECTION_LOST: Final = "connection_lost"  # any other close
UNREACHABLE: Final = "unreachable"  # no answer from the server
REFUSED: Final = "refused"  # the server answered the handshake (or the login) with an error
TOKEN_FAILED: Final = "token_failed"  # noqa: S105 - get_token() raised
TIMEOUT: Final = "timeout"  # no welcome within connect_timeout
SLOW_CONSUMER_FAILURES: Final = 2  # after 1013, back off as after this many failures at least


@dataclass(frozen=True, slots=True)
class Next:
    """What to do next; ``reason`` is one of the words above, ``detail`` says more.

    ``wait``: seconds to wait before the next attempt; None means the backoff's next delay.
    ``soon``: a short random delay instead (``RESTART_JITTER``), counted as no failure.
    ``failures``: back off as after at least this many failures in a row.
    ``again``: with RENEW, the same credentials may be tried once more if none can be renewed
    (the server ended a session that may since have been renewed: 1008).
    """

    action: Action
    reason: str
    detail: str = ""
    wait: float | None = None
    soon: bool = False
    failures: int = 0
    again: bool = False


class Backoff:
    """Full-jitter exponential backoff: the delays before reconnect attempts."""

    def __init__(
        self,
        min_delay: float,
        max_delay: float,
        reset_after: float,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < min_delay <= max_delay:
            raise ValueError(f"need 0 < min_delay <= max_delay, got {min_delay}, {max_delay}")
        self.min_delay = min_delay
        self.max_delay = max_delay
        self.reset_after = reset_after
        self.failures = 0  # attempts that failed in a row since a connection lived long enough
        self._rng = rng or random.Random()

    def delay(self, failures: int = 0) -> float:
        """The wait before the next attempt; each call counts one more failure.

        ``failures``: wait as after at least this many failures in a row.
        """
        self.failures = max(self.failures, failures)
        ceiling = min(self.max_delay, self.min_delay * 2 ** min(self.failures, MAX_EXPONENT))
        self.failures += 1
        return self._rng.uniform(0, ceiling)

    def jitter(self, most: float) -> float:
        """A short random wait (after a restart), counted as no failure."""
        return self._rng.uniform(0, most)

    def lived(self, seconds: float) -> None:
        """A connection lived this long: long enough, and the next failure starts over."""
        if seconds >= self.reset_after:
            self.failures = 0


_CLOSES: Final[dict[int, str]] = {
    CloseCode.GOING_AWAY: "the server is going away",
    CloseCode.POLICY: "the server ended the session",
    CloseCode.TOO_LARGE: "a frame was too large",
    CloseCode.INTERNAL_ERROR: "the server failed",
    CloseCode.SERVICE_RESTART: "the node lost messages (its backplane)",
    CloseCode.TRY_AGAIN_LATER: "the client read too slowly",
}
ABNORMAL: Final = 1006  # the connection dropped without a close frame


# The server closes a client that floods it with 1008 too, after an error that says so: that
# is no reason to doubt the credentials.
FLOOD_ERRORS: Final = frozenset({"rate_limited", "bad_message"})


def after_close(code: int, by_application: bool, last_error: str | None = None) -> Next:
    """What follows a connection that was open and closed with ``code``.

    ``by_application``: the application called ``close()``; ``last_error``: the code of
    the last error frame the connection brought, if any.
    """
    if by_application:
        return Next(Action.STOP, CLOSED)
    what = _CLOSES.get(code, "the connection dropped" if code == ABNORMAL else "closed")
    detail = f"{what} ({code})"
    if code == CloseCode.GOING_AWAY:
        return Next(Action.RETRY, GOING_AWAY, detail, soon=True)
    if code == CloseCode.SERVICE_RESTART:
        return Next(Action.RETRY, RESTART, detail, soon=True)
    if code == CloseCode.POLICY and last_error in FLOOD_ERRORS:
        detail = f"closed for sending too fast ({code}, after {last_error})"
        return Next(Action.RETRY, FLOODED, detail, failures=SLOW_CONSUMER_FAILURES)
    if code == CloseCode.POLICY:
        return Next(Action.RENEW, UNAUTHORIZED, detail, again=True)
    if code == CloseCode.TRY_AGAIN_LATER:
        return Next(Action.RETRY, SLOW_CONSUMER, detail, failures=SLOW_CONSUMER_FAILURES)
    return Next(Action.RETRY, CONNECTION_LOST, detail)


def after_refusal(status: int, retry_after: str | None, resuming: bool) -> Next:
    """What follows a handshake the server answered with an HTTP ``status``.

    ``resuming``: the handshake carried ``?resume=``.
    """
    detail = f"the handshake was refused ({status})"
    if status in (401, 403):
        return Next(Action.RENEW, UNAUTHORIZED, detail)
    if status == 400:
        if resuming:
            return Next(Action.FRESH, REFUSED, detail + ": the positions were refused")
        return Next(Action.STOP, REFUSED, detail)
    wait = parse_retry_after(retry_after)
    if status in (429, 503) and wait is not None:
        return Next(Action.RETRY, REFUSED, detail, wait=wait)
    return Next(Action.RETRY, REFUSED, detail)


def parse_retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` in seconds (the delay form; the date form is not worth a clock)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    if seconds != seconds or seconds < 0:  # NaN, or negative
        return None
    return min(seconds, MAX_RETRY_AFTER)
