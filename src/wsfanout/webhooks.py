"""Webhooks: lifecycle events POSTed in signed JSON batches to the host's URL.

Theory of operation. ``offer()`` is a plain ``def``: it encodes the event once (so a
later change to the dict changes nothing sent) and appends it to a bounded queue; a full
queue refuses the new event, counted as dropped. One sender task takes up to
``batch_max`` events from the head of the queue, POSTs ``{"events": [...]}`` with a
timestamp and an HMAC-SHA256 signature of ``"<timestamp>.<body>"``, and only then removes
them from the queue. A 2xx answer delivers the batch. A failure that may pass (a refused
or reset connection, a timeout, 408, 429, 5xx) sends *the same batch* again after a
full-jitter backoff (or the 429's Retry-After), with a new timestamp and signature, for
as long as it takes: nothing behind it is sent meanwhile, so events arrive in the order
offered. Any other status rejects the batch for good (counted, logged): the receiver said
it will never take it, and retrying would only hold up every event behind it.

The HTTP client is a minimal HTTP/1.1 one over asyncio streams (http and https), which
keeps its connection alive between batches and opens a new one after any error.

What is lost: events dropped by a full queue; batches rejected; what ``close()`` could
not send within its deadline; and everything queued when the process dies. Delivery is
therefore at least once while the node lives (a batch whose answer was lost is sent
again): receivers deduplicate by event id.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import itertools
import logging
import random
import ssl
import time
from typing import Any, Final
from urllib.parse import urlsplit

import orjson

from .outage import OutageLog

log = logging.getLogger(__name__)

# Limits
ANSWER_MAX: Final = 64 * 1024  # bytes of an answer read at most (head, and body apart)
ANSWER_LOGGED: Final = 200  # characters of a rejecting answer written to the log
RETRY_STATUSES: Final = frozenset({408, 429})  # and every 5xx
# Timeouts
IDLE_REUSE: Final = 4.0  # seconds idle after which a kept-alive connection is not reused
# (under the 5 s after which hypercorn and uvicorn close idle connections by default)


class DeliveryError(Exception):
    """An attempt that failed in a way that may pass: retried."""


_FAILURES: Final = (
    DeliveryError,  # a retried status, or an answer that is not HTTP/1.x
    OSError,  # refused, reset, unreachable, TLS
    TimeoutError,  # the whole attempt took over ``timeout``
    EOFError,  # closed in the middle of the answer (asyncio.IncompleteReadError)
    asyncio.LimitOverrunError,  # a head or chunk line over ANSWER_MAX
    ValueError,  # a malformed number in the answer
)


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """``"sha256="`` and the hex HMAC-SHA256 of ``timestamp + "." + body``, keyed with
    ``secret`` (UTF-8): the ``X-Wsfanout-Signature`` header."""
    message = timestamp.encode() + b"." + body
    return "sha256=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def verify(
    secret: str,
    body: bytes,
    timestamp: str | None,
    signature: str | None,
    *,
    tolerance: float = 300.0,
    now: float | None = None,
) -> bool:
    """For receivers: whether ``signature`` (the ``X-Wsfanout-Signature`` header) signs
    ``body`` at ``timestamp`` (the ``X-Wsfanout-Timestamp`` header, integer seconds) with
    ``secret``, and the timestamp is within ``tolerance`` seconds of ``now`` (default:
    ``time.time()``), which refuses a replay of an old request. Compares in constant time;
    never raises on missing or malformed headers, it returns False.
    """
    if not isinstance(timestamp, str) or not isinstance(signature, str):
        return False
    # Integer seconds only; the length bound keeps int() cheap on garbage.
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 20):
        return False
    if not signature.isascii():  # compare_digest takes ASCII strings only
        return False
    clock = time.time() if now is None else now
    if not abs(clock - int(timestamp)) <= tolerance:
        return False
    try:
        expected = sign(secret, timestamp, body)
    except (TypeError, AttributeError, UnicodeError):  # a secret or body of the wrong type
        return False
    return hmac.compare_digest(expected, signature)


class Webhook:
    """Lifecycle events POSTed to ``url`` from a bounded queue, by one sender task.

    Args:
        url: ``http://`` or ``https://`` with a host; a path and query are kept.
        secret: the key of the ``X-Wsfanout-Signature`` HMAC.
        queue_max: events queued at most (the batch being sent included).
        batch_max: events per POST at most.
        timeout: seconds for a whole attempt (connect, send, read the answer).
        backoff_min, backoff_max: seconds; the n-th retry in a row waits a random time
            between 0 and ``min(backoff_max, backoff_min * 2**n)``; a Retry-After in
            seconds on a retried answer (429, 503) is waited instead, capped at backoff_max.

    Raises:
        ValueError: the URL is not http(s) with a host.
    """

    def __init__(
        self,
        url: str,
        secret: str,
        *,
        queue_max: int = 10_000,
        batch_max: int = 100,
        timeout: float = 10.0,
        backoff_min: float = 0.5,
        backoff_max: float = 10.0,
    ) -> None:
        if not url.isascii() or not url.isprintable() or " " in url:
            raise ValueError(f"a webhook URL is printable ASCII (percent-encoded), not {url!r}")
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"the webhook URL has a bad port: {url!r}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"a webhook URL is http:// or https:// with a host, not {url!r}")
        if parts.username is not None or parts.password is not None:
            # Refused rather than ignored; the URL is also written to logs.
            raise ValueError("a webhook URL carries no user or password (the secret signs)")
        self.url = url
        self.secret = secret
        # Limits
        self.queue_max = queue_max
        self.batch_max = batch_max
        # Timeouts
        self.timeout = timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max

        self._host = parts.hostname
        default_port = 443 if parts.scheme == "https" else 80
        self._port = port or default_port
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._host_header = host if self._port == default_port else f"{host}:{self._port}"
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._where = f"{parts.scheme}://{self._host_header}{parts.path}"  # no query in logs
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None

        self.stats: dict[str, int] = {"sent": 0, "dropped": 0, "rejected": 0, "retries": 0}
        self._queue: collections.deque[bytes] = collections.deque()  # encoded events
        self._wake = asyncio.Event()  # set when the queue is not empty
        self._drained = asyncio.Event()  # set when it is empty
        self._drained.set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._close_done = asyncio.Event()
        # The kept-alive connection and when its last answer ended (monotonic).
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._conn_idle_since = 0.0
        self._failures = OutageLog()
        self._drops = OutageLog()
        self._rejections = OutageLog()

    def __len__(self) -> int:
        """Events queued, the batch being sent included."""
        return len(self._queue)

    def offer(self, event: dict[str, Any]) -> bool:
        """Queue ``event`` for sending; never waits.

        Returns:
            False if it was dropped: the queue is full, or the webhook is closed.

        Raises:
            TypeError: the event cannot be encoded as JSON.
        """
        data = orjson.dumps(event)
        if self._closed or len(self._queue) >= self.queue_max:
            self.stats["dropped"] += 1
            why = "closed" if self._closed else f"{len(self._queue)} events queued"
            self._drops.failed(f"webhook {self._where}: an event dropped", DeliveryError(why))
            return False
        self._queue.append(data)
        self._drained.clear()
        self._wake.set()
        return True

    def start(self) -> None:
        """Start the sender task on the running loop (again: nothing happens).

        Raises:
            RuntimeError: the webhook is closed.
        """
        if self._closed:
            raise RuntimeError(f"webhook {self._where} is closed; it cannot start again")
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"webhook {self._where}"
            )
            self._task.add_done_callback(self._sender_ended)

    async def close(self, deadline: float = 5.0) -> None:
        """Keep sending what is queued for up to ``deadline`` seconds, then stop the sender
        and drop the rest (counted, one log line). A second call waits for the first."""
        if self._closed:
            await self._close_done.wait()
            return
        self._closed = True
        try:
            if self._task is not None:
                try:
                    async with asyncio.timeout(deadline):
                        await self._drained.wait()
                except TimeoutError:
                    pass
                self._task.cancel()
                await asyncio.wait([self._task])  # does not raise the task's CancelledError
            self._disconnect()
            if self._queue:
                lost = len(self._queue)
                self._queue.clear()
                self._drained.set()
                self.stats["dropped"] += lost
                log.error("webhook %s: closed with %d events unsent, dropped", self._where, lost)
        finally:
            self._close_done.set()

    # The sender

    def _sender_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("webhook %s: the sender stopped", self._where, exc_info=exc)

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            count = min(len(self._queue), self.batch_max)
            body = b'{"events":[' + b",".join(itertools.islice(self._queue, count)) + b"]}"
            await self._deliver(body, count)
            for _ in range(count):
                self._queue.popleft()
            if not self._queue:
                self._drained.set()

    async def _deliver(self, body: bytes, count: int) -> None:
        """Send one batch until it is delivered or rejected."""
        attempt = 0
        while True:
            try:
                async with asyncio.timeout(self.timeout):
                    status, headers, answer = await self._exchange(body)
            except _FAILURES as exc:
                failure: BaseException = exc
                if isinstance(exc, TimeoutError) and not str(exc):
                    failure = DeliveryError(f"no answer within {self.timeout:g} s")
                wait = self._backoff(attempt)
            else:
                if 200 <= status < 300:
                    self.stats["sent"] += count
                    return
                if status not in RETRY_STATUSES and not 500 <= status < 600:  # 3xx too: no
                    # redirect is followed (a signed POST is not re-sent to another URL)
                    self.stats["rejected"] += count
                    text = answer[:ANSWER_LOGGED].decode(errors="replace")
                    self._rejections.failed(
                        f"webhook {self._where}: {count} events rejected",
                        DeliveryError(f"answered {status} {text!r}"),
                    )
                    return
                failure = DeliveryError(f"answered {status}")
                wait = self._backoff(attempt, headers.get("retry-after"))
            self.stats["retries"] += 1
            attempt += 1
            self._failures.failed(
                f"webhook {self._where}: {count} events not delivered, retrying", failure
            )
            await asyncio.sleep(wait)

    def _backoff(self, attempt: int, retry_after: str | None = None) -> float:
        """Seconds before the next attempt: the receiver's Retry-After (in seconds, capped
        at ``backoff_max``) when it gave one, else full jitter."""
        seconds = (retry_after or "").strip()
        if seconds.isascii() and seconds.isdigit():
            return min(self.backoff_max, float(seconds))
        return random.uniform(0, min(self.backoff_max, self.backoff_min * 2 ** min(attempt, 30)))

    # The HTTP/1.1 client

    async def _exchange(self, body: bytes) -> tuple[int, dict[str, str], bytes]:
        """POST ``body`` once; the status, headers (names in lower case) and answer body."""
        conn, self._conn = self._conn, None
        if conn is not None:
            idle = time.monotonic() - self._conn_idle_since
            if idle < IDLE_REUSE and not conn[0].at_eof():
                try:
                    return await self._request(conn, body, reused=True)
                except _StaleConnection:
                    pass  # the receiver closed it while idle: a new one, at once
            else:
                conn[1].close()
        conn = await asyncio.open_connection(
            self._host,
            self._port,
            ssl=self._ssl,
            server_hostname=self._host if self._ssl is not None else None,
            limit=ANSWER_MAX,
        )
        return await self._request(conn, body, reused=False)

    async def _request(
        self,
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        body: bytes,
        *,
        reused: bool,
    ) -> tuple[int, dict[str, str], bytes]:
        reader, writer = conn
        timestamp = str(int(time.time()))
        head = (
            f"POST {self._target} HTTP/1.1\r\n"
            f"Host: {self._host_header}\r\n"
            "User-Agent: wsfanout\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"X-Wsfanout-Timestamp: {timestamp}\r\n"
            f"X-Wsfanout-Signature: {sign(self.secret, timestamp, body)}\r\n"
            "\r\n"
        )
        keep = False
        try:
            try:
                writer.write(head.encode("latin-1") + body)
                await writer.drain()
                status, version, headers = await _read_head(reader)
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                if reused and not (isinstance(exc, asyncio.IncompleteReadError) and exc.partial):
                    raise _StaleConnection from exc
                raise
            answer, complete = await _read_body(reader, status, headers)
            keep = complete and version == "HTTP/1.1" and "close" not in _tokens(headers)
            return status, headers, answer
        finally:
            if keep:
                self._conn, self._conn_idle_since = conn, time.monotonic()
            else:
                writer.close()

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn[1].close()
            self._conn = None


class _StaleConnection(Exception):
    """A kept-alive connection that was closed before it answered."""


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, str, dict[str, str]]:
    """The status, HTTP version and headers of the answer, skipping 1xx ones."""
    while True:
        # Bounded by the reader's limit (ANSWER_MAX): LimitOverrunError past it.
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw[:-4].decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code = rest[:3]
        if (
            not version.startswith("HTTP/1.")
            or not (code.isascii() and code.isdigit())
            or rest[3:4] not in ("", " ")
        ):
            raise DeliveryError(f"not an HTTP/1.x answer: {lines[0][:100]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon:
                raise DeliveryError(f"a malformed header line: {line[:100]!r}")
            name = name.strip().lower()
            value = value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        if int(code) >= 200:
            return int(code), version, headers


async def _read_body(
    reader: asyncio.StreamReader, status: int, headers: dict[str, str]
) -> tuple[bytes, bool]:
    """The answer's body (ANSWER_MAX bytes at most), and whether all of it was read (the
    connection may then be reused)."""
    if status in (204, 304):
        return b"", True
    if "chunked" in _tokens(headers, "transfer-encoding"):
        parts: list[bytes] = []
        size = 0
        while True:
            line = await reader.readuntil(b"\r\n")
            length = int(line.split(b";", 1)[0].strip(), 16)  # ValueError if malformed
            if length == 0:
                break
            if size + length > ANSWER_MAX:
                parts.append(await reader.readexactly(ANSWER_MAX - size))
                return b"".join(parts), False
            size += length
            parts.append(await reader.readexactly(length))
            await reader.readexactly(2)  # the chunk's CRLF
        while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
            pass
        return b"".join(parts), True
    if "content-length" in headers:
        length = int(headers["content-length"])
        if length < 0:
            raise DeliveryError(f"a negative Content-Length: {length}")
        if length > ANSWER_MAX:
            return await reader.readexactly(ANSWER_MAX), False
        return await reader.readexactly(length), True
    # Neither: the body ends when the receiver closes the connection.
    answer = b""
    while len(answer) < ANSWER_MAX and (more := await reader.read(ANSWER_MAX - len(answer))):
        answer += more
    return answer, False


def _tokens(headers: dict[str, str], name: str = "connection") -> set[str]:
    return {token.strip().lower() for token in headers.get(name, "").split(",")}
