"""eager: a coroutine started by hand and finished in a task, as asyncio itself would.

These fail if asyncio changes how it drives coroutines, which eager.py leans on.
"""

from __future__ import annotations

import asyncio

import pytest

from wsfanout import eager


async def test_asyncio_futures_still_mark_themselves_blocking() -> None:
    """A future awaited by a coroutine is yielded with ``_asyncio_future_blocking`` set."""
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def waits() -> None:
        await future

    coroutine = waits()
    yielded = coroutine.send(None)
    assert yielded is future
    assert future._asyncio_future_blocking is True
    future.set_result(None)
    with pytest.raises(StopIteration):
        coroutine.send(None)


async def test_a_send_that_suspends_is_finished_in_order() -> None:
    """Started by hand, suspended on a future and on a bare yield, it is driven to its end."""
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    steps: list[str] = []

    async def send() -> None:
        steps.append("start")
        await gate
        steps.append("after gate")
        await asyncio.sleep(0)  # a bare yield: the coroutine yields None
        steps.append("done")

    coroutine = send()
    blocked_on = coroutine.send(None)
    assert blocked_on is gate and steps == ["start"]
    finishing = asyncio.create_task(eager.finish(coroutine, blocked_on))
    await asyncio.sleep(0)
    assert steps == ["start"]
    gate.set_result(None)
    await asyncio.wait_for(finishing, 1)
    assert steps == ["start", "after gate", "done"]


async def test_cancelling_the_finisher_cancels_the_send() -> None:
    """Cancelled while it waits, the send sees CancelledError and its future is cancelled."""
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    seen: list[str] = []

    async def send() -> None:
        try:
            await gate
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    coroutine = send()
    finishing = asyncio.create_task(eager.finish(coroutine, coroutine.send(None)))
    await asyncio.sleep(0)
    finishing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await finishing
    assert gate.cancelled() and seen == ["cancelled"]


async def test_any_awaitable_becomes_a_coroutine() -> None:
    """A send() that returns a plain future is wrapped so it can be stepped by hand."""
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    coroutine = eager.as_coroutine(future)
    assert coroutine.send(None) is future
    future.set_result(None)
    with pytest.raises(StopIteration):
        coroutine.send(None)
