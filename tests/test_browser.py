"""The pages in a real browser: Debian's chromium driven by Playwright, against real hypercorn.

Screenshots of every page land in ``test-artifacts/`` for a person to look at.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Locator, Page, async_playwright, expect

from tests.server import ROOT, Server

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
XSS = '<img src=x onerror="window.pwned=1;alert(1)">'

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists() and os.environ.get("CI") != "true",
    reason="Debian's chromium is not installed here (apt-get install chromium); CI installs it",
)


@pytest.fixture
def server(tmp_path: Path, demo_db: Path) -> Iterator[Server]:
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    with Server(tmp_path).running() as running:
        yield running


@pytest.fixture
def mounted(tmp_path: Path, demo_db: Path) -> Iterator[Server]:
    """wsfanout mounted at /chat inside a Starlette app."""
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    with Server(
        tmp_path, app="tests.mounted:app", health_path="/chat/healthz"
    ).running() as running:
        yield running


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            yield browser
        finally:
            await browser.close()


async def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def log_in(browser: Browser, base: str, username: str, dialogs: list[str]) -> Page:
    """Open the site anonymously, get sent to the login page, log in, wait for the socket."""
    context = await browser.new_context(viewport={"width": 900, "height": 600})
    page = await context.new_page()
    page.on("dialog", lambda dialog: dialogs.append(dialog.message))
    await page.goto(base)
    await expect(page).to_have_url(base + "login")
    await page.fill("#username", username)
    await page.fill("#password", username.capitalize())
    await page.click("#login button")
    await expect(page).to_have_url(base)
    await expect(page.locator("#state")).to_have_text("connected")
    await expect(page.locator("#whoami")).to_have_text(username)
    return page


async def send(page: Page, kind: str, text: str, target: str = "") -> None:
    await page.select_option("#kind", kind)
    if kind == "group":
        await page.select_option("#group", target)
    if kind == "direct":
        await page.select_option("#user", target)
    await page.fill("#text", text)
    await page.press("#text", "Enter")


def received(page: Page, text: str) -> Locator:
    return page.locator("#messages li.received", has_text=text)


def lines(page: Page, text: str) -> Locator:
    """Every line of the page's message list that shows this text, whatever its kind."""
    return page.locator("#messages li", has_text=text)


async def test_group_direct_and_escaping(server: Server) -> None:
    """Group to girls reaches amanda only; Direct to greg reaches greg only; HTML shows as
    text; each message is one line on every page, the sender's included."""
    dialogs: list[str] = []
    base = server.http_url + "/"
    async with chromium() as browser:
        login_page = await (await browser.new_context()).new_page()
        await login_page.goto(base + "login")
        await shot(login_page, "login-page")

        greg = await log_in(browser, base, "greg", dialogs)
        amanda = await log_in(browser, base, "amanda", dialogs)

        # The kinds are explained where they are chosen.
        await greg.select_option("#kind", "group")
        await expect(greg.locator("#hint")).to_contain_text("Group: every member of the group")
        await greg.select_option("#kind", "direct")
        await expect(greg.locator("#hint")).to_contain_text("Direct: only this person")
        # The people to write to: by first name and username, never yourself.
        await expect(greg.locator("#user option[value=greg]")).to_have_count(0)
        await expect(greg.locator("#user option[value=amanda]")).to_have_text("Amanda (amanda)")

        await send(greg, "group", "nails at 5", "girls")
        await expect(received(amanda, "nails at 5")).to_have_count(1)
        await expect(amanda.locator("#messages li.received").last).to_contain_text("Greg → girls")
        # greg is not in girls: his own line comes from the ack, once.
        await expect(greg.locator("#messages li.sent", has_text="nails at 5")).to_have_count(1)
        await expect(lines(greg, "nails at 5")).to_have_count(1)

        await send(amanda, "group", "girls only", "girls")  # her own group: it comes back
        await expect(received(amanda, "girls only")).to_have_count(1)
        await expect(amanda.locator("#messages li.received").last).to_contain_text("you → girls")

        await send(amanda, "direct", "hi greg", "greg")
        await expect(received(greg, "hi greg")).to_have_count(1)
        await expect(greg.locator("#messages li.received").last).to_contain_text("Amanda → you")
        await expect(lines(amanda, "hi greg")).to_have_count(1)

        await send(greg, "broadcast", XSS)
        for page in (greg, amanda):
            await expect(received(page, "onerror")).to_have_count(1)
            assert (await received(page, "onerror").locator("span.text").text_content()) == XSS
            await expect(page.locator("#messages img")).to_have_count(0)
            assert await page.evaluate("window.pwned") is None

        # Exactly what each page received, once, and no more.
        await greg.wait_for_timeout(300)
        for page, text, count in (
            (greg, "nails at 5", 1),
            (greg, "girls only", 0),
            (amanda, "girls only", 1),
            (amanda, "hi greg", 1),
            (greg, "onerror", 1),
            (amanda, "onerror", 1),
        ):
            assert await lines(page, text).count() == count, (text, count)
        await shot(greg, "message-page-greg")
        await shot(amanda, "message-page-amanda")
        await amanda.set_viewport_size({"width": 390, "height": 844})
        # On a phone the message box and Send share one line, inside the screen.
        box = await amanda.locator("#text").bounding_box()
        button = await amanda.locator("#send").bounding_box()
        assert box is not None and button is not None
        assert abs(box["y"] - button["y"]) < 4 and button["x"] + button["width"] <= 390
        await shot(amanda, "message-page-phone")
    assert dialogs == []


async def test_reconnects_after_a_server_restart(server: Server) -> None:
    """Server stopped: the page says it is reconnecting; restarted: messages flow again."""
    dialogs: list[str] = []
    base = server.http_url + "/"
    async with chromium() as browser:
        greg = await log_in(browser, base, "greg", dialogs)
        amanda = await log_in(browser, base, "amanda", dialogs)
        server.stop()
        for page in (greg, amanda):
            await expect(page.locator("#state")).to_have_text("reconnecting", timeout=15_000)
            await expect(page.locator("#send")).to_be_disabled()
        await shot(greg, "reconnecting")
        server.start()
        for page in (greg, amanda):
            await expect(page.locator("#state")).to_have_text("connected", timeout=30_000)
        await send(greg, "broadcast", "we are back")
        await expect(received(amanda, "we are back")).to_have_count(1)
        await shot(amanda, "after-restart")
    assert dialogs == []


async def test_form_login_without_javascript(server: Server) -> None:
    """With JavaScript off, the login form posts itself and shows the server's answer."""
    base = server.http_url + "/"
    async with chromium() as browser:
        page = await (await browser.new_context(java_script_enabled=False)).new_page()
        await page.goto(base + "login")
        await page.fill("#username", "lisa")
        await page.fill("#password", "wrong")
        await page.click("#login button")
        await expect(page.locator("#result")).to_have_text("User or password wrong")
        await shot(page, "login-failed-no-js")
        await page.fill("#username", "lisa")
        await page.fill("#password", "Lisa")
        await page.click("#login button")
        await expect(page).to_have_url(base)
        await expect(page.locator("h1")).to_have_text("wsfanout")
        cookies = await page.context.cookies()
        assert [c["name"] for c in cookies] == ["wsfanout_session"]


async def test_mounted_under_chat(mounted: Server) -> None:
    """Inside a Starlette app at /chat: login, cookie path, pages and the socket all work."""
    dialogs: list[str] = []
    base = mounted.http_url + "/chat/"
    async with chromium() as browser:
        greg = await log_in(browser, base, "greg", dialogs)
        amanda = await log_in(browser, base, "amanda", dialogs)
        cookie = (await greg.context.cookies())[0]
        assert cookie["path"] == "/chat/" and cookie["httpOnly"]
        await send(greg, "direct", "under a mount", "amanda")
        await expect(received(amanda, "under a mount")).to_have_count(1)
        await shot(amanda, "mounted-chat")
        await greg.goto(mounted.http_url + "/")
        await expect(greg.locator("body")).to_have_text("the host application")
    assert dialogs == []
