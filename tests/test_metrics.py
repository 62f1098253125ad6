"""metrics: /metrics in Prometheus text format, counted per publish and per frame."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests import asgi
from tests.conftest import login
from tests.server import ROOT, demo_server, http
from wsfanout import App, Settings, create_app


def samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_metrics_count_what_happened(app: App) -> None:
    """Connections, publishes by kind, deliveries, frames, refusals and login failures."""
    failed = await asgi.request(app, "POST", "/login", json={"username": "greg", "password": "x"})
    assert failed.status == 401
    try:
        async with asgi.WebSocket(app):
            pass
    except asgi.Refused:
        pass
    greg, lisa = await login(app, "greg"), await login(app, "lisa")
    async with (
        asgi.WebSocket(app, headers={"cookie": greg}) as g,
        asgi.WebSocket(app, headers={"cookie": lisa}) as li,
    ):
        await g.receive(), await li.receive()
        await g.send_json({"type": "broadcast", "text": "hi"})
        await g.receive(), await li.receive()
        await g.send_json({"type": "group", "group": "girls", "text": "hey"})
        await li.receive()
        response = await asgi.request(app, "GET", "/metrics")
    assert response.status == 200
    assert (response.header("content-type") or "").startswith("text/plain; version=0.0.4")
    found = samples(response.body)
    assert found[("wsfanout_connections", ())] == 2
    assert (
        found[
            ("wsfanout_messages_published_total", (("kind", "broadcast"), ("source", "websocket")))
        ]
        == 1
    )
    assert (
        found[("wsfanout_messages_published_total", (("kind", "group"), ("source", "websocket")))]
        == 1
    )
    assert found[("wsfanout_deliveries_total", ())] == 3
    assert found[("wsfanout_events_sent_total", ())] == 5  # 2 welcomes + 3 messages
    frames = found[("wsfanout_frames_sent_total", ())]
    assert 1 <= frames <= 5
    assert found[("wsfanout_batch_size_count", ())] == frames
    assert found[("wsfanout_batch_size_sum", ())] == 5
    assert found[("wsfanout_outbox_bytes_count", ())] == 2
    assert found[("wsfanout_handshakes_refused_total", (("reason", "no_session"),))] == 1
    assert found[("wsfanout_login_failures_total", (("reason", "password"),))] == 1
    assert found[("wsfanout_slow_consumer_disconnects_total", ())] == 0


async def test_two_apps_do_not_share_metrics(app: App, settings: Settings) -> None:
    """Each app has its own registry."""
    other = create_app(settings)
    await login(app, "greg")
    failed = await asgi.request(app, "POST", "/login", json={"username": "greg", "password": "x"})
    assert failed.status == 401
    failure = b'wsfanout_login_failures_total{reason="password"} 1.0'
    mine = await asgi.request(app, "GET", "/metrics")
    assert mine.status == 200 and failure in mine.body
    theirs = await asgi.request(other, "GET", "/metrics")
    assert theirs.status == 200 and b"wsfanout_connections" in theirs.body
    assert b'wsfanout_login_failures_total{reason="password"} 0.0' in theirs.body
    await other.shutdown()


async def test_tasks_gauge_counts_the_loops_tasks(app: App) -> None:
    """wsfanout_asyncio_tasks is the event loop's live tasks: a connection's own tasks
    raise it while it is open (what `just soak` watches for leaks)."""

    async def tasks() -> float:
        found = samples((await asgi.request(app, "GET", "/metrics")).body)
        return found[("wsfanout_asyncio_tasks", ())]

    idle = await tasks()
    assert idle >= 1  # the test's own task, at least
    greg = await login(app, "greg")
    async with asgi.WebSocket(app, headers={"cookie": greg}) as g:
        await g.receive()
        busy = await tasks()
        assert busy > idle
    assert await tasks() < busy


async def test_resumes_are_counted_by_outcome(app: App) -> None:
    """Each resumed connection counts as recovered or lost, with the messages replayed."""
    greg = await login(app, "greg")
    async with asgi.WebSocket(app, headers={"cookie": greg}) as g:
        streams = (await g.receive())["streams"]
        await g.send_json({"type": "broadcast", "text": "one", "id": "1"})
        await asgi.until(g, "ack")
    for positions in (streams, {"all": {"epoch": "stale", "offset": 0}}):
        query = asgi.resume_query(positions)
        async with asgi.WebSocket(app, headers={"cookie": greg}, query=query) as g:
            await asgi.until(g, "resumed")
    found = samples((await asgi.request(app, "GET", "/metrics")).body)
    assert found[("wsfanout_resumes_total", (("outcome", "recovered"),))] == 1
    assert found[("wsfanout_resumes_total", (("outcome", "lost"),))] == 1
    assert found[("wsfanout_replayed_messages_total", ())] == 1


def documented_metrics() -> list[str]:
    """The metrics the docs list, as /metrics names them (counters with ``_total``)."""
    page = ROOT / "docs" / "operating" / "metrics.md"
    if page.exists():
        text = page.read_text()
    else:  # before the docs site: the README's section
        readme = (ROOT / "README.md").read_text()
        text = readme[readme.index("## Metrics and lifecycle") :]
    first = text[: text.index("\n\n", text.index("GET /metrics"))]
    return re.findall(r"`(wsfanout_[a-z_]+)(?:\{[a-z,]+\})?`", first)


def test_a_fresh_server_exports_every_documented_metric(tmp_path: Path, demo_db: Path) -> None:
    """A server that has seen nothing lists every metric the docs name, its counters at
    0 for each known label (kind and source, each refusal and login failure): a series
    that appeared only with its first event would break rate() and alerts on it."""
    names = documented_metrics()
    assert "wsfanout_handshakes_refused_total" in names and len(names) >= 14, names
    with demo_server(tmp_path, demo_db, {}) as server:
        status, headers = http("GET", server.http_url + "/metrics")
    assert status == 200
    found = samples(headers["_body"].encode())
    exported = {name for name, _ in found}
    for name in names:
        assert name in exported or f"{name}_count" in exported, name  # histograms: _count
    for kind in ("broadcast", "group", "direct"):
        for source in ("websocket", "api", "amqp", "app"):
            labels = (("kind", kind), ("source", source))
            assert found[("wsfanout_messages_published_total", labels)] == 0
    for reason in ("origin", "no_session", "bad_token", "full", "user_full", "revoked"):
        assert found[("wsfanout_handshakes_refused_total", (("reason", reason),))] == 0
    for reason in ("password", "throttled"):
        assert found[("wsfanout_login_failures_total", (("reason", reason),))] == 0
