"""publishing: targets resolved, backends' batches validated all or nothing, then published."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest

from tests import asgi
from tests.conftest import login
from tests.outboxes import Reader, eventually
from wsfanout import App, Settings, create_app
from wsfanout.protocol import ErrorCode, Kind, ProtocolError, Publish, Source
from wsfanout.publishing import MAX_BATCH, BatchError, Publishing
from wsfanout.store import DatabaseError

SECRET = "a-jwt-secret-of-at-least-thirty-two-bytes"


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[App]:
    """The demo users, with connection tokens on."""
    application = create_app(dataclasses.replace(settings, jwt_secret=SECRET))
    await application.startup()
    yield application
    await application.shutdown()


def publishing(app: App) -> Publishing:
    assert app.service is not None
    return app.service.publishing


@pytest.mark.parametrize(
    ("kind", "target", "resolved"),
    [
        (Kind.BROADCAST, "", ""),
        (Kind.GROUP, "girls", "girls"),
        (Kind.DIRECT, "greg", "greg"),
        (Kind.DIRECT, "GREG", "greg"),  # the exact username
        (Kind.DIRECT, "Amanda", "amanda"),  # a first name
    ],
)
async def test_resolve_finds_the_target(app: App, kind: Kind, target: str, resolved: str) -> None:
    """Groups that exist stay as given; a user, by username or first name, becomes the username."""
    publish = Publish(kind, "hi", target, frame_id="f1")
    found = await publishing(app).resolve(publish)
    assert found == dataclasses.replace(publish, target=resolved)


@pytest.mark.parametrize(
    ("kind", "target", "code"),
    [
        (Kind.GROUP, "chess", ErrorCode.UNKNOWN_GROUP),
        (Kind.DIRECT, "nobody", ErrorCode.UNKNOWN_USER),
        (Kind.DIRECT, "gre", ErrorCode.UNKNOWN_USER),  # never a substring
    ],
)
async def test_resolve_refuses_names_nobody_holds(
    app: App, kind: Kind, target: str, code: ErrorCode
) -> None:
    """A group or user that neither the store nor anyone online has is refused, with the id."""
    with pytest.raises(ProtocolError) as refused:
        await publishing(app).resolve(Publish(kind, "hi", target, frame_id="f2"))
    assert (refused.value.code, refused.value.frame_id) == (code, "f2")


async def test_resolve_takes_names_token_users_hold_online(app: App) -> None:
    """With tokens on, a token user and their group need no row while someone holds them."""
    claims = {"sub": "zed", "groups": ["chess"], "exp": time.time() + 600}
    query = "token=" + jwt.encode(claims, SECRET, algorithm="HS256")
    async with asgi.WebSocket(app, query=query) as zed:
        await zed.receive()  # welcome
        assert (await publishing(app).resolve(Publish(Kind.GROUP, "x", "chess"))).target == "chess"
        assert (await publishing(app).resolve(Publish(Kind.DIRECT, "x", "zed"))).target == "zed"
    with pytest.raises(ProtocolError) as refused:
        await publishing(app).resolve(Publish(Kind.GROUP, "x", "chess"))
    assert refused.value.code is ErrorCode.UNKNOWN_GROUP


async def test_resolve_during_an_outage_is_unavailable(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database that fails makes the publish ``unavailable``, never a crash."""
    assert app.service is not None

    async def failing(*args: object) -> bool:
        raise DatabaseError("connection refused")

    monkeypatch.setattr(app.service.store, "group_exists", failing)
    with pytest.raises(ProtocolError) as refused:
        await publishing(app).resolve(Publish(Kind.GROUP, "x", "nosuch", frame_id="f3"))
    assert (refused.value.code, refused.value.frame_id) == (ErrorCode.UNAVAILABLE, "f3")


async def test_publish_reaches_the_target(app: App) -> None:
    """``publish`` resolves, then hands over: here, delivered at once (no future)."""
    cookie = await login(app, "greg")
    async with asgi.WebSocket(app, headers={"cookie": cookie}) as greg:
        await greg.receive()
        done = await publishing(app).publish(Publish(Kind.DIRECT, "psst", "Greg", sender="mike"))
        assert done is None
        event = await greg.receive()
        assert (event["kind"], event["from"], event["text"]) == ("direct", "mike", "psst")


@pytest.mark.parametrize(
    ("body", "index", "code"),
    [
        ([], 0, ErrorCode.BAD_MESSAGE),
        ([{"type": "broadcast", "text": "x"}] * (MAX_BATCH + 1), 0, ErrorCode.TOO_LARGE),
        ("broadcast", 0, ErrorCode.BAD_MESSAGE),
        (
            [{"type": "broadcast", "text": "x"}, {"type": "group", "text": "x"}],
            1,
            ErrorCode.BAD_MESSAGE,
        ),
        (
            [{"type": "broadcast", "text": "x"}] * 2 + [{"type": "group", "group": "girls"}],
            2,
            ErrorCode.BAD_MESSAGE,
        ),
        ([{"type": "group", "group": "chess", "text": "x"}], 0, ErrorCode.UNKNOWN_GROUP),
        ([{"type": "broadcast", "text": "x", "from": ""}], 0, ErrorCode.BAD_MESSAGE),
        ([{"type": "broadcast", "text": "x" * 70_000}], 0, ErrorCode.TOO_LARGE),
        # Issue 24: 64 KiB of UTF-8, 393,216 bytes once JSON-escaped on the wire.
        (
            [{"type": "broadcast", "text": "ok"}, {"type": "broadcast", "text": "\x01" * 65_536}],
            1,
            ErrorCode.TOO_LARGE,
        ),
        ([{"type": "broadcast", "text": '"' * 32_768 + "a"}], 0, ErrorCode.TOO_LARGE),
    ],
)
async def test_validate_batch_names_the_first_bad_item(
    app: App, body: Any, index: int, code: ErrorCode
) -> None:
    """A bad batch is refused whole, with the index and code of its first bad item."""
    with pytest.raises(BatchError) as refused:
        await publishing(app).validate_batch(body, Source.API)
    assert (refused.value.index, refused.value.code) == (index, code)


async def test_validate_batch_takes_the_largest_text_on_the_wire(app: App) -> None:
    """A text of exactly the limit on the wire (escapes counted) passes; one byte more
    does not, and the error names the limit in wire bytes."""
    largest = "\x01" * 10_922 + "a" * 4  # 65,532 + 4 bytes, once escaped
    batch = await publishing(app).validate_batch({"type": "broadcast", "text": largest}, Source.API)
    assert batch[0].text == largest
    with pytest.raises(BatchError) as refused:
        await publishing(app).validate_batch(
            {"type": "broadcast", "text": largest + "a"}, Source.API
        )
    assert refused.value.code is ErrorCode.TOO_LARGE
    assert "65536 bytes" in refused.value.detail and "65537" in refused.value.detail


async def test_publish_refuses_a_text_too_large_on_the_wire(app: App) -> None:
    """The one check is below every door: a publish handed to ``Publishing.publish``
    directly (as a websocket's is) is measured as it would go out; nothing is sent."""
    cookie = await login(app, "greg")
    async with asgi.WebSocket(app, headers={"cookie": cookie}) as greg:
        await greg.receive()
        big = Publish(Kind.BROADCAST, "\x01" * 65_536, frame_id="f9", sender="mike")
        with pytest.raises(ProtocolError) as refused:
            await publishing(app).publish(big)
        assert (refused.value.code, refused.value.frame_id) == (ErrorCode.TOO_LARGE, "f9")
        assert await greg.nothing(0.2)


async def test_validate_batch_checks_and_resolves_every_item(app: App) -> None:
    """One object or a list; each item resolved, marked with its source and sender."""
    one = await publishing(app).validate_batch({"type": "broadcast", "text": "a"}, Source.AMQP)
    assert one == [Publish(Kind.BROADCAST, "a", sender="system", source=Source.AMQP)]
    items = [
        {"type": "Direct", "user_name": "Lisa", "text": "b", "from": "billing"},
        {"type": "group", "group": "boys", "text": "c", "id": "x"},
    ]
    assert await publishing(app).validate_batch(items, Source.API) == [
        Publish(Kind.DIRECT, "b", "lisa", sender="billing", source=Source.API),
        Publish(Kind.GROUP, "c", "boys", frame_id="x", sender="system", source=Source.API),
    ]


async def test_publish_batch_delivers_in_order(app: App) -> None:
    """Every message of a batch reaches its recipients, in the batch's order."""
    cookie = await login(app, "amanda")
    async with asgi.WebSocket(app, headers={"cookie": cookie}) as amanda:
        await amanda.receive()
        body = [{"type": "group", "group": "girls", "text": str(n)} for n in range(20)]
        batch = await publishing(app).validate_batch(body, Source.API)
        await publishing(app).publish_batch(batch)
        texts = [(await amanda.receive())["text"] for _ in range(20)]
        assert texts == [str(n) for n in range(20)]


async def test_a_batch_waiting_for_room_holds_up_no_other_batch(settings: Settings) -> None:
    """A batch larger than a reader's outbox waits for room (on the local engine); a batch
    sent meanwhile to someone else goes out at once (batches from different publishers do
    not queue behind one another), and each reaches its reader whole and in order."""
    app = create_app(dataclasses.replace(settings, pace_timeout=60.0))
    await app.startup()
    assert app.service is not None
    hub = app.service.hub
    greg, mike = Reader("greg"), Reader("mike")
    for reader in (greg, mike):
        hub.add(reader.outbox)
    mike.read()
    try:
        first, second = (
            [
                Publish(Kind.DIRECT, f"{name}{n} " + "x" * 1_500, name, source=Source.API)
                for n in range(10)
            ]
            for name in ("greg", "mike")
        )
        waiting = asyncio.create_task(publishing(app).publish_batch(first))
        await eventually(lambda: hub.stats.paced > 0)  # greg's outbox is full: it waits
        await asyncio.wait_for(publishing(app).publish_batch(second), 10)
        assert not waiting.done()
        await eventually(lambda: len(mike.texts()) == 10)
        assert mike.texts() == [publish.text for publish in second]
        greg.read()
        await asyncio.wait_for(waiting, 10)
        await eventually(lambda: len(greg.texts()) == 10)
        assert greg.texts() == [publish.text for publish in first]
        assert greg.outbox.close_code is None
    finally:
        for reader in (greg, mike):
            hub.remove(reader.outbox)
            await reader.close()
        await app.shutdown()
