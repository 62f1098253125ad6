"""Logging what an outage (the database, or Redis, away) made fail, a few lines at a time.

Under load an outage fails every request at once: one line each would bury the log. The
first failure is logged at once, then one line every ``every`` seconds at most, saying how
many failed quietly since the last one. One ``OutageLog`` per service, shared by the parts
that meet the outage (handshakes, logins, publishing, control, the HTTP handlers).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Final

log = logging.getLogger(__name__)

OUTAGE_LOG_EVERY: Final = 10.0  # seconds between lines about requests an outage failed


class OutageLog:
    """Rate-limited error lines about failures an outage caused."""

    def __init__(
        self, every: float = OUTAGE_LOG_EVERY, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.every = every
        self.clock = clock
        self._logged = -math.inf  # when the last line was written ...
        self._quiet = 0  # ... and how many failures were kept quiet since

    def failed(self, what: str, exc: BaseException) -> None:
        """Log that ``what`` failed because of ``exc`` (the database or Redis is away): at
        once if no line was written in the last ``every`` seconds, else only counted."""
        now = self.clock()
        if now - self._logged < self.every:
            self._quiet += 1
            return
        quiet, self._quiet, self._logged = self._quiet, 0, now
        more = f" ({quiet} more failed since the last such line)" if quiet else ""
        log.error("%s: %s%s", what, exc, more)
