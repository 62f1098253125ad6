"""The pages in a real browser: Debian's chromium driven by Playwright, against real hypercorn.

Screenshots of every page land in ``test-artifacts/`` for a person to look at. Every page a
test logs in with reports its dialogs and uncaught errors (``problems``), which must stay none.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import pytest_asyncio
from playwright.async_api import Browser, Locator, Page, Route, expect

from tests import docs
from tests.chromium import NEEDED, launched
from tests.server import ROOT, Client, Server, http
from wsfanout.cli import demo_password

ARTIFACTS = ROOT / "test-artifacts"
XSS = '<img src=x onerror="window.pwned=1;alert(1)">'

pytestmark = [
    NEEDED,
    pytest.mark.asyncio(loop_scope="module"),  # one browser for the module's tests
]


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


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def chromium() -> AsyncIterator[Browser]:
    """One Chromium for the module: launching it costs more than most tests."""
    async with launched() as browser:
        yield browser


@pytest_asyncio.fixture(loop_scope="module")
async def browser(chromium: Browser) -> AsyncIterator[Browser]:
    """The module's Chromium; every context a test opened is closed after it, so that no page
    of one test goes on reconnecting during the next."""
    yield chromium
    for context in chromium.contexts:
        await context.close()


async def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def log_in(browser: Browser, base: str, username: str, problems: list[str]) -> Page:
    """Open the site anonymously, get sent to the login page, log in, wait for the socket.
    The page's dialogs and uncaught errors go to ``problems``."""
    context = await browser.new_context(viewport={"width": 900, "height": 600})
    page = await context.new_page()
    page.on("dialog", lambda dialog: problems.append(f"dialog: {dialog.message}"))
    page.on("pageerror", lambda error: problems.append(f"{username}: uncaught {error}"))
    await page.goto(base)
    await expect(page).to_have_url(base + "login")
    await page.fill("#username", username)
    await page.fill("#password", demo_password(username))
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


async def test_group_direct_and_escaping(server: Server, browser: Browser) -> None:
    """Group to girls reaches amanda only; Direct to greg reaches greg only; HTML shows as
    text; each message is one line on every page, the sender's included."""
    problems: list[str] = []
    base = server.http_url + "/"
    login_page = await (await browser.new_context()).new_page()
    await login_page.goto(base + "login")
    await shot(login_page, "login-page")

    greg = await log_in(browser, base, "greg", problems)
    amanda = await log_in(browser, base, "amanda", problems)

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
    assert problems == []


async def test_reconnects_after_a_server_restart(server: Server, browser: Browser) -> None:
    """Server stopped: the page says it is reconnecting; restarted: messages flow again."""
    problems: list[str] = []
    base = server.http_url + "/"
    greg = await log_in(browser, base, "greg", problems)
    amanda = await log_in(browser, base, "amanda", problems)
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
    assert problems == []


async def test_the_login_page_fits_a_phone(server: Server, browser: Browser) -> None:
    """At 390 x 844 (a phone) the login form keeps off the top edge, spans the screen with
    no gutter of another colour beside it, and nothing scrolls sideways."""
    context = await browser.new_context(viewport={"width": 390, "height": 844})
    page = await context.new_page()
    await page.goto(server.http_url + "/login")
    await shot(page, "login-390")
    card = await page.evaluate(
        """() => {
            const main = document.querySelector("main");
            const box = main.getBoundingClientRect();
            const color = (element) => getComputedStyle(element).backgroundColor;
            return {
                top: box.top, left: box.left, right: box.right, width: innerWidth,
                scroll: document.documentElement.scrollWidth,
                card: color(main), body: color(document.body),
                form: document.querySelector("#login").getBoundingClientRect().top,
            };
        }"""
    )
    assert card["top"] > 0 and card["form"] >= 16, card  # off the top edge
    assert card["scroll"] <= card["width"], card  # no sideways scroll
    # beside it and above it, the card's own colour: no grey gutter, no grey strip
    assert card["body"] == card["card"], card


async def test_form_login_without_javascript(server: Server, browser: Browser) -> None:
    """With JavaScript off, the login form posts itself and shows the server's answer."""
    base = server.http_url + "/"
    page = await (await browser.new_context(java_script_enabled=False)).new_page()
    await page.goto(base + "login")
    await page.fill("#username", "lisa")
    await page.fill("#password", "wrong")
    await page.click("#login button")
    await expect(page.locator("#result")).to_have_text("User or password wrong")
    await shot(page, "login-failed-no-js")
    await page.fill("#username", "lisa")
    await page.fill("#password", "Lisa-demo")
    await page.click("#login button")
    await expect(page).to_have_url(base)
    await expect(page.locator("h1")).to_have_text("wsfanout")
    cookies = await page.context.cookies()
    assert [c["name"] for c in cookies] == ["wsfanout_session"]


async def test_mounted_under_chat(mounted: Server, browser: Browser) -> None:
    """Inside a Starlette app at /chat: login, cookie path, pages and the socket all work."""
    problems: list[str] = []
    base = mounted.http_url + "/chat/"
    greg = await log_in(browser, base, "greg", problems)
    amanda = await log_in(browser, base, "amanda", problems)
    cookie = (await greg.context.cookies())[0]
    assert cookie["path"] == "/chat/" and cookie["httpOnly"]
    await send(greg, "direct", "under a mount", "amanda")
    await expect(received(amanda, "under a mount")).to_have_count(1)
    await shot(amanda, "mounted-chat")
    await greg.goto(mounted.http_url + "/")
    await expect(greg.locator("body")).to_have_text("the host application")
    assert problems == []


# --- Positions, resume and presence (DESIGN 5.1, 5.2) --------------------------------------

REDIS_URL = "redis://127.0.0.1:6379/0"
API_KEY = "browser-test-key"
POSITIONS = "wsfanout.positions"  # app.js's sessionStorage key
# Records, in this tab's sessionStorage, the text of every message line any document of the
# tab shows, as it is shown (a MutationObserver runs right after the task that rendered, so
# before the page can unload). ``window.shownBefore``: what earlier documents showed.
RECORDER = """(() => {
  const KEY = "test.shown";
  window.shownBefore = JSON.parse(sessionStorage.getItem(KEY) || "[]");
  new MutationObserver((records) => {
    const shown = JSON.parse(sessionStorage.getItem(KEY) || "[]");
    for (const record of records) {
      for (const node of record.addedNodes) {
        if (node.nodeName === "LI" && node.classList.contains("received")
            && node.parentNode && node.parentNode.id === "messages") {
          shown.push(node.querySelector(".text").textContent);
        }
      }
    }
    sessionStorage.setItem(KEY, JSON.stringify(shown));
  }).observe(document, { childList: true, subtree: true });
})()"""


@pytest.fixture
def presence_server(tmp_path: Path, demo_db: Path) -> Iterator[Server]:
    """Online / offline events on (tests/server.py turns them off for older tests)."""
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    with Server(tmp_path, env={"WSFANOUT_PRESENCE_EVENTS_MAX": "100"}).running() as running:
        yield running


async def publish(server: Server, body: dict[str, Any]) -> None:
    """Publish through the HTTP API as the backend ``ops``."""
    status, headers = await asyncio.to_thread(
        http,
        "POST",
        server.http_url + "/api/publish",
        {**body, "from": "ops"},
        {"authorization": f"Bearer {API_KEY}"},
    )
    assert status == 202, headers["_body"]


@contextlib.asynccontextmanager
async def client(server: Server, username: str) -> AsyncIterator[Client]:
    """A websocket client logged in as ``username``, closed at the end whatever happens."""
    opened = await Client.open(server.ws_url, server.login(username))
    try:
        yield opened
    finally:
        await opened.close()


async def texts(page: Page) -> list[str]:
    """The texts of the message lines the page shows, in order."""
    return await page.locator("#messages li.received .text").all_text_contents()


async def saved_positions(page: Page) -> Any:
    return json.loads(await page.evaluate(f"sessionStorage.getItem({POSITIONS!r}) || 'null'"))


async def test_a_reload_while_others_write_shows_the_missed_messages_once(
    server: Server, browser: Browser
) -> None:
    """greg writes all along; amanda reloads her tab, and the reloaded page's script is held
    back while greg goes on writing. After the reload amanda's page shows again what it showed
    before (its scrollback, kept in the tab), then what was written while no page of hers was
    connected (replayed), then what came live; nothing twice, nothing lost."""
    problems: list[str] = []
    base = server.http_url + "/"
    sent: list[str] = []
    stop = asyncio.Event()
    progress = asyncio.Condition()

    async def write() -> None:
        while not stop.is_set():
            text = f"note {len(sent) + 1:03d}"
            await greg.send({"type": "broadcast", "text": text})
            async with progress:
                sent.append(text)
                progress.notify_all()
            await asyncio.sleep(0.02)

    async def written(count: int) -> None:
        async with asyncio.timeout(10), progress:
            await progress.wait_for(lambda: len(sent) >= count)

    async with client(server, "greg") as greg:
        amanda = await log_in(browser, base, "amanda", problems)
        sockets: list[str] = []
        amanda.on("websocket", lambda ws: sockets.append(ws.url))
        await amanda.add_init_script(RECORDER)
        await amanda.evaluate(RECORDER)
        writer = asyncio.create_task(write())
        try:
            await expect(amanda.locator("#messages li.received").nth(4)).to_be_attached()
            # The reload: the new document's script waits until ten more are written.
            held, release = asyncio.Event(), asyncio.Event()

            async def hold(route: Route) -> None:
                held.set()
                await release.wait()
                await route.continue_()

            await amanda.route("**/static/app.js", hold)
            reloading = asyncio.create_task(amanda.reload())
            await asyncio.wait_for(held.wait(), 10)
            away = len(sent)  # no page of amanda's reads from here on
            await written(away + 10)
            missed = sent[away : away + 10]
            release.set()
            await reloading
            await expect(amanda.locator("#state")).to_have_text("connected")
            await written(len(sent) + 10)  # and some live ones
        finally:
            stop.set()
            await writer
        await expect(received(amanda, sent[-1])).to_have_count(1)
        await amanda.wait_for_timeout(300)  # anything extra would show by now

        before = await amanda.evaluate("window.shownBefore")
        after = await texts(amanda)
        assert after == sent  # once each, in order, none lost
        assert after[: len(before)] == before  # the scrollback, as it was
        assert len(before) >= 5 and set(missed) <= set(after[len(before) :])
        assert "resume=" in sockets[-1]  # the reloaded page asked for what it missed
        await expect(amanda.locator("#notice")).to_be_hidden()
        stored = await saved_positions(amanda)
        assert stored["user"] == "amanda"
        assert set(stored["streams"]) == {"all", "group:girls", "user:amanda"}
        await shot(amanda, "reload-resumed")
    assert problems == []


async def test_killing_and_restarting_the_server_with_redis_shows_them_too(
    tmp_path: Path, demo_db: Path, redis_prefix: str, browser: Browser
) -> None:
    """With Redis the history outlives the server: stopped, started again, and published to
    (every kind of stream) while amanda's page is cut off, the page shows what it missed
    once it is back, and says nothing was lost."""
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    env = {
        "WSFANOUT_REDIS_URL": REDIS_URL,
        "WSFANOUT_REDIS_PREFIX": redis_prefix,
        "WSFANOUT_API_KEYS": API_KEY,
    }
    problems: list[str] = []
    server = Server(tmp_path, env=env)
    with server.running():
        base = server.http_url + "/"
        amanda = await log_in(browser, base, "amanda", problems)
        await publish(server, {"type": "broadcast", "text": "before the restart"})
        await expect(received(amanda, "before the restart")).to_have_count(1)
        # Offline, the page cannot reconnect until the messages are published. Cut off once
        # it has seen the stop: Chromium's offline emulation may hold back what an open
        # websocket receives, the server's close among it.
        server.stop()
        await expect(amanda.locator("#state")).to_have_text("reconnecting", timeout=15_000)
        await amanda.context.set_offline(True)
        port = server.port
        server.start()
        assert server.port == port  # the page comes back to the same address
        missed = ["missed for all", "missed for girls", "missed for amanda", "missed again"]
        await publish(server, {"type": "broadcast", "text": missed[0]})
        await publish(server, {"type": "group", "group": "girls", "text": missed[1]})
        await publish(server, {"type": "direct", "user_name": "amanda", "text": missed[2]})
        await publish(server, {"type": "broadcast", "text": missed[3]})
        await amanda.context.set_offline(False)
        await expect(amanda.locator("#state")).to_have_text("connected", timeout=30_000)
        await publish(server, {"type": "broadcast", "text": "live again"})
        await expect(received(amanda, "live again")).to_have_count(1)
        await amanda.wait_for_timeout(300)
        assert await texts(amanda) == ["before the restart", *missed, "live again"]
        await expect(amanda.locator("#notice")).to_be_hidden()
        await shot(amanda, "restart-with-redis-resumed")
    assert problems == []


async def test_a_restart_that_loses_the_history_says_so(server: Server, browser: Browser) -> None:
    """Without Redis the history is in the server's memory: after a restart every stream has a
    new epoch. Nothing sent since: the page says plainly that the server restarted. A message
    sent after the restart while the page was cut off: the page says it could not be
    recovered, for that stream."""
    problems: list[str] = []
    base = server.http_url + "/"
    amanda = await log_in(browser, base, "amanda", problems)
    notice = amanda.locator("#notice")
    async with client(server, "greg") as greg:
        await greg.send({"type": "broadcast", "text": "before the restart"})
        await expect(received(amanda, "before the restart")).to_have_count(1)
    server.stop()
    await expect(amanda.locator("#state")).to_have_text("reconnecting", timeout=15_000)
    server.start()
    await expect(amanda.locator("#state")).to_have_text("connected", timeout=30_000)
    await expect(lines(amanda, "the server restarted")).to_have_count(1)
    await expect(notice).to_be_hidden()
    await shot(amanda, "restart-said-plainly")

    server.stop()
    await expect(amanda.locator("#state")).to_have_text("reconnecting", timeout=15_000)
    await amanda.context.set_offline(True)  # cut off until greg has written (see above)
    server.start()
    async with client(server, "greg") as greg:
        await greg.send({"type": "broadcast", "text": "while you were away"})
        await greg.next_of("message")
    await amanda.context.set_offline(False)
    await expect(amanda.locator("#state")).to_have_text("connected", timeout=30_000)
    await expect(notice).to_be_visible()
    await expect(notice).to_contain_text("could not be recovered (everyone)")
    await expect(notice).to_have_attribute("role", "status")
    await shot(amanda, "restart-lost-notice")
    # It stays until dismissed; the stream goes on from where it stands now.
    async with client(server, "greg") as greg:
        await greg.send({"type": "broadcast", "text": "after the restart"})
        await expect(received(amanda, "after the restart")).to_have_count(1)
    assert await texts(amanda) == ["before the restart", "after the restart"]
    await amanda.click("#notice-close")
    await expect(notice).to_be_hidden()
    assert problems == []


async def test_saved_positions_the_server_refuses_do_not_lock_the_page_out(
    server: Server, browser: Browser
) -> None:
    """Positions the server turns down (an epoch longer than it allows) are dropped after
    two refused handshakes, and the page connects without them."""
    problems: list[str] = []
    base = server.http_url + "/"
    amanda = await log_in(browser, base, "amanda", problems)
    sockets: list[str] = []
    amanda.on("websocket", lambda ws: sockets.append(ws.url))
    bad = {"user": "amanda", "streams": {"all": {"epoch": "x" * 100, "offset": 1}}}
    # Stored before the reloaded page's script runs (the page itself would overwrite it
    # when it unloads).
    await amanda.add_init_script(
        f"sessionStorage.setItem({POSITIONS!r}, {json.dumps(json.dumps(bad))})"
    )
    await amanda.reload()
    await expect(amanda.locator("#state")).to_have_text("connected", timeout=20_000)
    assert ["x" * 100 in url for url in sockets] == [True, True, False]
    await amanda.wait_for_function(f"() => sessionStorage.getItem({POSITIONS!r}) !== null")
    stored = await saved_positions(amanda)
    assert stored["streams"]["all"]["epoch"] != "x" * 100
    await expect(amanda.locator("#notice")).to_be_hidden()
    assert problems == []


async def test_the_online_list_changes_when_another_user_logs_in_and_out(
    presence_server: Server, browser: Browser
) -> None:
    """amanda's page lists who of her group is online: herself, then lisa once she logs in,
    and not lisa once she has logged out (which also forgets her tab's positions)."""
    problems: list[str] = []
    base = presence_server.http_url + "/"
    async with client(presence_server, "anny") as anny:
        amanda = await log_in(browser, base, "amanda", problems)
        girls = amanda.locator("#online li[data-group=girls]")
        people = girls.locator(".person")
        # Whoever was online already comes from the presence answer.
        await expect(people).to_have_text(["you", "Anny"])
        await expect(girls.locator(".count")).to_have_text("2 online")

        lisa = await log_in(browser, base, "lisa", problems)
        await expect(people).to_have_text(["you", "Anny", "Lisa"])
        await expect(girls.locator(".count")).to_have_text("3 online")
        await expect(lisa.locator("#online li[data-group=girls] .person")).to_have_text(
            ["you", "Amanda", "Anny"]
        )
        await shot(amanda, "online-list")
        await lisa.wait_for_function(f"() => sessionStorage.getItem({POSITIONS!r}) !== null")
        await lisa.click("#logout button")
        await expect(lisa).to_have_url(base + "login")
        assert await lisa.evaluate(f"sessionStorage.getItem({POSITIONS!r})") is None
        await expect(people).to_have_text(["you", "Anny"])
        await expect(girls.locator(".count")).to_have_text("2 online")

        await anny.close()
        await expect(people).to_have_text(["you"])
        await expect(girls.locator(".count")).to_have_text("1 online")
        # Someone of another group changes nothing here.
        async with client(presence_server, "greg"):
            await amanda.wait_for_timeout(300)
            await expect(people).to_have_text(["you"])
            await expect(amanda.locator("#online li")).to_have_count(1)
        await shot(amanda, "online-list-after-logout")
    assert problems == []


@pytest.fixture
def admin_server(tmp_path: Path, demo_db: Path) -> Iterator[Server]:
    """The demo users, with the admin API on."""
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    with Server(tmp_path, {"WSFANOUT_API_KEYS": "browser-key"}).running() as running:
        yield running


async def test_an_operators_changes_show_on_the_open_page(
    admin_server: Server, browser: Browser
) -> None:
    """greg's open page: added to girls, it says so, offers girls as his group and shows
    their messages; taken out, it says so; disconnected by the operator, it goes to the
    login page, and its cookie no longer opens the message page."""
    problems: list[str] = []
    base = admin_server.http_url + "/"
    auth = {"authorization": "Bearer browser-key"}
    greg = await log_in(browser, base, "greg", problems)
    url = admin_server.http_url + "/api/users/greg"
    assert http("PUT", url + "/groups/girls", None, auth)[0] == 204
    await expect(lines(greg, "you were added to girls")).to_have_count(1)
    await expect(greg.locator("#group option[value=girls]")).to_have_text("girls (you are in it)")
    await expect(greg.locator("#online li[data-group=girls]")).to_have_count(1)
    body = {"type": "group", "group": "girls", "text": "for the girls", "from": "ops"}
    assert http("POST", admin_server.http_url + "/api/publish", body, auth)[0] == 202
    await expect(lines(greg, "for the girls")).to_have_count(1)
    assert http("DELETE", url + "/groups/girls", None, auth)[0] == 204
    await expect(lines(greg, "you were removed from girls")).to_have_count(1)
    await expect(greg.locator("#group option[value=girls]")).to_have_text("girls")
    await expect(greg.locator("#online li[data-group=girls]")).to_have_count(0)
    await shot(greg, "membership-changes")
    assert http("POST", url + "/disconnect", None, auth)[0] == 204
    await expect(greg).to_have_url(base + "login")
    await greg.goto(base)
    await expect(greg).to_have_url(base + "login")  # the cookie is worthless now
    assert problems == []


async def test_a_new_tab_shows_the_recent_history(server: Server, browser: Browser) -> None:
    """A tab with nothing kept shows what its streams said before it opened (asked with
    history), oldest first, then what comes live; each once."""
    problems: list[str] = []
    base = server.http_url + "/"
    async with client(server, "greg") as greg:
        await greg.send({"type": "broadcast", "text": "said before anyone came"})
        amanda = await log_in(browser, base, "amanda", problems)
        await expect(received(amanda, "said before anyone came")).to_have_count(1)
        earlier = ["said before anyone came", "for the girls", "for amanda", "for everyone"]
        for message in (
            {"type": "group", "group": "girls", "text": earlier[1]},
            {"type": "direct", "user_name": "amanda", "text": earlier[2]},
            {"type": "broadcast", "text": earlier[3]},
        ):
            await greg.send(message)  # one after the other, as people write
            await expect(received(amanda, str(message["text"]))).to_have_count(1)

        tab = await amanda.context.new_page()  # same login, a tab of its own: nothing kept
        tab.on("pageerror", lambda error: problems.append(f"new tab: uncaught {error}"))
        await tab.goto(base)
        await expect(tab.locator("#state")).to_have_text("connected")
        await expect(tab.locator("#messages li.received")).to_have_count(4)
        assert await texts(tab) == earlier
        await greg.send({"type": "broadcast", "text": "live"})
        await expect(received(tab, "live")).to_have_count(1)
        await tab.wait_for_timeout(300)  # anything extra would show by now
        assert await texts(tab) == [*earlier, "live"]
        await shot(tab, "new-tab-history")
    assert problems == []


@pytest.fixture
def token_server(tmp_path: Path, demo_db: Path) -> Iterator[Server]:
    """Connection tokens on (WSFANOUT_JWT_SECRET)."""
    shutil.copy(demo_db, tmp_path / "wsfanout.sqlite3")
    with Server(tmp_path, {"WSFANOUT_JWT_SECRET": JWT_SECRET}).running() as running:
        yield running


JWT_SECRET = "browser-test-jwt-secret-0123456789"


async def test_the_page_works_with_a_token_in_its_url(
    token_server: Server, browser: Browser
) -> None:
    """Opened with ?token= and no cookie, the page connects as the token's user (the socket
    carries the token), lists the directory and sends; a reload keeps it all."""
    problems: list[str] = []
    claims = {"sub": "nina", "groups": ["girls"], "name": "Nina", "exp": int(time.time()) + 600}
    url = f"{token_server.http_url}/?token={jwt.encode(claims, JWT_SECRET, algorithm='HS256')}"
    page = await (await browser.new_context()).new_page()
    page.on("pageerror", lambda error: problems.append(f"uncaught {error}"))
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    await page.goto(url)
    await expect(page.locator("#state")).to_have_text("connected")
    await expect(page.locator("#whoami")).to_have_text("nina")
    assert "token=" in sockets[0]
    await expect(page.locator("#user option[value=greg]")).to_have_text("Greg (greg)")
    await send(page, "broadcast", "a token is enough")
    await expect(received(page, "a token is enough")).to_have_count(1)
    await page.reload()
    await expect(page.locator("#state")).to_have_text("connected")
    await expect(received(page, "a token is enough")).to_have_count(1)
    assert await page.context.cookies() == []
    assert problems == []


async def test_the_documented_page_example_runs(server: Server, browser: Browser) -> None:
    """docs/clients/examples/page.html, served beside the service, connects with the page's
    cookie and sees its own broadcast."""
    problems: list[str] = []
    base = server.http_url + "/"
    greg = await log_in(browser, base, "greg", problems)
    example = docs.block("docs/clients/javascript.md", "test_the_documented_page_example_runs")
    assert example == (ROOT / "docs" / "clients" / "examples" / "page.html").read_text()

    async def serve(route: Route) -> None:
        await route.fulfill(body=example, content_type="text/html")

    await greg.route(base + "example.html", serve)
    await greg.goto(base + "example.html")
    log = greg.locator("#log li")
    await expect(log.filter(has_text="greg: hello from a page")).to_have_count(1)
    assert (await log.all_text_contents())[:2] == ["connecting ", "connected "]
    assert problems == []
