"""Starting a server's ``send()`` without a task, and finishing it in one.

Theory of operation. Fan-out must not wake one task per recipient per message: a
task switch costs more than hypercorn's send itself. So the flusher (outbox.py) calls
``send(message)`` for an idle connection and takes the coroutine's first step by hand,
``coroutine.send(None)``, inside its own task. Hypercorn's send nearly always runs to
the end in that step (it writes to the transport's buffer) and raises StopIteration:
done, no task involved. When it does suspend (the socket buffer is full and it awaits
``drain()``, or a ping holds its lock), the step returns what the coroutine yielded:
the asyncio future it waits on, or None for a bare yield. That half-done coroutine is
handed to the connection's writer task, which calls ``finish()``: it waits for that
future as a task would and then drives the coroutine to its end, step by step.

This leans on how asyncio itself drives coroutines (``Task.__step``), which is not a
public interface: a future yielded to a task has ``_asyncio_future_blocking`` set, and
the task clears it before waiting. ``finish`` does the same. ``tests/test_eager.py``
fails if asyncio stops behaving that way. It was kept after measuring (issue 10): waking
each writer instead costs ~10 % more server CPU per delivery in the paced and group
scenarios and triples the paced p99 latency.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Coroutine
from typing import Any


def as_coroutine(awaitable: Awaitable[None]) -> Coroutine[Any, Any, None]:
    """Servers' send() is a coroutine function (hypercorn's is); wrap anything else."""
    if isinstance(awaitable, Coroutine):
        return awaitable  # a coroutine of another kind (Cython, say)

    async def wrapped() -> None:
        await awaitable

    return wrapped()


async def finish(send: Coroutine[Any, Any, None], blocked_on: Any) -> None:
    """Drive a send coroutine that suspended outside any task, as a task would.

    ``blocked_on`` is what its last step yielded: the future it waits for (or None, to
    be resumed on the next loop iteration). Cancelled meanwhile, it cancels that
    future and lets the send see the cancellation, as ``Task.cancel`` does.
    """
    while True:
        try:
            if blocked_on is None:
                await asyncio.sleep(0)
            else:
                blocked_on._asyncio_future_blocking = False
                await asyncio.wait((blocked_on,))
        except asyncio.CancelledError:
            if blocked_on is not None:
                blocked_on.cancel()
            try:
                send.send(None)
            except BaseException:  # noqa: S110 - the send ends with the cancellation
                pass
            else:
                send.close()
            raise
        try:
            blocked_on = send.send(None)
        except StopIteration:
            return
