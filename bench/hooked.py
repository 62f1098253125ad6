"""wsfanout with the host's lifecycle hooks (DESIGN 12), for the "hooks" scenario: a hook
that hangs or fails must not slow fan-out down.

``BENCH_HOOK`` says what the hook does with every event: ``sleep`` (5 s; events pile up in
the bounded queue, and past it are dropped and counted) or ``raise`` (logged and counted).
Run as ``hypercorn bench.hooked:app``; settings from ``WSFANOUT_*`` as ``wsfanout:app``.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from wsfanout import create_app

HOOK = os.environ.get("BENCH_HOOK", "sleep")


async def hook(event: dict[str, Any]) -> None:
    if HOOK == "raise":
        raise RuntimeError("the bench's hook fails on purpose")
    await asyncio.sleep(5)


app = create_app(hooks=hook)
