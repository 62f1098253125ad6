"""hypercorn serving a wsfanout app in the test's own event loop, on a socket bound to
127.0.0.1:0: for tests that look at (or count calls into) the server's objects."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

from wsfanout import Settings, create_app
from wsfanout.app import App


@contextlib.asynccontextmanager
async def hypercorn_serving(settings: Settings) -> AsyncIterator[tuple[App, int]]:
    """The started app and its port; hypercorn stops (and the app with it) on exit."""
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    sock = socket.socket()  # hypercorn closes it as it stops
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{sock.fileno()}"]
    config.accesslog = config.errorlog = None
    stop = asyncio.Event()
    app = create_app(settings)
    server = asyncio.create_task(serve(app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
    try:
        for _ in range(200):
            if app.service is not None:  # started by hypercorn's lifespan
                break
            await asyncio.sleep(0.05)
        assert app.service is not None, "hypercorn did not start the app"
        yield app, port
    finally:
        stop.set()
        await server
        with contextlib.suppress(OSError):
            sock.close()


@contextlib.asynccontextmanager
async def uvicorn_serving(settings: Settings) -> AsyncIterator[tuple[App, int]]:
    """The same under uvicorn, with the protocols ``wsfanout serve --server uvicorn`` gives it."""
    import uvicorn

    from wsfanout.servers.uvicorn import HeadTimedH11Protocol
    from wsfanout.servers.uvicorn_sansio import ExplainingSansIOProtocol

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    app = create_app(settings)
    config = uvicorn.Config(
        app, http=HeadTimedH11Protocol, ws=ExplainingSansIOProtocol, log_config=None, lifespan="on"
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(200):
            if server.started:
                break
            await asyncio.sleep(0.05)
        assert server.started, "uvicorn did not start"
        yield app, port
    finally:
        server.should_exit = True
        await serving
        with contextlib.suppress(OSError):
            sock.close()
