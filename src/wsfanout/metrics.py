"""Prometheus metrics, read from plain counters at scrape time.

The hot path only adds to integers (per publish, per frame); nothing here runs
until ``/metrics`` is scraped, so counting costs no lock and no call per recipient.
Every labelled counter is exported for each of its known labels from the start, at 0:
a series that appears only with its first event breaks ``rate()`` and alerts on it.
"""

from __future__ import annotations

import asyncio
import enum
import gc
from collections.abc import Iterator, Mapping
from typing import Final, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .hub import Hub
from .outbox import WriterStats
from .protocol import Kind, Source

OUTBOX_BUCKETS: Final = (0, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)


class Refused(enum.StrEnum):
    """Why a websocket handshake was refused: the ``reason`` of
    ``wsfanout_handshakes_refused`` (``admission.Refusal`` names one)."""

    SHUTTING_DOWN = "shutting_down"
    ORIGIN = "origin"
    FULL = "full"  # this process's connections
    USER_FULL = "user_full"  # one user's connections
    NO_SESSION = "no_session"
    BAD_TOKEN = "bad_token"  # noqa: S105 - a label, not a secret
    EXPIRED = "expired"
    REVOKED = "revoked"
    DATABASE = "database"
    BAD_RESUME = "bad_resume"
    AUTHENTICATE_TIMEOUT = "authenticate_timeout"
    AUTHENTICATE_FAILED = "authenticate_failed"


class LoginFailed(enum.StrEnum):
    """Why a login failed: the ``reason`` of ``wsfanout_login_failures``."""

    PASSWORD = "password"  # noqa: S105 - a label: a wrong username or password
    THROTTLED = "throttled"


class ServiceStats:
    """Counters kept outside the fan-out path: handshakes and logins."""

    def __init__(self) -> None:
        self.refused: dict[str, int] = dict.fromkeys(Refused, 0)
        self.login_failures: dict[str, int] = dict.fromkeys(LoginFailed, 0)
        self.resumes = {"recovered": 0, "lost": 0}  # resumed connections, by outcome
        self.replayed = 0  # messages sent by those resumes
        self.floods = 0  # connections closed for sending far past the rate limit

    def refuse(self, reason: Refused) -> None:
        self.refused[reason] += 1  # every reason is there from the start, at 0

    def login_failed(self, reason: LoginFailed) -> None:
        self.login_failures[reason] += 1


class Queue(Protocol):
    """A queue of lifecycle events on their way out (``webhooks.Webhook``)."""

    stats: dict[str, int]

    def __len__(self) -> int: ...


class Metrics(Collector):
    """One registry per app: several apps in one process do not mix their numbers."""

    def __init__(self, hub: Hub, writers: WriterStats, service: ServiceStats) -> None:
        self.hub = hub
        self.writers = writers
        self.service = service
        self.amqp: Mapping[str, int] | None = None  # the RabbitMQ source's counters, if any
        self.hooks: Mapping[str, int] | None = None  # the host's hooks' counters, if any
        self.webhook: Queue | None = None  # the webhook's queue, if any
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        hub, writers = self.hub, self.writers
        yield GaugeMetricFamily("wsfanout_connections", "Open websocket connections.", len(hub))
        yield GaugeMetricFamily(
            "wsfanout_asyncio_tasks",
            "Tasks alive on the event loop that serves this scrape (all of the process's, "
            "the server's included): flat under steady load, or something leaks them.",
            _tasks(),
        )
        yield GaugeMetricFamily(
            "wsfanout_gc_frozen_objects",
            "Objects gc.freeze() moved out of the collector's reach at start-up (0: the "
            "collector is not tuned, WSFANOUT_GC).",
            gc.get_freeze_count(),
        )
        collections = CounterMetricFamily(
            "wsfanout_gc_collections",
            "Python garbage collections by generation (2: those that walk every object).",
            labels=["generation"],
        )
        for generation, stats in enumerate(gc.get_stats()):
            collections.add_metric([str(generation)], stats["collections"])
        yield collections
        published = CounterMetricFamily(
            "wsfanout_messages_published", "Messages published.", labels=["kind", "source"]
        )
        done = hub.stats.published
        for kind in Kind:
            for source in Source:
                published.add_metric([kind, source], done.get((kind, source), 0))
        yield published
        yield CounterMetricFamily(
            "wsfanout_duplicates_dropped",
            "Backends' publishes taken but not published: their stream had their "
            "idempotency_key within WSFANOUT_IDEMPOTENCY_TTL (counted where they were dropped: "
            "the node that took them, or with Redis the node that handed them to Redis).",
            hub.backplane.duplicates,
        )
        yield CounterMetricFamily(
            "wsfanout_deliveries", "Events handed to local connections.", hub.stats.deliveries
        )
        yield CounterMetricFamily(
            "wsfanout_frames_sent", "Websocket frames sent to clients.", writers.frames
        )
        yield CounterMetricFamily(
            "wsfanout_events_sent", "Events sent to clients, batched or not.", writers.events
        )
        yield _histogram(
            "wsfanout_batch_size",
            "Events per sent frame.",
            [(2 ** (i + 1)) - 1 for i in range(len(writers.batch_sizes) - 1)],
            writers.batch_sizes,
            writers.events,
        )
        sizes = [outbox.queued_bytes for outbox in hub.outboxes()]
        counts = [0] * (len(OUTBOX_BUCKETS) + 1)
        for size in sizes:
            counts[next((i for i, b in enumerate(OUTBOX_BUCKETS) if size <= b), -1)] += 1
        yield _histogram(
            "wsfanout_outbox_bytes",
            "Bytes queued per connection, sampled at scrape.",
            list(OUTBOX_BUCKETS),
            counts,
            sum(sizes),
        )
        yield CounterMetricFamily(
            "wsfanout_slow_consumer_disconnects",
            "Connections closed with 1013 because their outbox overflowed.",
            hub.stats.slow_consumers,
        )
        yield CounterMetricFamily(
            "wsfanout_flood_disconnects",
            "Connections closed with 1008 for sending far past the rate limit.",
            self.service.floods,
        )
        refused = CounterMetricFamily(
            "wsfanout_handshakes_refused", "Websocket handshakes refused.", labels=["reason"]
        )
        for reason, count in sorted(self.service.refused.items()):
            refused.add_metric([reason], count)
        yield refused
        resumes = CounterMetricFamily(
            "wsfanout_resumes",
            "Connections that resumed: everything recovered, or some stream lost.",
            labels=["outcome"],
        )
        for outcome, count in sorted(self.service.resumes.items()):
            resumes.add_metric([outcome], count)
        yield resumes
        yield CounterMetricFamily(
            "wsfanout_replayed_messages",
            "Messages replayed to resuming clients.",
            self.service.replayed,
        )
        failures = CounterMetricFamily(
            "wsfanout_login_failures", "Failed or throttled logins.", labels=["reason"]
        )
        for reason, count in sorted(self.service.login_failures.items()):
            failures.add_metric([reason], count)
        yield failures
        if self.amqp is not None:
            yield _outcomes(
                "wsfanout_amqp_messages",
                "RabbitMQ messages by outcome: acked, rejected (bad), requeued (retry later).",
                self.amqp,
                ("acked", "rejected", "requeued"),
            )
            yield CounterMetricFamily(
                "wsfanout_amqp_reconnects",
                "Times the RabbitMQ connection was re-established.",
                self.amqp.get("reconnects", 0),
            )
        yield from self._lifecycle()

    def _lifecycle(self) -> Iterator[Metric]:
        """The lifecycle events (DESIGN 12): the host's hooks, the webhook."""
        if self.hooks is not None:
            yield _outcomes(
                "wsfanout_hook_events",
                "Lifecycle events handed to the host's hooks: delivered, failed (the hook "
                "raised), dropped (its queue was full).",
                self.hooks,
                ("delivered", "failed", "dropped"),
            )
        webhook = self.webhook
        if webhook is not None:
            yield _outcomes(
                "wsfanout_webhook_events",
                "Lifecycle events posted to WSFANOUT_WEBHOOK_URL: sent (answered 2xx), "
                "rejected (answered 4xx), dropped (the queue was full, or shutting down).",
                webhook.stats,
                ("sent", "rejected", "dropped"),
            )
            yield CounterMetricFamily(
                "wsfanout_webhook_retries",
                "Webhook posts that failed and were tried again.",
                webhook.stats.get("retries", 0),
            )
            yield GaugeMetricFamily(
                "wsfanout_webhook_queue", "Lifecycle events waiting to be posted.", len(webhook)
            )


def _tasks() -> int:
    """The running loop's live tasks; 0 when scraped outside a loop (``render()`` from a thread)."""
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:
        return 0


def _outcomes(
    name: str, doc: str, counts: Mapping[str, int], outcomes: tuple[str, ...]
) -> CounterMetricFamily:
    """A counter labelled by ``outcome``: each of ``outcomes`` as ``counts`` has it (0 if not)."""
    family = CounterMetricFamily(name, doc, labels=["outcome"])
    for outcome in outcomes:
        family.add_metric([outcome], counts.get(outcome, 0))
    return family


def _histogram(
    name: str, doc: str, bounds: list[int], counts: list[int], total: float
) -> HistogramMetricFamily:
    """A histogram from per-bucket (not cumulative) counts; the last count is +Inf."""
    cumulative, buckets = 0, []
    for bound, count in zip([*map(str, bounds), "+Inf"], counts, strict=True):
        cumulative += count
        buckets.append((bound, cumulative))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=total)
