"""The asyncio Python client (DESIGN 11): it logs in, reconnects with full-jitter backoff and
resumes where the application stands, so an application sees every message once and in
order, or is told which streams it lost.

```python
from wsfanout.client import Client
async with Client("ws://127.0.0.1:8000/", username="greg", password="Greg-demo") as chat:
    ack = await chat.send({"type": "group", "group": "boys", "text": "hi"})
    async for event in chat:
        ...
```

It imports ``wsfanout.protocol`` and nothing else of the server (``pyproject.toml`` holds
the contract). Needs ``websockets``: the ``client`` extra (``pip install '.[client]'`` in a clone).
"""

from __future__ import annotations

try:
    import websockets  # noqa: F401
except ImportError as exc:  # the extra is missing: say which
    raise ImportError(
        "wsfanout.client needs websockets, wsfanout's client extra: pip install '.[client]' "
        "in wsfanout's source"
    ) from exc

from .connection import Client, State
from .events import ClientError

__all__ = ["Client", "ClientError", "State"]
