"""servers/resets.py on each event loop a server runs wsfanout on: resetting a connection
that is already closed is a no-op, never an exception in the app."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import uvloop

from wsfanout.servers.resets import reset, unsent

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_a_closed_connection_is_reset_without_an_error(loop_name: str) -> None:
    """A connection whose transport has closed (its client left) is reset quietly, and has
    nothing unsent: under uvloop its socket's descriptor is -1 then, which raised
    ValueError out of the app ("negative file descriptor") under wsfanout serve."""

    async def closed_then_reset() -> int:
        async def hang_up(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
        try:
            port = server.sockets[0].getsockname()[1]
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            assert writer.transport.get_extra_info("socket") is not None  # as servers ask
            writer.close()
            await writer.wait_closed()
            reset(writer.transport)  # raised under uvloop
            return unsent(writer.transport)
        finally:
            server.close()

    loop = LOOPS[loop_name]()
    try:
        assert loop.run_until_complete(closed_then_reset()) == 0
    finally:
        loop.close()
