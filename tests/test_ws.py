"""ws: handshake checks, publishing, error frames and close codes, in-process."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import urllib.parse
from typing import Any

import orjson
import pytest

from tests import asgi
from tests.asgi import resume_query, until
from tests.conftest import login, started
from wsfanout import App, Settings, create_app
from wsfanout.inbound import SLOW_LANE_PER_TURN
from wsfanout.sessions import COOKIE_NAME, SessionCodec
from wsfanout.store import DatabaseError


def connect(app: App, cookie: str | None, **headers: str) -> asgi.WebSocket:
    if cookie:
        headers["cookie"] = cookie
    return asgi.WebSocket(app, headers=headers)


async def expect_message(ws: asgi.WebSocket) -> dict[str, Any]:
    event: dict[str, Any] = await ws.receive()
    assert event["type"] == "message", event
    return event


@pytest.mark.parametrize("extension", [True, False])
async def test_anonymous_is_refused(app: App, extension: bool) -> None:
    """No session: refused before accept (a 403 body, or a close before accept)."""
    with pytest.raises(asgi.Refused) as caught:
        async with asgi.WebSocket(app, http_response_extension=extension):
            pass
    assert caught.value.status == (403 if extension else None)


async def test_tampered_and_foreign_cookies_are_refused(app: App, settings: Settings) -> None:
    """A forged cookie, one from another key, or one for a deleted user is refused."""
    cookie = await login(app, "greg")
    forged = cookie[:-4] + "AAAA"
    other = SessionCodec(("another-key",), 60).issue(1, "greg", "s1")
    ghost = SessionCodec(settings.secret_keys, 60).issue(999, "ghost", "s2")
    for bad in (forged, f"{COOKIE_NAME}={other}", f"{COOKIE_NAME}={ghost}"):
        with pytest.raises(asgi.Refused) as caught:
            async with connect(app, bad):
                pass
        assert caught.value.status == 403


async def test_foreign_origin_is_refused(app: App) -> None:
    """A logged-in browser on another site cannot open the socket."""
    cookie = await login(app, "greg")
    with pytest.raises(asgi.Refused) as caught:
        async with connect(app, cookie, origin="http://evil.example"):
            pass
    assert caught.value.status == 403
    async with connect(app, cookie, origin="http://testserver") as ws:
        assert (await ws.receive())["type"] == "welcome"


@pytest.mark.parametrize("owner", [True, False])
async def test_headers_go_once_accepted_where_wsfanout_owns_the_process(
    app: App, owner: bool
) -> None:
    """``wsfanout:app`` owns its process: once a connection is accepted, nothing reads its
    handshake's headers, and the scope lets them go (a browser's are ~20 objects per idle
    connection). A host's app (``create_app``) leaves the scope as it came."""
    app.owns_process = owner
    cookie = await login(app, "greg")
    async with connect(app, cookie, origin="http://testserver", user_agent="Chrome") as ws:
        assert (await ws.receive())["type"] == "welcome"
        if owner:
            assert ws.scope["headers"] == ()
        else:
            assert (b"user_agent", b"Chrome") in ws.scope["headers"]
        await ws.send_json({"type": "broadcast", "text": "still served", "id": "1"})
        assert {(await ws.receive())["type"], (await ws.receive())["type"]} == {"message", "ack"}


def writers() -> int:
    """Connections' writer tasks running now (Outbox.run)."""
    return sum(1 for task in asyncio.all_tasks() if "Outbox.run" in repr(task.get_coro()))


async def test_a_writer_task_starts_only_for_a_client_that_does_not_keep_up(app: App) -> None:
    """Idle connections, and those whose sends complete at once, have no writer task; a
    client whose send blocks gets one, which delivers what waited once it reads."""
    cookies = [await login(app, name) for name in ("greg", "amanda")]
    async with connect(app, cookies[0]) as g, connect(app, cookies[1]) as a:
        assert (await g.receive())["type"] == "welcome"
        assert (await a.receive())["type"] == "welcome"
        await g.send_json({"type": "broadcast", "text": "one"})
        assert (await a.receive())["text"] == "one"
        assert writers() == 0
        a.reading.clear()  # amanda's socket is full: a send to her blocks
        await g.send_json({"type": "broadcast", "text": "two"})
        await g.send_json({"type": "broadcast", "text": "three"})
        for _ in range(100):  # the flusher runs, its send blocks, the writer takes it over
            if writers():
                break
            await asyncio.sleep(0.01)
        assert writers() == 1
        a.reading.set()
        assert [(await a.receive())["text"] for _ in range(2)] == ["two", "three"]
    assert writers() == 0


async def test_welcome_and_fan_out(app: App) -> None:
    """welcome names the user and groups; broadcast, group and direct reach the right sockets."""
    greg, amanda, mike = [await login(app, name) for name in ("greg", "amanda", "mike")]
    async with connect(app, greg) as g, connect(app, amanda) as a, connect(app, mike) as m:
        welcome = await g.receive()
        assert welcome == {
            "type": "welcome",
            "user": "greg",
            "first_name": "Greg",
            "groups": ["boys"],
            "streams": {
                name: {"epoch": welcome["streams"][name]["epoch"], "offset": 0}
                for name in ("all", "group:boys", "user:greg")
            },
        }
        await a.receive(), await m.receive()
        await g.send_json({"type": "BroadCast", "text": "all", "id": "b1"})
        assert (await expect_message(g))["text"] == "all"  # the sender is one of everyone
        assert await g.receive() == {"type": "ack", "id": "b1"}
        for ws in (a, m):
            assert (await expect_message(ws))["text"] == "all"
        await g.send_json({"type": "Group", "group": "girls", "text": "nails"})
        event = await expect_message(a)
        assert (event["kind"], event["from"], event["group"]) == ("group", "greg", "girls")
        await g.send_json({"type": "Direct", "user_name": "Mike", "text": "psst"})
        event = await expect_message(m)
        assert (event["kind"], event["to"], event["text"]) == ("direct", "mike", "psst")
        assert await a.nothing()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{not json", "bad_json"),
        ('{"type": "shout", "text": "x"}', "bad_message"),
        ('{"type": "group", "group": "chess", "text": "x"}', "unknown_group"),
        ('{"type": "direct", "user_name": "mik", "text": "x"}', "unknown_user"),
        ('{"type": "broadcast"}', "bad_message"),
    ],
)
async def test_error_frames_keep_the_connection(app: App, frame: str, code: str) -> None:
    """Each bad frame gets an error to the sender only, and the socket still works."""
    greg, lisa = await login(app, "greg"), await login(app, "lisa")
    async with connect(app, greg) as g, connect(app, lisa) as other:
        await g.receive(), await other.receive()
        await g.send_text(frame)
        error = await g.receive()
        assert error["type"] == "error" and error["code"] == code and error["detail"]
        assert await other.nothing()
        await g.send_json({"type": "broadcast", "text": "still here", "id": "after"})
        received = [await g.receive(), await g.receive()]
        assert {"type": "ack", "id": "after"} in received


async def test_binary_frames_are_bad_messages(app: App) -> None:
    """A binary frame is answered with bad_message, not a crash."""
    async with connect(app, await login(app, "greg")) as ws:
        await ws.receive()
        await ws.send_bytes(b'{"type": "broadcast", "text": "x"}')
        assert (await ws.receive())["code"] == "bad_message"


async def test_error_echoes_frame_id(app: App) -> None:
    """An error for a frame with an id carries that id."""
    async with connect(app, await login(app, "greg")) as ws:
        await ws.receive()
        await ws.send_json({"type": "group", "group": "nope", "text": "x", "id": "c7"})
        assert await ws.receive() == {
            "type": "error",
            "code": "unknown_group",
            "detail": "no group named 'nope'",
            "id": "c7",
        }


async def test_too_large_frame_closes_1009(app: App) -> None:
    """A frame over the limit gets too_large, then a 1009 close."""
    async with connect(app, await login(app, "greg")) as ws:
        await ws.receive()
        await ws.send_text('{"type": "broadcast", "text": "' + "é" * 40_000 + '"}')
        assert (await ws.receive())["code"] == "too_large"
        with pytest.raises(asgi.Closed) as caught:
            await ws.receive()
        assert caught.value.code == 1009


def largest_frame(limit: int, escape: str) -> str:
    """A publish frame of exactly ``limit`` bytes whose text is ``escape`` repeated (after
    an ``a``, so that no text is all whitespace)."""
    head, tail = '{"type": "broadcast", "id": "big", "text": "a', '"}'
    room = limit - len(head) - len(tail)
    size = len(escape.encode())
    return head + escape * (room // size) + "a" * (room % size) + tail


@pytest.mark.parametrize("escape", ["\\u0001", '\\"', "\\n", "\\u00e9", "\\u2028", "é"])
async def test_a_frame_within_the_limit_is_never_too_large_afterwards(
    app: App, settings: Settings, escape: str
) -> None:
    """The largest frame a user may send, its text all escapes (or all non-ASCII), is
    published: its text goes out in no more bytes than the frame held it in, so the size
    check below every door never refuses what the inbound check took. The issue's 65,536
    escaped U+0001 are one frame over the limit: too_large, 1009, nothing published."""
    limit = settings.max_frame_bytes
    frame = largest_frame(limit, escape)
    assert len(frame.encode()) == limit
    async with (
        connect(app, await login(app, "greg")) as greg,
        connect(app, await login(app, "mike")) as mike,
    ):
        await greg.receive(), await mike.receive()
        await mike.send_text(frame)
        event = await expect_message(greg)
        assert event["text"] == orjson.loads(frame)["text"]
        assert (await until(mike, "ack"))[1]["id"] == "big"
        await mike.send_text('{"type": "broadcast", "text": "' + "\\u0001" * 65_536 + '"}')
        assert (await until(mike, "error"))[1]["code"] == "too_large"
        with pytest.raises(asgi.Closed) as caught:
            await mike.receive()
        assert caught.value.code == 1009
        assert await greg.nothing(0.2)


async def test_rate_limit(settings: Settings) -> None:
    """Past the burst, frames are not published: the first gets rate_limited, the rest of
    that second are dropped without an answer (a flood must not be answered frame by frame)."""
    async with (
        started(settings, rate_limit=1.0, rate_burst=3) as app,
        connect(app, await login(app, "greg")) as ws,
    ):
        await ws.receive()
        for n in range(6):
            await ws.send_json({"type": "direct", "user_name": "greg", "text": str(n)})
        events = [await ws.receive() for _ in range(4)]
        assert [e["text"] for e in events if e["type"] == "message"] == ["0", "1", "2"]
        assert [e["code"] for e in events if e["type"] == "error"] == ["rate_limited"]
        assert await ws.nothing(0.3)
        assert ws.close_code is None


async def test_requests_over_the_rate_are_answered_with_their_id(settings: Settings) -> None:
    """A client's request over the rate (a frame with an ``id``) is answered rate_limited
    with that id, so its sender learns its fate instead of waiting for an answer."""
    async with (
        started(settings, rate_limit=1.0, rate_burst=3) as app,
        connect(app, await login(app, "greg")) as ws,
    ):
        await ws.receive()
        for n in range(6):
            await ws.send_json({"type": "broadcast", "text": str(n), "id": f"m{n}"})
        answers: dict[str, str] = {}
        while len(answers) < 6:
            event = await ws.receive()
            if event["type"] in ("ack", "error"):
                answers[event["id"]] = event.get("code", "ack")
        assert answers == {
            "m0": "ack",
            "m1": "ack",
            "m2": "ack",
            "m3": "rate_limited",
            "m4": "rate_limited",
            "m5": "rate_limited",
        }
        assert ws.close_code is None


async def test_a_client_that_keeps_flooding_is_closed_1008(settings: Settings) -> None:
    """More than the burst of frames over the rate within a second of the rate_limited
    error: a last rate_limited error and a 1008 close; counted in /metrics."""
    async with started(settings, rate_limit=1.0, rate_burst=3) as app:
        async with connect(app, await login(app, "greg")) as ws:
            await ws.receive()
            for _ in range(3 + 1 + 3):  # the burst, the one told, and three dropped: still open
                await ws.send_text("{")
            codes = [(await ws.receive())["code"] for _ in range(4)]
            assert codes == ["bad_json"] * 3 + ["rate_limited"]
            assert await ws.nothing(0.2)
            await ws.send_text("{")  # the fourth over the burst
            await closed_as_a_flood(
                ws, "rate_limited", "more than 3 messages over the rate limit in 1 s: closing"
            )
        metrics = await asgi.request(app, "GET", "/metrics")
        assert "wsfanout_flood_disconnects_total 1.0" in metrics.body.decode()


async def test_a_client_sending_only_refused_messages_is_closed_1008(settings: Settings) -> None:
    """Within the rate, but nothing but refused messages (a flood of bad frames processed
    slowly, or a client that never reads its errors): after the burst's worth in a row, a
    last error and a 1008 close. A good message in between starts the count again."""
    async with (
        started(settings, rate_limit=0.0, rate_burst=3) as app,
        connect(app, await login(app, "greg")) as ws,
    ):
        await ws.receive()
        for text in ["{", "{", "{", '{"type": "broadcast", "text": "ok"}', "{", "{", "{"]:
            await ws.send_text(text)
        events = [await ws.receive() for _ in range(7)]
        assert [e.get("code", e["type"]) for e in events] == ["bad_json"] * 3 + ["message"] + [
            "bad_json"
        ] * 3
        assert await ws.nothing(0.2)
        await ws.send_json({"type": "group", "group": "nobody", "text": "x"})
        assert (await ws.receive())["code"] == "unknown_group"
        await closed_as_a_flood(ws, "bad_message", "4 messages in a row refused: closing")


async def test_flooding_connections_share_a_few_frames_per_turn_of_the_loop(
    settings: Settings,
) -> None:
    """30 connections each send 40 bad frames at once (not yet a flood: the burst is large):
    after its first, a connection reads its next frame only when the slow lane lets it on, so
    no more than the lane's few frames are read per turn of the loop in all (it was one per
    connection, 30 a turn, and another user's message waited behind them each turn); and
    every frame is still answered."""
    flooders, frames = 30, 40
    async with (
        started(settings, rate_limit=0.0, rate_burst=10_000) as app,
        contextlib.AsyncExitStack() as stack,
    ):
        cookie = await login(app, "anny")
        sockets = [await stack.enter_async_context(connect(app, cookie)) for _ in range(flooders)]
        for ws in sockets:
            assert (await ws.receive())["type"] == "welcome"
            for _ in range(frames):
                ws.to_app.put_nowait({"type": "websocket.receive", "text": "{"})
        left, read = flooders * frames, []  # frames read in each turn of the loop
        while left:
            await asyncio.sleep(0)  # one turn
            now = sum(ws.to_app.qsize() for ws in sockets)
            read.append(left - now)
            left = now
            assert len(read) < 10 * flooders * frames, read
        # Each connection's first frame is read as it arrives, in the first turn or two.
        assert max(read[2:]) <= SLOW_LANE_PER_TURN, read
        for ws in sockets:
            codes = [(await ws.receive())["code"] for _ in range(frames)]
            assert codes == ["bad_json"] * frames


async def closed_as_a_flood(ws: asgi.WebSocket, code: str, detail: str) -> None:
    """The last error says why (``code``, ``detail``), then the connection closes with 1008."""
    last = await ws.receive()
    assert (last["code"], last["detail"]) == (code, detail)
    with pytest.raises(asgi.Closed) as caught:
        await ws.receive()
    assert caught.value.code == 1008


async def test_reading_pauses_while_the_outbox_is_full(settings: Settings) -> None:
    """A client that does not read what it is sent has its own frames left unread (the
    server's queue, then TCP, hold them back) until its outbox is down to a quarter."""
    async with (
        started(settings, outbox_bytes=8192) as app,
        connect(app, await login(app, "greg")) as greg,
        connect(app, await login(app, "mike")) as mike,
    ):
        await greg.receive()
        await mike.receive()
        mike.reading.clear()
        for n in range(41):  # the first is mike's send in flight; the rest, 7 KiB, queue
            await greg.send_json(
                {"type": "direct", "user_name": "mike", "text": f"{n:03d}" + "x" * 60}
            )
            if n == 0:  # greg's frames are all read (and sent on) once he has this one
                await greg.send_json({"type": "direct", "user_name": "greg", "text": "sent"})
                assert (await greg.receive())["text"] == "sent"
        await greg.send_json({"type": "direct", "user_name": "greg", "text": "all sent"})
        assert (await greg.receive())["text"] == "all sent"
        await mike.send_json({"type": "direct", "user_name": "greg", "text": "held back"})
        assert await greg.nothing(0.3)
        mike.reading.set()  # mike reads again: his outbox drains, his frame is read
        event = await greg.receive()
        assert (event["type"], event["text"]) == ("message", "held back")
        assert [(await mike.receive())["text"][:3] for _ in range(41)] == [
            f"{n:03d}" for n in range(41)
        ]


async def test_expired_session_closes_1008(settings: Settings) -> None:
    """A session that expires while connected gets forbidden and a 1008 close."""
    now = [time.time()]
    app = create_app(dataclasses.replace(settings, session_max_age=60), clock=lambda: now[0])
    await app.startup()
    try:
        async with connect(app, await login(app, "greg")) as ws:
            await ws.receive()
            await ws.send_json({"type": "broadcast", "text": "in time", "id": "a"})
            assert [(await ws.receive())["type"] for _ in range(2)] == ["message", "ack"]
            now[0] += 61
            await ws.send_json({"type": "broadcast", "text": "late"})
            assert (await ws.receive())["code"] == "forbidden"
            with pytest.raises(asgi.Closed) as caught:
                await ws.receive()
            assert caught.value.code == 1008
    finally:
        await app.shutdown()


async def test_slow_consumer_is_closed_1013(settings: Settings) -> None:
    """A connection whose outbox passes its bound is closed with 1013; others go on."""
    async with started(settings, outbox_bytes=4096) as app:
        greg = await login(app, "greg")
        async with connect(app, greg) as fast:
            slow = connect(app, await login(app, "mike"))
            await slow.__aenter__()
            await slow.receive()
            await fast.receive()
            # From now on mike's sends never complete: his writer is stuck, his outbox fills.
            slow.reading.clear()
            texts = []
            for n in range(60):
                await fast.send_json({"type": "broadcast", "text": f"{n:03d}" + "x" * 100})
                texts.append((await expect_message(fast))["text"][:3])
            assert texts == [f"{n:03d}" for n in range(60)]
            svc = app.service
            assert svc is not None and svc.hub.stats.slow_consumers == 1
            assert len(svc.hub) == 1
            slow.reading.set()
            events = await slow.until_closed()
            assert slow.close_code == 1013
            assert len(events) < 60  # what was queued was dropped, not delivered late
            await slow.__aexit__(None, None, None)


async def test_shutdown_closes_1001(app: App) -> None:
    """Shutting the app down closes every socket with 1001 and refuses new ones."""
    async with connect(app, await login(app, "greg")) as ws:
        await ws.receive()
        await app.shutdown()
        with pytest.raises(asgi.Closed) as caught:
            await ws.receive()
        assert caught.value.code == 1001


async def test_database_failure_is_unavailable(app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing database answers unavailable; the connection stays open."""
    async with connect(app, await login(app, "greg")) as ws:
        await ws.receive()
        assert app.service is not None

        async def broken(name: str) -> bool:
            raise DatabaseError("SQLite x: disk I/O error")

        monkeypatch.setattr(app.service.store, "group_exists", broken)
        # girls: nobody connected here is a member, so the database must be asked.
        await ws.send_json({"type": "group", "group": "girls", "text": "x", "id": "g"})
        assert (await ws.receive())["code"] == "unavailable"
        await ws.send_json({"type": "group", "group": "boys", "text": "no database needed"})
        assert (await expect_message(ws))["text"] == "no database needed"
        await ws.send_json({"type": "broadcast", "text": "still fine"})
        assert (await expect_message(ws))["text"] == "still fine"


async def test_connection_limit_is_503(settings: Settings) -> None:
    """Past WSFANOUT_MAX_CONNECTIONS, handshakes are refused with 503."""
    async with started(settings, max_connections=2) as app:
        cookie = await login(app, "greg")
        async with connect(app, cookie) as one, connect(app, cookie) as two:
            await one.receive(), await two.receive()
            with pytest.raises(asgi.Refused) as caught:
                async with connect(app, cookie):
                    pass
            assert caught.value.status == 503
            assert b"too many connections" in caught.value.body


async def test_a_flood_from_one_socket_does_not_stall_the_others(settings: Settings) -> None:
    """3000 bad frames queued at once on one socket: another socket's broadcast is handled
    long before the flood is through (the flooder sees it early in its own stream)."""
    async with (
        started(settings, rate_limit=0) as app,
        connect(app, await login(app, "greg")) as flooder,
        connect(app, await login(app, "lisa")) as other,
    ):
        await flooder.receive(), await other.receive()
        for n in range(3000):
            flooder.to_app.put_nowait({"type": "websocket.receive", "text": f"bad {n}"})
        await other.send_json({"type": "broadcast", "text": "still here"})
        seen = 0
        while True:
            event = await flooder.receive()
            if event["type"] == "message":
                break
            seen += 1
        assert event["text"] == "still here"
        assert seen < 300, seen  # without yielding it would come after all 3000


# Streams, positions and resume (DESIGN 5.1); presence (DESIGN 5.2)


async def broadcast(ws: asgi.WebSocket, *texts: str) -> None:
    """Send broadcasts and wait for each one's ack (so each is published)."""
    for text in texts:
        await ws.send_json({"type": "broadcast", "text": text, "id": text})
        before, _ = await until(ws, "ack")
        assert all(event["type"] == "message" for event in before)


async def test_messages_carry_their_stream_and_offset(app: App) -> None:
    """Every message names its stream, and offsets count up by one per stream."""
    greg, mike = await login(app, "greg"), await login(app, "mike")
    async with connect(app, greg) as g, connect(app, mike) as m:
        welcome = await g.receive()
        await m.receive()
        start = welcome["streams"]["all"]["offset"]
        await g.send_json({"type": "broadcast", "text": "one"})
        await g.send_json({"type": "group", "group": "boys", "text": "two"})
        await g.send_json({"type": "direct", "user_name": "mike", "text": "three"})
        await g.send_json({"type": "broadcast", "text": "four"})
        got = [(e["stream"], e["offset"], e["text"]) for e in [await m.receive() for _ in range(4)]]
        assert got == [
            ("all", start + 1, "one"),
            ("group:boys", welcome["streams"]["group:boys"]["offset"] + 1, "two"),
            ("user:mike", 1, "three"),
            ("all", start + 2, "four"),
        ]


async def test_resume_replays_exactly_what_was_missed_then_goes_live(app: App) -> None:
    """A client that comes back with its positions gets the missed messages of each of its
    streams in order, then resumed (recovered, missed), then live ones; nothing twice."""
    greg, amanda = await login(app, "greg"), await login(app, "amanda")
    async with connect(app, greg) as g:
        welcome = await g.receive()
        async with connect(app, amanda) as a:
            await a.receive()
            await broadcast(a, "seen")
            seen = await g.receive()
        positions = dict(welcome["streams"])
        positions["all"] = {"epoch": positions["all"]["epoch"], "offset": seen["offset"]}
    async with connect(app, amanda) as a:
        await a.receive()
        await broadcast(a, "missed 1", "missed 2")
        await a.send_json({"type": "direct", "user_name": "greg", "text": "missed 3"})
        await a.send_json({"type": "group", "group": "girls", "text": "not greg's"})
        await until(a, "message")
        async with asgi.WebSocket(
            app, headers={"cookie": greg}, query=resume_query(positions)
        ) as g:
            replay, resumed = await until(g, "resumed")
            assert replay[0]["type"] == "welcome"
            assert [e["text"] for e in replay[1:]] == ["missed 1", "missed 2", "missed 3"]
            assert resumed == {"type": "resumed", "recovered": True, "missed": 3}
            await broadcast(a, "live")
            assert (await g.receive())["text"] == "live"
            assert await g.nothing()


async def test_resume_from_another_epoch_or_past_the_history_is_lost(settings: Settings) -> None:
    """A stale epoch, or a gap longer than the history, is not replayed: resumed says
    recovered false and names the streams (the others are still replayed)."""
    async with started(settings, history_size=3) as app:
        greg, mike = await login(app, "greg"), await login(app, "mike")
        async with connect(app, greg) as g:
            welcome = (await g.receive())["streams"]
        async with connect(app, mike) as m:
            await m.receive()
            await broadcast(m, *"abcde")
            await m.send_json({"type": "group", "group": "boys", "text": "boys"})
            await until(m, "message")
        positions = {
            "all": welcome["all"],
            "group:boys": welcome["group:boys"],
            "user:greg": {"epoch": "stale", "offset": 0},
            "group:girls": {"epoch": "not mine", "offset": 0},  # not greg's: ignored
        }
        async with asgi.WebSocket(
            app, headers={"cookie": greg}, query=resume_query(positions)
        ) as g:
            replay, resumed = await until(g, "resumed")
            assert [e.get("text") for e in replay[1:]] == ["boys"]
            assert resumed == {
                "type": "resumed",
                "recovered": False,
                "missed": 1,
                "lost": ["all", "user:greg"],
            }


async def test_resume_is_read_however_its_name_is_encoded(app: App) -> None:
    """A query parameter named resume is one, even with its name percent-encoded; other
    parameters, however odd, are not the handshake's business."""
    greg = await login(app, "greg")
    query = "x=%FF&re%73ume=" + urllib.parse.quote('{"all": {"epoch": "e", "offset": 0}}')
    async with asgi.WebSocket(app, headers={"cookie": greg}, query=query) as g:
        _, resumed = await until(g, "resumed")
        assert resumed["lost"] == ["all"]
    async with asgi.WebSocket(app, headers={"cookie": greg}, query="x=%FF%FE&y") as g:
        assert (await g.receive())["type"] == "welcome"


async def test_a_restart_without_redis_is_a_new_epoch(settings: Settings) -> None:
    """History lives in memory on one node: after a restart every epoch is new."""
    app = create_app(settings)
    await app.startup()
    greg = await login(app, "greg")
    async with connect(app, greg) as g:
        before = (await g.receive())["streams"]
    await app.shutdown()
    app = create_app(settings)
    await app.startup()
    try:
        async with asgi.WebSocket(app, headers={"cookie": greg}, query=resume_query(before)) as g:
            welcome, resumed = await until(g, "resumed")
            assert all(welcome[0]["streams"][s]["epoch"] != before[s]["epoch"] for s in before)
            assert resumed["recovered"] is False and sorted(resumed["lost"]) == sorted(before)
    finally:
        await app.shutdown()


@pytest.mark.parametrize(
    "query",
    [
        "resume=nonsense",
        "resume=%7B%22all%22%3A%205%7D",
        "resume=%FF%FE",
        "resume=%7B%7D&resume=%7B%7D",
        "resume=" + "%7B" * 10_000,
    ],
)
async def test_a_malformed_resume_is_400(app: App, query: str) -> None:
    """A malformed resume refuses the handshake with 400 and a JSON reason."""
    greg = await login(app, "greg")
    with pytest.raises(asgi.Refused) as caught:
        async with asgi.WebSocket(app, headers={"cookie": greg}, query=query):
            pass
    assert caught.value.status == 400
    assert "resume" in orjson.loads(caught.value.body)["error"]
    async with connect(app, greg) as g:  # and the seat was given back
        assert (await g.receive())["type"] == "welcome"


async def test_history_off_has_no_offsets_and_recovers_nothing(settings: Settings) -> None:
    async with started(settings, history_size=0) as app:
        greg = await login(app, "greg")
        query = resume_query(
            {"all": {"epoch": "e", "offset": 1}, "chess": {"epoch": "e", "offset": 1}}
        )
        async with asgi.WebSocket(app, headers={"cookie": greg}, query=query) as g:
            welcome, resumed = await until(g, "resumed")
            assert "streams" not in welcome[0]
            assert resumed == {"type": "resumed", "recovered": False, "missed": 0, "lost": ["all"]}
            await broadcast(g, "hi")


async def test_presence_requests_and_online_offline_events(settings: Settings) -> None:
    """A member asks who of a group is online; a non-member is forbidden. A user's first
    connection and last disconnection (not every tab's) reach their small groups."""
    async with started(settings, presence_events_max=3) as app:
        amanda, lisa, greg = [await login(app, name) for name in ("amanda", "lisa", "greg")]
        async with connect(app, amanda) as a:
            await a.receive()
            assert await a.receive() == {"type": "online", "user": "amanda", "group": "girls"}
            async with connect(app, lisa) as first_tab, connect(app, greg) as g:
                await first_tab.receive()
                assert await a.receive() == {"type": "online", "user": "lisa", "group": "girls"}
                async with connect(app, lisa) as second_tab:
                    await second_tab.receive()
                    await a.send_json({"type": "presence", "group": "girls", "id": "p1"})
                    assert await a.receive() == {
                        "type": "presence",
                        "group": "girls",
                        "online": ["amanda", "lisa"],
                        "count": 2,
                        "events": True,
                        "id": "p1",
                    }
                    await g.receive()
                    await g.send_json({"type": "presence", "group": "girls", "id": "p2"})
                    _, error = await until(g, "error")
                    assert (error["code"], error["id"]) == ("forbidden", "p2")
                assert await a.nothing(0.2)  # lisa still has a tab open
            assert await a.receive() == {"type": "offline", "user": "lisa", "group": "girls"}
            assert await a.nothing(0.2)  # greg is not in girls


async def test_large_groups_get_no_presence_events(settings: Settings) -> None:
    """A group with more members than presence_events_max gets no online/offline events;
    its count is still there."""
    async with started(settings, presence_events_max=2) as app:
        amanda, lisa = await login(app, "amanda"), await login(app, "lisa")
        async with connect(app, amanda) as a, connect(app, lisa) as b:
            await a.receive(), await b.receive()
            assert await a.nothing(0.2)
            await a.send_json({"type": "presence", "group": "girls"})
            answer = await a.receive()
            assert (answer["online"], answer["count"], answer["events"]) == (
                ["amanda", "lisa"],
                2,
                False,  # no events: a client asks again when it wants to know
            )


async def test_a_replay_larger_than_an_outbox_is_lost_not_sent(settings: Settings) -> None:
    """What a resume replays is bounded like the outbox: a stream whose missed messages
    would pass WSFANOUT_OUTBOX_BYTES is reported lost; smaller ones are still replayed."""
    async with started(settings, outbox_bytes=4096) as app:
        greg, mike = await login(app, "greg"), await login(app, "mike")
        async with connect(app, greg) as g:
            welcome = (await g.receive())["streams"]
        async with connect(app, mike) as m:
            await m.receive()
            for n in range(20):
                await m.send_json({"type": "broadcast", "text": f"{n:03d}" + "x" * 300})
                await until(m, "message")  # mike reads his, or his own outbox overflows
            await m.send_json({"type": "group", "group": "boys", "text": "small", "id": "s"})
            await until(m, "ack")
        async with asgi.WebSocket(app, headers={"cookie": greg}, query=resume_query(welcome)) as g:
            before, resumed = await until(g, "resumed")
            assert [e["text"] for e in before[1:]] == ["small"]
            assert resumed == {"type": "resumed", "recovered": False, "missed": 1, "lost": ["all"]}


async def test_a_client_that_does_not_read_its_welcome_is_closed_1013(settings: Settings) -> None:
    """The welcome and replay are sent before the writer starts; a client that does not
    read them is closed like a slow consumer after WSFANOUT_SEND_TIMEOUT."""
    async with started(settings, send_timeout=0.3) as app:
        ws = asgi.WebSocket(app, headers={"cookie": await login(app, "greg")}, reads=False)
        async with ws:
            await asyncio.sleep(0.5)
            ws.reading.set()
            assert await ws.until_closed() == []
            assert ws.close_code == 1013


async def test_a_replay_is_batched_by_bytes_as_the_outbox_batches(settings: Settings) -> None:
    """A replay of non-ASCII messages goes out in frames of at most WSFANOUT_BATCH_BYTES
    bytes of UTF-8 (not characters), as live frames do."""
    async with started(settings, batch_bytes=1000) as app:
        greg, amanda = await login(app, "greg"), await login(app, "amanda")
        async with connect(app, greg) as g:
            positions = dict((await g.receive())["streams"])
        async with connect(app, amanda) as a:
            await a.receive()
            for n in range(6):  # about 330 characters and 530 bytes each, as an event
                await a.send_json(
                    {
                        "type": "direct",
                        "user_name": "greg",
                        "text": f"{n}" + "é" * 200,
                        "id": str(n),
                    }
                )
            await until(a, "ack")
        async with asgi.WebSocket(
            app, headers={"cookie": greg}, query=resume_query(positions)
        ) as g:
            frames: list[str] = []
            while not frames or '"resumed"' not in frames[-1]:
                frames.append((await asyncio.wait_for(g.from_app.get(), 5))["text"])
    replayed = [orjson.loads(frame) for frame in frames[1:-1]]
    events = [
        event for frame in replayed for event in (frame if isinstance(frame, list) else [frame])
    ]
    assert [event["text"][0] for event in events] == list("012345")
    assert all(len(frame.encode()) <= 1000 for frame in frames[1:-1]), [
        len(f.encode()) for f in frames
    ]


# History on request (DESIGN 5.4)


async def ask(ws: asgi.WebSocket, request: dict[str, Any]) -> dict[str, Any]:
    """Send a request and return its answer (a history or an error frame with its id)."""
    await ws.send_json({**request, "id": "h"})
    while True:
        event: dict[str, Any] = await ws.receive()
        if event.get("id") == "h":
            return event


async def test_history_answers_a_streams_last_messages(settings: Settings) -> None:
    """A listener asks a stream's last N messages: the epoch and offset it stands at, and
    the messages as they went out live, oldest first; never more than the history keeps."""
    async with started(settings, history_size=4) as app:
        greg = await login(app, "greg")
        async with connect(app, greg) as g:
            welcome = await g.receive()
            start = welcome["streams"]["all"]
            live = []
            for text in "abcde":
                await g.send_json({"type": "broadcast", "text": text})
                live.append(await expect_message(g))
            answer = await ask(g, {"type": "history", "stream": "all", "limit": 3})
            assert answer == {
                "type": "history",
                "stream": "all",
                "epoch": start["epoch"],
                "offset": start["offset"] + 5,
                "messages": live[2:],
                "id": "h",
            }
            assert [m["text"] for m in live[2:]] == ["c", "d", "e"]
            kept = await ask(g, {"type": "History", "stream": "all", "limit": 1000})
            assert [m["text"] for m in kept["messages"]] == ["b", "c", "d", "e"]  # 4 kept
            assert (await ask(g, {"type": "history", "stream": "all"}))["messages"] == (
                kept["messages"]
            )
            assert (await ask(g, {"type": "history", "stream": "all", "limit": 0}))[
                "messages"
            ] == []
            own = await ask(g, {"type": "history", "stream": "user:GREG"})  # a name's any case
            assert (own["stream"], own["offset"], own["messages"]) == ("user:greg", 0, [])
            assert own["epoch"] == welcome["streams"]["user:greg"]["epoch"]


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        ({"type": "history", "stream": "group:girls"}, "forbidden"),  # greg is in boys
        ({"type": "history", "stream": "user:mike"}, "forbidden"),
        ({"type": "history", "stream": "group:nobody"}, "forbidden"),
        ({"type": "history"}, "bad_message"),
        ({"type": "history", "stream": "chess"}, "bad_message"),
        ({"type": "history", "stream": "group:"}, "bad_message"),
        ({"type": "history", "stream": 7}, "bad_message"),
        ({"type": "history", "stream": "all", "limit": -1}, "bad_message"),
        ({"type": "history", "stream": "all", "limit": "5"}, "bad_message"),
        ({"type": "history", "stream": "all", "limit": True}, "bad_message"),
    ],
)
async def test_history_of_a_stream_not_listened_to_is_refused(
    app: App, request_: dict[str, Any], code: str
) -> None:
    """Only the streams a connection listens to; a malformed request is bad_message."""
    async with connect(app, await login(app, "greg")) as g:
        await g.receive()
        answer = await ask(g, request_)
        assert (answer["type"], answer["code"]) == ("error", code)
        await broadcast(g, "still open")


async def test_history_off_answers_no_messages(settings: Settings) -> None:
    async with (
        started(settings, history_size=0) as app,
        connect(app, await login(app, "greg")) as g,
    ):
        await g.receive()
        await broadcast(g, "a")
        answer = await ask(g, {"type": "history", "stream": "all", "limit": 5})
        assert answer == {"type": "history", "stream": "all", "messages": [], "id": "h"}


async def test_a_history_answer_fits_the_outbox(settings: Settings) -> None:
    """An answer holds the newest messages that fit a quarter of the outbox's bound, so
    asking for history never overflows a connection."""
    async with (
        started(settings, history_size=100, outbox_bytes=64 * 1024) as app,
        connect(app, await login(app, "greg")) as g,
    ):
        await g.receive()
        for n in range(10):
            await g.send_json({"type": "broadcast", "text": f"{n:02}" + "x" * 4000})
            await expect_message(g)
        answer = await ask(g, {"type": "history", "stream": "all", "limit": 10})
        texts = [m["text"][:2] for m in answer["messages"]]
        assert texts == ["07", "08", "09"]  # the newest three fit 16 KiB
