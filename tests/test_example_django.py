"""examples/django as its README runs it: Django's login, wsfanout under /ws/ with Django's
session, a Django view that publishes, and the signed webhooks its receiver keeps, under real
hypercorn and Debian's Chromium."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from playwright.async_api import APIRequestContext, Browser, expect
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.chromium import NEEDED, launched
from tests.server import ROOT, Server, http
from wsfanout.sessions import COOKIE_NAME

pytestmark = [NEEDED]

EXAMPLE = ROOT / "examples" / "django"
README = EXAMPLE / "README.md"
WEBHOOK_SECRET = "django-example-webhook-secret"
USER, PASSWORD = "greg", "greg-password"  # as the README's setup creates him, in "boys"


class DjangoSite(Server):
    """``hypercorn mysite.asgi:application`` in examples/django, posting its webhooks to
    itself (the URL names the port, known once the socket is bound)."""

    def environment(self) -> dict[str, str]:
        url = f"{self.http_url}/hooks/wsfanout"
        return {**super().environment(), "WSFANOUT_WEBHOOK_URL": url}


def readme_block(marker: str) -> str:
    """The fenced block that follows ``<!-- marker: ... -->`` in the README."""
    found = re.search(rf"<!-- {marker}:.*?-->\s*```sh\n(.*?)```", README.read_text(), re.S)
    assert found, f"no {marker} block in {README}"
    return found.group(1)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[DjangoSite]:
    """The example on a fresh database, set up by the README's commands; its log must show
    no traceback."""
    env = {
        "DJANGO_DATABASE": str(tmp_path / "django.sqlite3"),
        "DJANGO_SECRET_KEY": "django-example-test-secret-key",
        "WSFANOUT_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "WSFANOUT_LOG_LEVEL": "info",
        # the README's `python` is this environment's
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
    }
    setup = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", readme_block("setup")],
        cwd=EXAMPLE,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert setup.returncode == 0, setup.stdout + setup.stderr
    serve = "hypercorn --bind 127.0.0.1:8000 mysite.asgi:application"
    assert serve in README.read_text()  # what we run below, on a socket of our own
    server = DjangoSite(
        tmp_path,
        env,
        app="mysite.asgi:application",
        health_path="/ws/healthz",
        cwd=EXAMPLE,
    )
    with server.running():
        yield server
    log = server.log_path.read_text()
    assert "Traceback" not in log, log


@pytest_asyncio.fixture
async def browser() -> AsyncIterator[Browser]:
    async with launched() as chromium:
        yield chromium


async def received(
    request: APIRequestContext,
    url: str,
    done: Callable[[list[dict[str, Any]]], bool],
    timeout: float = 20,
) -> list[dict[str, Any]]:
    """The receiver's events (``/hooks/seen``) once ``done`` holds of them."""
    deadline = time.monotonic() + timeout
    while True:
        response = await request.get(url + "/hooks/seen")
        assert response.status == 200, await response.text()
        events: list[dict[str, Any]] = (await response.json())["events"]
        if done(events):
            return events
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s; the receiver has {events}")
        await asyncio.sleep(0.1)


async def logged(site: Server, line: str, timeout: float = 20) -> None:
    """Wait until the server's log has ``line``."""
    deadline = time.monotonic() + timeout
    while line not in site.log_path.read_text():
        assert time.monotonic() < deadline, f"not logged within {timeout} s: {line}"
        await asyncio.sleep(0.1)


def of_user(events: list[dict[str, Any]]) -> Counter[str]:
    return Counter(event["type"] for event in events if event["user"] == USER)


def signed(body: Any, secret: str = WEBHOOK_SECRET) -> dict[str, str]:
    """The headers wsfanout signs a webhook with, for ``body`` as ``http`` sends it."""
    timestamp = str(int(time.time()))
    payload = f"{timestamp}.{json.dumps(body)}".encode()
    digest = hmac.new(secret.encode(), payload, hashlib.sha256)
    return {
        "x-wsfanout-timestamp": timestamp,
        "x-wsfanout-signature": "sha256=" + digest.hexdigest(),
    }


async def test_django_login_publish_and_webhooks(site: DjangoSite, browser: Browser) -> None:
    """A user logged in to Django only connects to /ws/, gets what a Django view publishes to
    his Django group, and the receiver keeps the signed connected/online and
    disconnected/offline events once each; unsigned or forged posts are refused."""
    base = site.http_url
    context = await browser.new_context()
    page = await context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"uncaught {error}"))

    for path in ("/ws/", "/"):  # no session: refused; not under /ws/: no websocket there
        with pytest.raises(InvalidStatus) as handshake:
            await connect(site.ws_url.removesuffix("/") + path)
        assert handshake.value.response.status_code == 403, path

    await page.goto(base + "/")
    await expect(page).to_have_url(re.compile(r"/accounts/login/\?next=/$"))
    await page.fill("#id_username", USER)
    await page.fill("#id_password", PASSWORD)
    await page.click("button[type=submit]")
    await expect(page).to_have_url(base + "/")
    await expect(page.locator("#state")).to_have_text("connected")
    cookies = {cookie["name"] for cookie in await context.cookies()}
    assert "sessionid" in cookies
    assert COOKIE_NAME not in cookies  # Django's session alone let the socket in

    await page.select_option("#group", "boys")
    await page.fill("#text", "hello boys, from a Django view")
    await page.click("#publish button")
    await expect(page.locator("#messages li")).to_have_text(
        ["greg to group:boys: hello boys, from a Django view"]
    )
    csrf = next(c["value"] for c in await context.cookies() if c["name"] == "csrftoken")
    refused = await context.request.post(
        base + "/publish",
        form={"group": "girls", "text": "not greg's group"},
        headers={"x-csrftoken": csrf},
    )
    assert refused.status == 403, await refused.text()  # the view decides who posts where
    assert (await refused.json())["error"] == "forbidden"

    came = await received(
        context.request, base, lambda e: {"connected", "online"} <= of_user(e).keys()
    )
    assert of_user(came) == {"connected": 1, "online": 1}
    await page.close()
    gone = {"disconnected", "offline"}
    events = await received(context.request, base, lambda e: gone <= of_user(e).keys())
    assert of_user(events) == {"connected": 1, "online": 1, "disconnected": 1, "offline": 1}
    connected, disconnected = (
        next(e for e in events if e["type"] == kind) for kind in ("connected", "disconnected")
    )
    assert connected["connection"] == disconnected["connection"]
    await logged(site, f"wsfanout: offline {USER}")  # the in-process hook's line

    # The receiver keeps only what wsfanout signed, and each event once.
    url = base + "/hooks/wsfanout"
    forged = {"id": "forged-1", "type": "online", "time": time.time(), "node": "x", "user": "eve"}
    body = {"events": [forged]}
    for headers in ({}, signed(body, "not-the-secret"), signed({"events": []})):
        status, answer = await asyncio.to_thread(http, "POST", url, body, headers)
        assert status == 401, answer
    repeated = {"events": events}  # a retried batch: the same ids again
    status, answer = await asyncio.to_thread(http, "POST", url, repeated, signed(repeated))
    assert status == 200, answer
    again = await received(context.request, base, lambda e: True)
    assert again == events  # the repeats were dropped, the forged events refused
    await context.close()
    assert problems == []
