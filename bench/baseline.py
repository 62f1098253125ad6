"""The baseline: a bare ASGI broadcast app, the least an app can do under a server.

Inbound text frames are ``*|payload`` (to everyone) or ``group|payload`` (to the
sockets that joined with ``?g=group``); each recipient gets ``payload`` as one
frame, awaited in turn. No auth, no JSON, no queues: what it costs is the server's
own per-frame cost, the floor wsfanout is measured against (``baseline`` under
hypercorn, ``baseline-uvicorn`` under uvicorn).

Run: ``hypercorn bench.baseline:app``, or ``uvicorn --ws websockets-sansio bench.baseline:app``.
"""

from __future__ import annotations

from urllib.parse import parse_qs

from wsfanout.types import Receive, Scope, Send

everyone: set[Send] = set()
groups: dict[str, set[Send]] = {}


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "http":
        body = b'{"status":"ok"}'
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})
        return
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    group = parse_qs(scope["query_string"].decode()).get("g", [""])[0]
    everyone.add(send)
    groups.setdefault(group, set()).add(send)
    try:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            target, _, payload = message["text"].partition("|")
            recipients = everyone if target == "*" else groups.get(target, set())
            event = {"type": "websocket.send", "text": payload}
            for recipient in list(recipients):
                await recipient(event)
    finally:
        everyone.discard(send)
        groups[group].discard(send)
