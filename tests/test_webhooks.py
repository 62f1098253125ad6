"""The webhook sender against a real receiver (tests/receiver.py): batches, signatures,
retries, an outage, a full queue, a silent receiver, close(), TLS; and verify()."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import socket
import ssl
import string
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.receiver import Answer, Received, Receiver, receiving
from wsfanout.webhooks import Webhook, sign, verify

SECRET = "the secret"
# Small backoffs keep the file fast; the defaults are tested by hand (WEBHOOK_OUTAGE=30).
QUICK: dict[str, Any] = {"backoff_min": 0.01, "backoff_max": 0.1, "timeout": 5.0}


def events(count: int, first: int = 0) -> list[dict[str, Any]]:
    """Lifecycle events as the service makes them, with unique ids."""
    return [
        {"id": f"ev-{n}", "type": "connected", "time": 1.5 + n, "node": "n1", "user": "greg"}
        for n in range(first, first + count)
    ]


def batch(request: Received) -> list[dict[str, Any]]:
    """The events of one POST."""
    body = orjson.loads(request.body)
    assert list(body) == ["events"]
    events: list[dict[str, Any]] = body["events"]
    return events


def ids(receiver: Receiver) -> list[str]:
    """Every event id the receiver got, in arrival order."""
    return [event["id"] for request in receiver.received for event in batch(request)]


async def until(condition: Callable[[], bool], within: float = 10.0) -> None:
    """Wait for ``condition`` to hold; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"not reached within {within} s"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def sending(url: str, **options: Any) -> AsyncIterator[Webhook]:
    """A started webhook, closed at the end (what is left unsent is dropped at once)."""
    hook = Webhook(url, SECRET, **{**QUICK, **options})
    hook.start()
    try:
        yield hook
    finally:
        await hook.close(deadline=0)


def closed_port() -> int:
    """A port nothing listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_batches_arrive_in_order_and_signed() -> None:
    """Queued events leave in batches of batch_max, in order, unchanged, signed, with the
    URL's path and query, on one kept-alive connection; close() sends what is queued."""
    sent = events(250)
    async with receiving() as receiver:
        hook = Webhook(f"{receiver.url}/hooks/in?team=1", SECRET, batch_max=100)
        assert all(hook.offer(event) for event in sent)
        assert len(hook) == 250
        hook.start()
        await hook.close(deadline=10)
    assert [len(batch(request)) for request in receiver.received] == [100, 100, 50]
    assert [event for request in receiver.received for event in batch(request)] == sent
    for request in receiver.received:
        assert request.target == "/hooks/in?team=1"
        assert request.headers["content-type"] == "application/json"
        assert request.headers["user-agent"] == "wsfanout"
        assert request.headers["host"] == f"127.0.0.1:{receiver.port}"
        timestamp = request.headers["x-wsfanout-timestamp"]
        assert verify(SECRET, request.body, timestamp, request.headers["x-wsfanout-signature"])
    assert receiver.connections == 1
    assert hook.stats == {"sent": 250, "dropped": 0, "rejected": 0, "retries": 0}
    assert len(hook) == 0


@pytest.mark.parametrize(
    ("status", "retried"),
    [
        (408, True),
        (429, True),
        (500, True),
        (502, True),
        (503, True),
        (301, False),
        (400, False),
        (401, False),
        (404, False),
        (410, False),
    ],
)
async def test_status_retried_or_rejected(
    status: int, retried: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """408, 429 and 5xx send the same batch again; other statuses reject it (counted,
    logged with the answer) and the next batch is still sent."""
    first, second = events(2)
    async with receiving() as receiver, sending(receiver.url) as hook:
        receiver.answers = [Answer(status, b"nope")]
        hook.offer(first)
        await until(lambda: hook.stats["sent"] + hook.stats["rejected"] == 1)
        hook.offer(second)
        await until(lambda: hook.stats["sent"] + hook.stats["rejected"] == 2)
    got = [batch(request) for request in receiver.received]
    if retried:
        assert got == [[first], [first], [second]]
        assert receiver.received[0].body == receiver.received[1].body
        assert hook.stats == {"sent": 2, "dropped": 0, "rejected": 0, "retries": 1}
        assert f"answered {status}" in caplog.text
    else:
        assert got == [[first], [second]]
        assert hook.stats == {"sent": 1, "dropped": 0, "rejected": 1, "retries": 0}
        assert f"answered {status} 'nope'" in caplog.text


async def test_retry_after_honoured_and_capped() -> None:
    """A 429's Retry-After is waited (the backoff alone would wait 2 ms at most), and a
    longer one is cut to backoff_max."""
    async with (
        receiving() as receiver,
        sending(receiver.url, backoff_min=0.001, backoff_max=1.5) as hook,
    ):
        receiver.answers = [
            Answer(429, headers=(("Retry-After", "1"),)),
            Answer(429, headers=(("Retry-After", "3600"),)),
        ]
        hook.offer(events(1)[0])
        await until(lambda: hook.stats["sent"] == 1)
    first, second, third = (request.at for request in receiver.received)
    # Lower bounds only: the waits start after the receiver has stamped each request.
    assert second - first >= 1.0 - 0.01
    assert third - second >= 1.5 - 0.01
    assert hook.stats["retries"] == 2


@pytest.mark.parametrize(
    ("framing", "size", "reused"),
    [
        ("length", 300, True),
        ("chunked", 300, True),
        ("close", 300, False),
        ("length", 100_000, False),
        ("chunked", 100_000, False),
    ],
)
async def test_answer_read_in_each_framing(
    framing: Any, size: int, reused: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """An answer is read by its length, its chunks or up to the close, 64 KiB at most: a
    rejection logs its first 200 characters, and the next batch goes on the same connection
    when the answer was read whole, else on a new one."""
    text = (string.ascii_letters * 2000)[:size]
    async with receiving() as receiver, sending(receiver.url) as hook:
        receiver.answers = [Answer(400, text.encode(), framing=framing)]
        hook.offer(events(1)[0])
        await until(lambda: hook.stats["rejected"] == 1)
        hook.offer(events(1, first=1)[0])
        await until(lambda: hook.stats["sent"] == 1)
    assert repr(text[:200]) in caplog.text
    assert text[:201] not in caplog.text
    assert receiver.connections == (1 if reused else 2)
    assert ids(receiver) == ["ev-0", "ev-1"]


async def test_connection_closed_while_idle_is_replaced() -> None:
    """A kept-alive connection the receiver closed while idle (as servers do after a few
    seconds) is replaced by a new one at once: no failed attempt, nothing sent twice."""
    async with receiving() as receiver, sending(receiver.url) as hook:
        hook.offer(events(1)[0])
        await until(lambda: hook.stats["sent"] == 1)
        await receiver.stop()
        await receiver.start()
        hook.offer(events(1, first=1)[0])
        await until(lambda: hook.stats["sent"] == 2)
    assert ids(receiver) == ["ev-0", "ev-1"]
    assert receiver.connections == 2
    assert hook.stats["retries"] == 0


async def test_outage_loses_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    """The receiver away (its port closed) for WEBHOOK_OUTAGE seconds (default 3) while
    events keep coming: after it is back every event arrives, in order, none twice (a clean
    stop), with the failed attempts counted as retries."""
    outage = float(os.environ.get("WEBHOOK_OUTAGE", "3"))
    offered: list[dict[str, Any]] = []

    async def offer_for(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            (event,) = events(1, first=len(offered))
            assert hook.offer(event)
            offered.append(event)
            await asyncio.sleep(0.02)

    async with receiving() as receiver, sending(receiver.url, backoff_max=1.0) as hook:
        await offer_for(0.5)
        await receiver.stop()
        await offer_for(outage)
        retries = hook.stats["retries"]
        await receiver.start()
        back = time.monotonic()
        await until(lambda: hook.stats["sent"] == len(offered), within=outage + 30)
        took = time.monotonic() - back
        await offer_for(0.5)
        await until(lambda: hook.stats["sent"] == len(offered))
    got = ids(receiver)
    with capsys.disabled():
        print(
            f"\nwebhook outage of {outage:g} s: {len(offered)} events, {retries} retries during"
            f" it; all arrived {took:.2f} s after the receiver was back;"
            f" {len(got) - len(set(got))} duplicates"
        )
    assert got == [event["id"] for event in offered]
    assert retries > 0
    assert hook.stats["dropped"] == hook.stats["rejected"] == 0


async def test_queue_full_drops_new_events(caplog: pytest.LogCaptureFixture) -> None:
    """A full queue refuses the new event (False, counted, one log line for a burst) and
    never holds more than queue_max; what it holds is sent once the sender runs."""
    async with receiving() as receiver:
        hook = Webhook(receiver.url, SECRET, queue_max=5, **QUICK)
        offered = events(8)
        assert [hook.offer(event) for event in offered] == [True] * 5 + [False] * 3
        assert len(hook) == 5
        assert hook.stats["dropped"] == 3
        drops = [r for r in caplog.records if "event dropped" in r.getMessage()]
        assert len(drops) == 1
        assert drops[0].levelno == logging.ERROR
        hook.start()
        await until(lambda: hook.stats["sent"] == 5)
        assert hook.offer(events(1, first=8)[0])
        await hook.close(deadline=10)
    assert ids(receiver) == [f"ev-{n}" for n in (0, 1, 2, 3, 4, 8)]


async def test_silent_receiver_times_out_and_is_retried() -> None:
    """A receiver that takes the request and never answers: the attempt times out, its
    connection is dropped, and the same batch is sent again until one is answered."""
    async with receiving() as receiver, sending(receiver.url, timeout=0.3) as hook:
        receiver.silent = True
        hook.offer(events(1)[0])
        await until(lambda: hook.stats["retries"] >= 2)
        receiver.silent = False
        await until(lambda: hook.stats["sent"] == 1)
    assert len(receiver.received) == hook.stats["retries"] + 1
    assert {request.body for request in receiver.received} == {receiver.received[0].body}
    assert receiver.connections == len(receiver.received)


async def test_close_gives_up_at_its_deadline(caplog: pytest.LogCaptureFixture) -> None:
    """close() against a receiver that is down returns at its deadline, drops what is
    queued (counted, one line), refuses later events, and can be called again."""
    hook = Webhook(f"http://127.0.0.1:{closed_port()}/", SECRET, **QUICK)
    for event in events(10):
        hook.offer(event)
    hook.start()
    async with asyncio.timeout(5):  # a close() that waited for delivery would never return
        await hook.close(deadline=0.5)
    assert hook.stats["dropped"] == 10
    assert hook.stats["sent"] == 0
    assert hook.stats["retries"] > 0
    assert len(hook) == 0
    assert "closed with 10 events unsent" in caplog.text
    assert not hook.offer(events(1, first=10)[0])
    await hook.close()
    assert hook.stats["dropped"] == 11
    with pytest.raises(RuntimeError, match="closed"):
        hook.start()


def tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A certificate authority, and a certificate for "localhost" it signed with its key:
    the CA's file, the certificate's, and its key's."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wsfanout test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@pytest.mark.parametrize("trusted", [True, False])
async def test_https(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trusted: bool) -> None:
    """https:// verifies the receiver's certificate against the system's CAs (here the
    test's CA through SSL_CERT_FILE) and names the host by SNI; an unknown CA is a failed
    attempt, retried, and nothing is sent in clear."""
    ca, cert, key = tls_files(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    names: list[str | None] = []
    tls.sni_callback = lambda _sock, name, _context: names.append(name)
    if trusted:
        monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    async with receiving(tls) as receiver:
        url = f"https://localhost:{receiver.port}/in"
        async with sending(url) as hook:
            hook.offer(events(1)[0])
            if trusted:
                await until(lambda: hook.stats["sent"] == 1)
            else:
                await until(lambda: hook.stats["retries"] >= 2)
    if trusted:
        assert ids(receiver) == ["ev-0"]
        assert receiver.received[0].headers["host"] == f"localhost:{receiver.port}"
        assert names[0] == "localhost"
    else:
        assert receiver.received == []
        assert hook.stats["sent"] == 0


def test_sign_known_vector() -> None:
    """The signature receivers in any language compute (here: `openssl dgst -hmac`)."""
    body = b'{"events":[{"id":"e1"}]}'
    assert (
        sign("the secret", "1700000000", body)
        == "sha256=7bfabda9edc7913828fee3ac1a7d5b01f218ec6b8153a9a68d2ecfd620fef41b"
    )


BODY = b'{"events":[{"id":"e1"}]}'
NOW = 1_700_000_000.0
GOOD_TS = "1700000000"
GOOD = sign(SECRET, GOOD_TS, BODY)


@pytest.mark.parametrize(
    ("secret", "body", "timestamp", "signature", "expected"),
    [
        (SECRET, BODY, GOOD_TS, GOOD, True),
        (SECRET, BODY, "1700000299", sign(SECRET, "1700000299", BODY), True),
        ("another secret", BODY, GOOD_TS, GOOD, False),
        (SECRET, BODY.replace(b"e1", b"e2"), GOOD_TS, GOOD, False),
        (SECRET, BODY, "1699999699", sign(SECRET, "1699999699", BODY), False),  # 301 s old
        (SECRET, BODY, "1700000301", sign(SECRET, "1700000301", BODY), False),  # 301 s ahead
        (SECRET, BODY, "1700000001", GOOD, False),  # the signature is of another time
        (SECRET, BODY, None, GOOD, False),
        (SECRET, BODY, GOOD_TS, None, False),
        (SECRET, BODY, "", GOOD, False),
        (SECRET, BODY, "1700000000.0", sign(SECRET, "1700000000.0", BODY), False),
        (SECRET, BODY, "-1700000000", GOOD, False),
        (SECRET, BODY, "\uff11\uff17" + "\uff10" * 8, GOOD, False),  # full-width digits
        (SECRET, BODY, "9" * 5000, GOOD, False),
        (SECRET, BODY, GOOD_TS, GOOD.removeprefix("sha256="), False),
        (SECRET, BODY, GOOD_TS, GOOD.upper(), False),
        (SECRET, BODY, GOOD_TS, GOOD[:-1] + "é", False),
        (SECRET, BODY, GOOD_TS, "", False),
        (SECRET, "not bytes", GOOD_TS, GOOD, False),
        (None, BODY, GOOD_TS, GOOD, False),
    ],
)
def test_verify(
    secret: Any, body: Any, timestamp: str | None, signature: str | None, expected: bool
) -> None:
    """verify() takes a good signature within the tolerance and refuses anything else
    (another secret, a changed body, an old or future time, malformed headers), never
    raising."""
    assert verify(secret, body, timestamp, signature, now=NOW) is expected


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/",
        "example.com/hooks",
        "http://",
        "http:///path",
        "https://user:pw@example.com/",
        "http://example.com:99999/",
        "http://example.com/a b",
        "http://example.com/\r\nX: y",
        "http://exämple.com/",
    ],
)
def test_bad_url_refused(url: str) -> None:
    """A URL that is not http(s) with a host (or that could not be sent as is) is refused
    when the webhook is made, saying why."""
    with pytest.raises(ValueError, match="webhook URL"):
        Webhook(url, SECRET)
