"""examples/starlette_app.py, run as its docstring says (real hypercorn, WSFANOUT_PAGES=off):
a user logged in only to the host app connects from Chromium with no wsfanout cookie, gets
what the host's view publishes, and shows in the host's list of who is online while the page
is open."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from itsdangerous import TimestampSigner
from playwright.async_api import Browser, expect
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.chromium import NEEDED, launched
from tests.server import ROOT, Server

EXAMPLE = ROOT / "examples" / "starlette_app"  # hypercorn's examples/starlette_app:app

SESSION_SECRET = "test-session-secret"
pytestmark = pytest.mark.asyncio(loop_scope="module")  # one server and browser for the module


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The example under hypercorn, its wsfanout pages off; its log must show no traceback."""
    data_dir: Path = tmp_path_factory.mktemp("starlette-example")
    env = {"WSFANOUT_PAGES": "off", "SESSION_SECRET": SESSION_SECRET}
    server = Server(data_dir, env, app=f"{EXAMPLE}:app", health_path="/chat/healthz")
    with server.running():
        yield server
    log = server.log_path.read_text()
    assert "Traceback" not in log, log


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def chromium() -> AsyncIterator[Browser]:
    """One Chromium for the module's tests."""
    async with launched() as browser:
        yield browser


def request(
    server: Server,
    method: str,
    path: str,
    *,
    cookie: str = "",
    form: dict[str, str] | None = None,
    body: str | None = None,
) -> tuple[int, dict[str, str], str]:
    """One blocking request, redirects not followed: (status, headers, body)."""
    headers = {"cookie": cookie} if cookie else {}
    if form is not None:
        body = urllib.parse.urlencode(form)
        headers["content-type"] = "application/x-www-form-urlencoded"
    elif body is not None:
        headers["content-type"] = "application/json"
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        answer = response.read().decode()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, answer
    finally:
        connection.close()


def log_in(server: Server, username: str) -> str:
    """Log in through the host's form (the demo password: the name capitalised); the
    ``Cookie`` header value of its session."""
    form = {"username": username, "password": username.capitalize()}
    status, headers, body = request(server, "POST", "/login", form=form)
    assert (status, headers["location"]) == (303, "/"), body
    return headers["set-cookie"].split(";")[0]


async def online_until(
    server: Server, cookie: str, done: Callable[[dict[str, Any]], bool], timeout: float = 10
) -> dict[str, Any]:
    """Poll GET /online until ``done`` holds of its answer; fail with the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        status, _, body = await asyncio.to_thread(request, server, "GET", "/online", cookie=cookie)
        assert status == 200, body
        answer: dict[str, Any] = json.loads(body)
        if done(answer):
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"GET /online did not change within {timeout} s: {answer}")
        await asyncio.sleep(0.05)


@NEEDED
async def test_host_session_connects_receives_and_shows_online(
    host: Server, chromium: Browser
) -> None:
    """Logged in through the host's form only, the page connects with no wsfanout cookie,
    shows what the page's form and a POST to /announce publish, and the user is online while
    the page is open and not after it closes."""
    problems: list[str] = []
    context = await chromium.new_context()
    try:
        page = await context.new_page()
        page.on("pageerror", lambda error: problems.append(f"uncaught {error}"))
        await page.goto(host.http_url + "/")
        await expect(page).to_have_url(host.http_url + "/login")
        await page.fill("input[name=username]", "greg")
        await page.fill("input[name=password]", "Greg")
        await page.click("button[type=submit]")
        await expect(page).to_have_url(host.http_url + "/")
        await expect(page.locator("#state")).to_have_text("connected")
        cookies = await context.cookies()
        assert [c["name"] for c in cookies] == ["session"], cookies  # the host's, no wsfanout's
        cookie = f"session={cookies[0]['value']}"

        await page.fill("input[name=text]", "hello from the page")
        await page.click("#announce button")
        await expect(page.locator("#messages li")).to_have_text(["greg: hello from the page"])

        form = {"text": "to the staff", "group": "staff"}
        status, _, body = await asyncio.to_thread(
            request, host, "POST", "/announce", cookie=cookie, form=form
        )
        assert (status, json.loads(body)) == (202, {"accepted": 1})
        await expect(page.locator("#messages li")).to_have_text(
            ["greg: hello from the page", "greg: to the staff"]
        )

        answer = await online_until(host, cookie, lambda a: "greg" in a["online"])
        assert answer["connections"] == {"greg": 1}
        assert problems == []
    finally:
        await context.close()
    answer = await online_until(host, cookie, lambda a: "greg" not in a["online"])
    assert answer["connections"] == {}


async def test_pages_off_anonymous_refused_bad_announcements_answered(host: Server) -> None:
    """wsfanout serves no login page; an anonymous socket is refused; the host's views
    answer the anonymous, the bad and the refused with a status and a JSON body."""
    assert request(host, "GET", "/chat/login")[0] == 404
    assert request(host, "GET", "/chat/static/wsfanout.js")[0] == 200
    status, headers, _ = request(host, "GET", "/")
    assert (status, headers["location"]) == (303, "/login")
    with pytest.raises(InvalidStatus) as refused:
        async with connect(host.ws_url + "chat/"):
            pass
    assert 400 <= refused.value.response.status_code < 500

    status, _, body = request(host, "POST", "/announce", form={"text": "hi"})
    assert (status, json.loads(body)["code"]) == (401, "unauthorized")
    cookie = log_in(host, "amanda")  # no girl connects in these tests
    refusals: list[tuple[dict[str, str] | str, int, str]] = [
        ("{not json", 400, "bad_request"),
        ({"group": "staff"}, 400, "bad_request"),
        ({"text": "hi", "group": "boys"}, 403, "forbidden"),  # amanda is not in boys
        ({"text": "hi", "group": "girls"}, 202, ""),  # no girl online: kept for their resume
        ({"text": " "}, 400, "bad_message"),  # wsfanout's refusal, mapped by the view
        ({"text": "x" * 100_000}, 413, "too_large"),
    ]
    for sent, want_status, want_code in refusals:
        if isinstance(sent, str):
            answer = request(host, "POST", "/announce", cookie=cookie, body=sent)
        else:
            answer = request(host, "POST", "/announce", cookie=cookie, form=sent)
        status, body = answer[0], answer[2]
        assert (status, json.loads(body).get("code", "")) == (want_status, want_code), sent


async def test_the_socket_believes_the_host_session_until_it_expires(host: Server) -> None:
    """A websocket with the host's session cookie only is greg with his host groups; one
    with a session older than its max age is refused."""
    cookie = log_in(host, "greg")
    async with connect(host.ws_url + "chat/", additional_headers={"cookie": cookie}) as socket:
        frame = json.loads(await socket.recv())
    welcome = frame[0] if isinstance(frame, list) else frame
    assert (welcome["type"], welcome["user"]) == ("welcome", "greg")
    assert sorted(welcome["groups"]) == ["boys", "staff"]

    # As SessionMiddleware signs it: greg, logged in at the epoch (expired long ago).
    data = base64.b64encode(json.dumps({"user": "greg", "since": 0}).encode())
    old = TimestampSigner(SESSION_SECRET).sign(data).decode()
    with pytest.raises(InvalidStatus) as refused:
        async with connect(host.ws_url + "chat/", additional_headers={"cookie": f"session={old}"}):
            pass
    assert refused.value.response.status_code == 403
