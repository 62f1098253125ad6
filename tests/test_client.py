"""client: the asyncio Python client (DESIGN 11). Its reconnect table and its positions on
their own (sans-I/O), then the client as an application uses it, against real hypercorn
and uvicorn. What it does when the network, a node or Redis fails is test_client_faults.py's.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import docs
from tests.listener import SERVER_ENV, Listener, Publisher, token
from tests.proxy import Proxy, unused_port
from tests.server import ROOT, SERVERS, Server, http
from wsfanout.client import Client, ClientError
from wsfanout.client.events import EventReader
from wsfanout.client.inbox import Inbox
from wsfanout.client.reconnect import (
    Action,
    Backoff,
    Next,
    after_close,
    after_refusal,
    parse_retry_after,
)
from wsfanout.client.streams import Streams

# -- the reconnect table and the backoff ---------------------------------------------------


@pytest.mark.parametrize(
    ("code", "by_application", "expected"),
    [
        (1000, True, Next(Action.STOP, "closed")),
        (
            1001,
            False,
            Next(Action.RETRY, "going_away", "the server is going away (1001)", soon=True),
        ),
        (
            1012,
            False,
            Next(
                Action.RETRY, "restart", "the node lost messages (its backplane) (1012)", soon=True
            ),
        ),
        (
            1013,
            False,
            Next(Action.RETRY, "slow_consumer", "the client read too slowly (1013)", failures=2),
        ),
        (
            1008,
            False,
            Next(Action.RENEW, "unauthorized", "the server ended the session (1008)", again=True),
        ),
        (
            1008,
            "rate_limited",
            Next(
                Action.RETRY,
                "flooded",
                "closed for sending too fast (1008, after rate_limited)",
                failures=2,
            ),
        ),
        (
            1008,
            "forbidden",  # the session expired: the error before the close says so
            Next(Action.RENEW, "unauthorized", "the server ended the session (1008)", again=True),
        ),
        (1006, False, Next(Action.RETRY, "connection_lost", "the connection dropped (1006)")),
        (1011, False, Next(Action.RETRY, "connection_lost", "the server failed (1011)")),
        (1000, False, Next(Action.RETRY, "connection_lost", "closed (1000)")),
    ],
)
def test_what_follows_each_close_code(
    code: int, by_application: bool | str, expected: Next
) -> None:
    """Each close code leads where DESIGN 11 says (stop, retry soon, back off, renew), with
    the JavaScript client's reason; a 1008 after a flood's error backs off instead (a string
    in the table is the code of the last error before the close)."""
    if isinstance(by_application, str):
        assert after_close(code, False, last_error=by_application) == expected
    else:
        assert after_close(code, by_application) == expected


@pytest.mark.parametrize(
    ("status", "retry_after", "resuming", "action", "wait"),
    [
        (401, None, False, Action.RENEW, None),
        (403, None, True, Action.RENEW, None),
        (400, None, True, Action.FRESH, None),
        (400, None, False, Action.STOP, None),
        (429, "7", False, Action.RETRY, 7.0),
        (429, None, False, Action.RETRY, None),
        (503, "2", False, Action.RETRY, 2.0),
        (503, "soon", False, Action.RETRY, None),
        (502, "5", False, Action.RETRY, None),
        (429, "86400", False, Action.RETRY, 300.0),
    ],
)
def test_what_follows_each_refused_handshake(
    status: int, retry_after: str | None, resuming: bool, action: Action, wait: float | None
) -> None:
    """A refused handshake: renew on 401/403, drop the positions on a 400 to a resume,
    wait a 429's (or 503's) Retry-After (held to 5 minutes), else back off."""
    found = after_refusal(status, retry_after, resuming)
    assert (found.action, found.wait) == (action, wait)


@pytest.mark.parametrize("value", ["-1", "nan", "", "Wed, 21 Oct 2015 07:28:00 GMT"])
def test_unusable_retry_after_means_backoff(value: str) -> None:
    """A Retry-After that is not a number of seconds is not obeyed."""
    assert parse_retry_after(value) is None


def test_backoff_is_full_jitter_under_its_ceiling() -> None:
    """The n-th failure waits uniformly within [0, min(20, 0.5 * 2**n)]: over many draws the
    ceiling holds, the whole window is used (no two clients wait alike), and a connection
    that lived 10 s starts it over, one that lived less does not."""
    backoff = Backoff(0.5, 20.0, 10.0, random.Random(25))
    ceilings = [0.5, 1, 2, 4, 8, 16, 20, 20, 20]
    for failures, ceiling in enumerate(ceilings):
        draws = []
        for _ in range(2000):
            backoff.failures = failures
            draws.append(backoff.delay())
        assert max(draws) <= ceiling
        assert max(draws) > 0.9 * ceiling and min(draws) < 0.1 * ceiling
        tenths = {int(10 * d / ceiling) for d in draws}
        assert tenths == set(range(10)), tenths  # every tenth of the window is used
    backoff.failures = 5
    backoff.lived(9.9)
    assert backoff.failures == 5
    backoff.lived(10.0)
    assert backoff.failures == 0
    assert all(0 <= backoff.jitter(1.0) <= 1.0 for _ in range(1000))
    assert backoff.failures == 0  # a restart's short wait is no failure
    backoff.failures = 10_000  # no overflow however long the server is away
    assert backoff.delay() <= 20.0


# -- positions -------------------------------------------------------------------------------


def welcome(**streams: tuple[str, int]) -> dict[str, Any]:
    return {
        "type": "welcome",
        "streams": {
            k.replace("_", ":"): {"epoch": e, "offset": o} for k, (e, o) in streams.items()
        },
    }


def message(stream: str, offset: int) -> dict[str, Any]:
    return {"type": "message", "stream": stream, "offset": offset, "text": f"{stream}#{offset}"}


def test_messages_already_given_are_dropped() -> None:
    """A message whose offset is not above the last one given in its stream is dropped; a
    message without an offset (history off) always passes."""
    streams = Streams()
    streams.resume()
    assert streams.welcome(welcome(all=("e1", 4))) is None
    given = [streams.message(message("all", n)) for n in (3, 4, 5, 5, 6, 2, 7)]
    assert given == [False, False, True, False, True, False, True]
    assert streams.message({"type": "message", "text": "no offset"})
    assert streams.positions() == {"all": {"epoch": "e1", "offset": 7}}


def test_resume_keeps_a_known_epoch_and_takes_a_new_one() -> None:
    """On reconnect the positions go in resume; a stream in the same epoch keeps its offset
    (the server replays after it), a lost one takes the new welcome's; lost streams whose new
    epoch stands at 0 are named in ``restarted``."""
    streams = Streams(
        {"all": {"epoch": "a1", "offset": 7}, "group:boys": {"epoch": "b1", "offset": 3}}
    )
    assert (
        streams.resume()
        == '{"all":{"epoch":"a1","offset":7},"group:boys":{"epoch":"b1","offset":3}}'
    )
    streams.welcome(welcome(all=("a1", 9), group_boys=("b2", 0), user_greg=("u1", 2)))
    assert streams.positions() == {
        "all": {"epoch": "a1", "offset": 7},
        "group:boys": {"epoch": "b2", "offset": 0},
        "user:greg": {"epoch": "u1", "offset": 2},
    }
    resumed = streams.resumed(
        {"type": "resumed", "recovered": False, "missed": 2, "lost": ["group:boys"]}
    )
    assert resumed == {
        "type": "resumed",
        "recovered": False,
        "missed": 2,
        "lost": ["group:boys"],
        "restarted": ["group:boys"],
    }
    streams.resume()
    streams.welcome(welcome(all=("a2", 4)))
    resumed = streams.resumed({"type": "resumed", "recovered": False, "missed": 0, "lost": ["all"]})
    assert resumed["restarted"] == []  # published to since it restarted: something is lost


def test_refused_positions_are_dropped_and_reported() -> None:
    """After a 400 the client forgets its positions and, on the fresh welcome, makes the
    resumed the server will not send: recovered false, naming what it dropped."""
    streams = Streams({"all": {"epoch": "a1", "offset": 7}})
    streams.resume()  # the handshake the server refused
    streams.forget()
    assert streams.resume() is None
    made = streams.welcome(welcome(all=("a1", 9)))
    assert made == {
        "type": "resumed",
        "recovered": False,
        "missed": 0,
        "lost": ["all"],
        "restarted": [],
        "refused": True,
    }
    assert streams.positions() == {"all": {"epoch": "a1", "offset": 9}}


def test_a_joined_stream_learns_its_epoch_or_is_reported_lost() -> None:
    """A group joined while connected has no epoch until a history answer gives one; if the
    connection ends before that, the next resumed names it lost (unless nothing came)."""
    streams = Streams()
    streams.resume()
    streams.welcome(welcome(all=("a1", 0)))
    assert streams.joined("chess") == "group:chess"
    assert streams.message(message("group:chess", 5))
    assert not streams.message(message("group:chess", 5))
    assert "group:chess" not in streams.positions()  # cannot be resumed without its epoch
    streams.resume()
    streams.welcome(welcome(all=("a1", 0), group_chess=("c1", 8)))
    resumed = streams.resumed({"type": "resumed", "recovered": True, "missed": 0})
    assert (resumed["recovered"], resumed["lost"]) == (False, ["group:chess"])

    streams.joined("go")
    streams.history({"type": "history", "stream": "group:go", "epoch": "g1", "offset": 3})
    assert streams.positions()["group:go"] == {"epoch": "g1", "offset": 3}
    streams.joined("poker")
    streams.message(message("group:poker", 2))
    streams.history({"type": "history", "stream": "group:poker", "epoch": "p1", "offset": 6})
    assert streams.positions()["group:poker"] == {
        "epoch": "p1",
        "offset": 2,
    }  # 3..6 may be on their way
    streams.left("poker")
    assert "group:poker" not in streams.positions()


async def test_a_replay_is_handed_over_merged_by_time_after_the_welcome() -> None:
    """The server replays stream after stream; the application gets the replay at resumed,
    merged across streams by ts (each stream's in offset order), less what it had, then
    the resumed; answers settle their requests and reach no one else."""
    streams = Streams(
        {"all": {"epoch": "a", "offset": 1}, "group:boys": {"epoch": "b", "offset": 0}}
    )
    seen: list[str] = []
    reader = EventReader(streams, lambda: seen.append("welcomed"), seen.append)
    streams.resume()
    reader.begin(resuming=True)

    def frame(*events: dict[str, Any]) -> str:
        return json.dumps(list(events))

    def msg(stream: str, offset: int, ts: float) -> dict[str, Any]:
        return {
            "type": "message",
            "stream": stream,
            "offset": offset,
            "ts": ts,
            "text": f"{stream} {offset}",
        }

    got = reader.take(frame(welcome(all=("a", 3), group_boys=("b", 2))))
    assert [e["type"] for e in got] == ["welcome"] and seen == ["welcomed"]
    assert reader.take(frame(msg("all", 1, 1.0), msg("all", 2, 5.0), msg("all", 3, 6.0))) == []
    assert reader.take(frame(msg("group:boys", 1, 2.0), msg("group:boys", 2, 7.0))) == []
    got = reader.take(frame({"type": "resumed", "recovered": True, "missed": 4}))
    assert [e.get("text", e["type"]) for e in got] == [
        "group:boys 1",
        "all 2",
        "all 3",
        "group:boys 2",
        "resumed",
    ]
    future = reader.expect("7")
    assert reader.take(frame({"type": "ack", "id": "7"}, msg("all", 4, 8.0))) == [
        msg("all", 4, 8.0)
    ]
    assert future.result() == {"type": "ack", "id": "7"}
    assert reader.take('{"type": "joined", "group": "chess"}') == [
        {"type": "joined", "group": "chess"}
    ]
    assert seen[-1] == "group:chess"


@pytest.mark.parametrize(
    "positions",
    [
        {"all": {"epoch": "", "offset": 1}},
        {"all": {"epoch": "e", "offset": -1}},
        {"all": {"epoch": "e"}},
    ],
)
def test_malformed_positions_are_refused_at_once(positions: Any) -> None:
    """Positions given to the client are checked when it is made, not at the handshake."""
    with pytest.raises(ValueError, match="positions"):
        Client("ws://127.0.0.1:1/", positions=positions)


def test_the_client_imports_nothing_of_the_server_but_protocol() -> None:
    """The import contract of DESIGN 3 names every other module of the package, so a new
    module cannot slip past it."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contract = next(
        c
        for c in config["tool"]["importlinter"]["contracts"]
        if c.get("source_modules") == ["wsfanout.client"]
    )
    package = ROOT / "src" / "wsfanout"
    modules = {
        path.stem if path.is_file() else path.name
        for path in package.iterdir()
        if (path.suffix == ".py" and path.stem != "__init__") or (path / "__init__.py").exists()
    }
    forbidden = {name.removeprefix("wsfanout.") for name in contract["forbidden_modules"]}
    assert forbidden == modules - {"protocol", "client"}


async def test_the_inbox_hands_over_a_batch_larger_than_itself() -> None:
    """A frame of more events than the inbox holds: the reader waits for room while the
    application takes what is held, and nothing is lost or reordered; ended, the
    application gets what was held, then the end."""
    inbox = Inbox(3)
    events = [{"type": "message", "n": n} for n in range(10)]
    putting = asyncio.create_task(inbox.put(events))
    await asyncio.sleep(0)  # the reader fills the inbox and waits for room
    async with asyncio.timeout(5):
        got = [await inbox.get() for _ in range(8)]  # takes what is held without yielding
        await putting
    inbox.end()
    got += [await inbox.get(), await inbox.get()]
    with pytest.raises(StopAsyncIteration):
        await inbox.get()
    assert got == events


# -- against a real server ------------------------------------------------------------------


@pytest.fixture(scope="module", params=SERVERS)
def node(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, demo_db: Path
) -> Iterator[Server]:
    """One node (history on, no Redis) shared by the tests below, which stop no server;
    one connection per user, so that a 429 is easy to provoke."""
    data = tmp_path_factory.mktemp("client")
    shutil.copy(demo_db, data / "wsfanout.sqlite3")
    env = {**SERVER_ENV, "WSFANOUT_MAX_CONNECTIONS_PER_USER": "1"}
    with Server(data, env, server=str(request.param)).running() as running:
        yield running
    log = running.log_path.read_text()
    assert "Traceback" not in log, log


async def test_send_presence_and_history(node: Server) -> None:
    """Logged in with a password: welcome first, an ack for a send, the server's error code
    for a refused one, presence and history answered; what is sent arrives as an event."""
    states: list[tuple[str, str | None]] = []
    async with Client(
        node.ws_url, username="greg", password="Greg-demo", on_state=lambda *s: states.append(s)
    ) as chat:
        assert chat.state == "connected"
        listener = Listener(chat)
        ack = await chat.send({"type": "group", "group": "boys", "text": "hi boys"})
        assert ack["type"] == "ack" and isinstance(ack["id"], str)
        with pytest.raises(ClientError) as refused:
            await chat.send({"type": "group", "group": "chess", "text": "hi"})
        assert refused.value.code == "unknown_group"
        await listener.got("hi boys", "group:boys")
        assert listener.events[0]["type"] == "welcome" and listener.events[0]["user"] == "greg"
        presence = await chat.presence("boys")
        assert (presence["online"], presence["count"]) == (["greg"], 1)
        history = await chat.history("group:boys", 10)
        assert [m["text"] for m in history["messages"]][-1] == "hi boys"
        assert chat.positions["group:boys"] == {
            "epoch": history["epoch"],
            "offset": history["offset"],
        }
        with pytest.raises(ClientError) as forbidden:
            await chat.history("group:girls", 10)
        assert forbidden.value.code == "forbidden"
        with pytest.raises(ClientError) as bad:
            await chat.send({"type": "group", "text": "no group"})
        assert bad.value.code == "bad_message"
    assert chat.state == "closed"
    await asyncio.wait_for(listener.task, 5)  # the iteration ended with the client
    assert states == [("connecting", None), ("connected", None), ("closed", "closed")]


async def test_requests_over_the_rate_are_refused_and_a_flood_is_no_logout(
    tmp_path: Path,
) -> None:
    """Requests sent faster than the server's rate are each answered: acks, then
    ``rate_limited`` (none waits for a timeout). Past the flood limit the server closes with
    1008, and the client backs off and comes back instead of giving up as unauthorized."""
    env = {**SERVER_ENV, "WSFANOUT_RATE_LIMIT": "2", "WSFANOUT_RATE_BURST": "5"}
    with Server(tmp_path, env).running() as server:
        states: list[tuple[str, str | None]] = []
        back = asyncio.Event()

        def changed(state: str, reason: str | None) -> None:
            states.append((state, reason))
            if states.count(("connected", None)) == 2:
                back.set()

        chat = Client(server.ws_url, token=token("quick"), min_delay=0.05, on_state=changed)
        await chat.connect()
        try:
            asked = [chat.send({"type": "broadcast", "text": str(n)}) for n in range(12)]
            answers = await asyncio.gather(*asked, return_exceptions=True)
            codes = [
                a.code if isinstance(a, ClientError) else a["type"]
                for a in answers
                if not isinstance(a, BaseException) or isinstance(a, ClientError)
            ]
            assert codes == ["ack"] * 5 + ["rate_limited"] * 6 + ["disconnected"], codes
            await asyncio.wait_for(back.wait(), 10)
            assert ("disconnected", "flooded") in states
            assert chat.state == "connected"
        finally:
            await chat.close()


async def test_a_url_with_no_login_is_refused_for_good(node: Server) -> None:
    """A wrong path (no login page there: 404) is a mistake to report, not a fault to
    retry for ever."""
    chat = Client(node.ws_url + "nope/", username="greg", password="Greg-demo")
    with pytest.raises(ClientError) as refused:
        await asyncio.wait_for(chat.connect(), 10)
    assert refused.value.code == "refused"
    assert "(404)" in refused.value.detail and chat.state == "closed"


async def test_sent_while_not_connected_is_refused_at_once(node: Server) -> None:
    """A send before connecting, or after closing, fails at once with ``disconnected``."""
    chat = Client(node.ws_url, username="chuck", password="Chuck-demo")
    with pytest.raises(ClientError) as early:
        await chat.send({"type": "broadcast", "text": "too early"})
    assert early.value.code == "disconnected"
    await chat.connect()
    await chat.close()
    with pytest.raises(ClientError) as late:
        await chat.presence("boys")
    assert late.value.code == "disconnected"


async def test_wrong_password_is_refused_for_good(node: Server) -> None:
    """A refused login: connect raises ``unauthorized`` with the server's reason, once."""
    states: list[tuple[str, str | None]] = []
    chat = Client(
        node.ws_url, username="mike", password="wrong", on_state=lambda *s: states.append(s)
    )
    with pytest.raises(ClientError) as refused:
        await chat.connect()
    assert refused.value.code == "unauthorized"
    assert "401" in refused.value.detail and "wrong" in refused.value.detail
    assert states == [("connecting", None), ("closed", "unauthorized")]
    assert [event async for event in chat] == []


async def test_a_refused_resume_connects_afresh(node: Server) -> None:
    """Positions the server refuses (400: an epoch longer than any it makes) are dropped:
    the client connects without them and says so with a resumed naming the stream."""
    positions = {"all": {"epoch": "x" * 65, "offset": 3}}
    async with Client(
        node.ws_url, username="amanda", password="Amanda-demo", positions=positions
    ) as chat:
        listener = Listener(chat)
        await listener.until(lambda: bool(listener.of("resumed")))
        assert [e["type"] for e in listener.events] == ["welcome", "resumed"]
        fresh = listener.events[0]["streams"]["all"]["offset"] == 0  # nothing published yet
        assert listener.of("resumed")[0] == {
            "type": "resumed",
            "recovered": False,
            "missed": 0,
            "lost": ["all"],
            "restarted": ["all"] if fresh else [],
            "refused": True,
        }
        assert chat.positions["all"]["epoch"] != "x" * 65


async def test_a_429_is_retried_until_a_seat_frees(node: Server) -> None:
    """One connection per user: a second one is refused (429) and keeps trying, with
    backoff, until the first closes."""
    refused = asyncio.Event()

    def on_state(state: str, reason: str | None) -> None:
        if (state, reason, second.detail) == (
            "disconnected",
            "refused",
            "the handshake was refused (429)",
        ):
            refused.set()

    first = Client(node.ws_url, token=token("zoe"))
    await first.connect()
    second = Client(
        node.ws_url, token=token("zoe"), min_delay=0.1, max_delay=0.4, on_state=on_state
    )
    connecting = asyncio.create_task(second.connect())
    await asyncio.wait_for(refused.wait(), 10)
    assert not connecting.done()
    await first.close()
    await asyncio.wait_for(connecting, 10)
    assert second.state == "connected"
    await second.close()


async def test_a_burst_arrives_one_event_at_a_time_in_order(node: Server) -> None:
    """The server batches a burst into array frames; the application gets each message once,
    in offset order."""
    async with Client(node.ws_url, username="lisa", password="Lisa-demo") as chat:
        listener = Listener(chat)
        texts = [f"burst {n}" for n in range(300)]
        for start in range(0, 300, 100):
            items = [{"type": "broadcast", "text": t} for t in texts[start : start + 100]]
            status, _ = await asyncio.to_thread(
                http,
                "POST",
                node.http_url + "/api/publish",
                items,
                {"authorization": "Bearer " + SERVER_ENV["WSFANOUT_API_KEYS"]},
            )
            assert status == 202
        await listener.got("burst 299")
        got = [t for t in listener.texts() if t.startswith("burst")]
        assert got == texts
        offsets = [e["offset"] for e in listener.of("message") if e["stream"] == "all"]
        assert offsets == sorted(set(offsets))


async def test_closing_ends_the_iteration_after_what_was_held(node: Server) -> None:
    """close() while events wait: the application still gets them, then the loop ends."""
    publisher = Publisher("held ")
    chat = Client(node.ws_url, username="anny", password="Anny-demo")
    await chat.connect()
    for _ in range(5):
        assert await publisher.publish(node)
    await chat.history("all", 0)  # answered through the same queue: after all five
    await chat.close()
    texts = [e["text"] async for e in chat if e["type"] == "message"]
    assert texts[-5:] == publisher.acked


async def test_close_is_prompt_when_the_application_stopped_reading(node: Server) -> None:
    """The application stopped reading, so the client stopped reading the socket: close()
    still ends the connection at once (websockets alone would wait out its 10 s close
    timeout behind the unread frames), and the loop gets what was held, then ends."""
    chat = Client(node.ws_url, token=token("ivy"), max_queue=5)
    await chat.connect()
    publisher = Publisher()
    for start in range(0, 2000, 200):
        texts = [f"unread {n}" for n in range(start, start + 200)]
        assert await publisher.publish_batch(node, texts)
    async with asyncio.timeout(5):
        await chat.close()
    held = [event async for event in chat]
    assert [e["type"] for e in held] == ["welcome"] + ["message"] * 4


async def test_a_group_joined_while_connected_is_resumed_too(node: Server) -> None:
    """Added to a group while connected: the client learns the new stream's epoch by itself,
    so after a network reset it resumes that stream as well, missing nothing."""
    admin = {"authorization": f"Bearer {SERVER_ENV['WSFANOUT_API_KEYS']}"}
    async with Proxy(node.port) as proxy:
        chat = Client(proxy.ws_url, username="mike", password="Mike-demo", min_delay=0.05)
        await chat.connect()
        listener = Listener(chat)
        for method, path, body in [
            ("POST", "/api/groups", {"name": "chess"}),
            ("PUT", "/api/users/mike/groups/chess", {}),
        ]:
            status, _ = await asyncio.to_thread(http, method, node.http_url + path, body, admin)
            assert status in (200, 201, 204)
        await listener.until(lambda: bool(listener.of("joined")))
        await chat.presence("chess")  # answered after the client's own history request
        assert "group:chess" in chat.positions

        async def move(n: int) -> None:
            item = {"type": "group", "group": "chess", "text": f"move {n}"}
            status, _ = await asyncio.to_thread(
                http, "POST", node.http_url + "/api/publish", item, admin
            )
            assert status == 202

        await move(0)
        await listener.got("move 0", "group:chess")
        proxy.point(unused_port())  # the client is away while the next moves are made
        assert proxy.reset() == 1
        await move(1)
        await move(2)
        proxy.point(node.port)
        await listener.until(lambda: bool(listener.of("resumed")))  # after the replay
        await chat.close()
    assert listener.texts("group:chess") == ["move 0", "move 1", "move 2"]
    assert [e["recovered"] for e in listener.of("resumed")] == [True]


# -- the example in docs/clients/python.md -----------------------------------------------------


EXAMPLE = ROOT / "examples" / "client.py"


async def test_the_example_runs(node: Server) -> None:
    """examples/client.py, run as a reader would, says hi and prints what it receives; the
    clients pages quote it whole, so what runs is what readers copy."""
    for page in ("docs/clients/index.md", "docs/clients/python.md"):
        assert docs.block(page, "test_the_example_runs") == EXAMPLE.read_text(), page
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        node.ws_url,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        lines: list[str] = []
        while not any("hi from Python" in line for line in lines):
            line = await asyncio.wait_for(process.stdout.readline(), 20)
            assert line, (await process.stderr.read()).decode() if process.stderr else ""
            lines.append(line.decode())
        assert "greg: hi from Python\n" in lines
    finally:
        process.terminate()
        await process.wait()


async def test_headers_carry_the_host_apps_session(tmp_path: Path, demo_db: Path) -> None:
    """Embedded in a host app whose ``authenticate`` reads its own session cookie
    (tests/hosted.py), the client connects with that cookie in ``headers``; with no
    cookie it is refused for good, unauthorized."""
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    with Server(tmp_path, SERVER_ENV, app="tests.hosted:app").running() as server:
        async with Client(server.ws_url, headers={"Cookie": "host_user=ann"}) as chat:
            welcome = await anext(chat)
            assert (welcome["type"], welcome["user"], welcome["groups"]) == (
                "welcome",
                "ann",
                ["chess"],
            )
            ack = await chat.send({"type": "group", "group": "chess", "text": "hi"})
            assert ack["type"] == "ack"
            assert (await anext(chat))["text"] == "hi"
        anonymous = Client(server.ws_url)
        with pytest.raises(ClientError) as refused:
            await asyncio.wait_for(anonymous.connect(), 10)
        assert refused.value.code == "unauthorized" and anonymous.state == "closed"
        # The host's session ends (1008) but was renewed meanwhile: one more try connects.
        states: list[tuple[str, str | None]] = []
        sliding = {"Cookie": "host_user=bo; host_ttl=1.2"}
        async with Client(server.ws_url, headers=sliding, on_state=lambda *s: states.append(s)):
            async with asyncio.timeout(10):
                while states.count(("connected", None)) < 2:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        assert states[1:5] == [
            ("connected", None),
            ("disconnected", "unauthorized"),
            ("connecting", "retry"),
            ("connected", None),
        ]
