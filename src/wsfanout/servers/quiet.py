"""uvicorn's log lines of websockets opened, refused and closed, dropped (``wsfanout serve
--server uvicorn`` without ``--access-log``, as hypercorn logs none). uvicorn_sansio.py's
accept reads it: a line that this filter drops need not be built."""

from __future__ import annotations

import logging


class QuietConnections(logging.Filter):
    """Drops uvicorn's log lines of websockets opened, refused and closed."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg
        return record.levelno > logging.INFO or not (
            message in ("connection open", "connection closed")
            or (isinstance(message, str) and message.startswith('%s - "WebSocket %s"'))
        )


def logs_accepts(logger: logging.Logger) -> bool:
    """Whether ``logger`` would log uvicorn's line of a websocket accepted."""
    return logger.isEnabledFor(logging.INFO) and not any(
        isinstance(found, QuietConnections) for found in logger.filters
    )
