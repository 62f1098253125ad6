"""Both clients at once, as users run them: Python clients (``wsfanout.client``) and the
message page in Chromium (built on ``wsfanout.js``), all behind one network that is cut three
times while a backend publishes. Every acknowledged message must reach every client and every
tab exactly once and in order, without a loss notice."""

from __future__ import annotations

import asyncio
import collections
import functools
import os
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Page

from tests.chromium import ARGS as BROWSER_ARGS
from tests.chromium import NEEDED, launched
from tests.listener import SERVER_ENV, Listener, Publisher, token
from tests.proxy import Proxy
from tests.server import Server
from wsfanout.client import Client

# 50 tabs in one window: none may be treated as hidden and have its timers slowed
ARGS = [
    *BROWSER_ARGS,
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
]
# The suite runs a quarter of the figure (its time budget); CLIENTS_TOGETHER=full
# runs all of it: 200 clients, 50 tabs, 2,000 messages.
FULL = os.environ.get("CLIENTS_TOGETHER") == "full"
CLIENTS, TABS = (200, 50) if FULL else (100, 12)
MESSAGES, BATCH = (2000, 20) if FULL else (1000, 25)
# History long enough for any gap this test makes, and room for 250 connections' handshakes.
ENV = {**SERVER_ENV, "WSFANOUT_HISTORY_SIZE": "5000"}
SHOWN = "document.querySelectorAll('#messages li.received').length"
TEXTS = "[...document.querySelectorAll('#messages li.received .text')].map((e) => e.textContent)"

pytestmark = NEEDED


async def every_tab_shows(pages: list[Page], count: int, timeout: float = 60) -> None:
    """Wait until each tab shows at least ``count`` received messages, or fail saying where
    each tab that lags stands."""
    # Polled from here: the page's CSP forbids the eval that wait_for_function would need.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for page in pages:
        while await page.evaluate(SHOWN) < count:
            if loop.time() > deadline:
                lagging = [
                    (n, shown, await other.locator("#state").text_content())
                    for n, other in enumerate(pages)
                    if (shown := await other.evaluate(SHOWN)) < count
                ]
                raise AssertionError(f"tabs short of {count} (tab, shown, state): {lagging}")
            await asyncio.sleep(0.05)


async def every_client_has(listeners: list[Listener], count: int, timeout: float = 60) -> None:
    for listener in listeners:
        await listener.until(functools.partial(has, listener, count), timeout)


def has(listener: Listener, count: int) -> bool:
    return len(listener.texts()) >= count


def check(got: list[str], sent: list[str]) -> tuple[int, int, int]:
    """Gaps, duplicates and whether the order differs, of what one client or tab got."""
    return len(set(sent) - set(got)), len(got) - len(set(got)), int(got != sent)


@pytest.mark.slow(26)
@pytest.mark.timeout(300)
async def test_two_thousand_messages_reach_python_clients_and_page_tabs_through_three_resets(
    tmp_path: Path,
) -> None:
    """2,000 messages published while the network resets every connection three times reach
    each of 200 Python clients and 50 page tabs with no gap, no duplicate, in order, and no
    tab shows a loss notice (in the suite: 1,000, 100 and 12)."""
    texts = [f"n{n}" for n in range(MESSAGES)]
    with Server(tmp_path, ENV).running() as node:
        async with Proxy(node.port) as proxy, launched(ARGS) as browser:
            problems: list[str] = []
            pages: list[Page] = []
            clients = [Client(proxy.ws_url, token=token(f"c{n}")) for n in range(CLIENTS)]
            listeners: list[Listener] = []
            try:
                context = await browser.new_context()
                for n in range(TABS):
                    page = await context.new_page()
                    page.on("pageerror", lambda error: problems.append(f"uncaught {error}"))
                    await page.goto(f"http://127.0.0.1:{proxy.port}/?token={token(f't{n}')}")
                    pages.append(page)
                await asyncio.gather(*(chat.connect() for chat in clients))
                listeners = [Listener(chat) for chat in clients]
                for page in pages:
                    await page.wait_for_function(
                        "document.getElementById('state').textContent === 'connected'"
                    )
                publisher = Publisher()
                for start in range(0, MESSAGES, BATCH):
                    if start and start % (MESSAGES // 4) == 0:  # three times: everyone cut off
                        await every_client_has(listeners, start)
                        await every_tab_shows(pages, start)
                        assert proxy.reset() >= CLIENTS + TABS
                    assert await publisher.publish_batch(node, texts[start : start + BATCH])
                await every_client_has(listeners, MESSAGES, 120)
                await every_tab_shows(pages, MESSAGES, 120)
                shown: list[list[str]] = [await page.evaluate(TEXTS) for page in pages]
                notices = [await page.locator("#notice").is_visible() for page in pages]
            finally:
                await asyncio.gather(*(listener.stop() for listener in listeners))
                await asyncio.gather(*(chat.close() for chat in clients))
    results: dict[str, Any] = {}
    for name, gots in (("python", [lr.texts() for lr in listeners]), ("page", shown)):
        totals = [sum(column) for column in zip(*(check(got, texts) for got in gots), strict=True)]
        counts = collections.Counter(len(got) for got in gots)
        results[name] = {
            "clients": len(gots),
            "messages each": dict(counts),
            "gaps": totals[0],
            "duplicates": totals[1],
            "out of order": totals[2],
        }
    resumes = collections.Counter(
        str(e["recovered"]) for listener in listeners for e in listener.of("resumed")
    )
    print(f"\nresets {proxy.resets}; resumed (Python clients) {dict(resumes)}; {results}")
    assert publisher.acked == texts
    for name in results:
        assert (results[name]["gaps"], results[name]["duplicates"]) == (0, 0), results
        assert results[name]["out of order"] == 0, results
    assert resumes == {"True": CLIENTS * 3}
    assert not any(notices), "a tab says messages were lost"
    assert problems == []
