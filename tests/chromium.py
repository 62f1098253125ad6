"""Debian's Chromium for browser tests: where it is, how it is launched, and the mark that
skips a module without it (except under CI, where a missing browser must fail)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from playwright.async_api import Browser, async_playwright

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # A page a test serves through a route (the documented example) has no address of its
    # own, so Chromium counts it as public and would block its socket to 127.0.0.1.
    "--disable-features=LocalNetworkAccessChecks",
]
NEEDED = pytest.mark.skipif(
    not CHROMIUM.exists() and os.environ.get("CI") != "true",
    reason="Debian's chromium is not installed here (apt-get install chromium); CI installs it",
)


@contextlib.asynccontextmanager
async def launched(args: Sequence[str] = ARGS) -> AsyncIterator[Browser]:
    """Chromium, launched with ``args`` through Playwright, closed on the way out."""
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=args)
        try:
            yield browser
        finally:
            await browser.close()
