"""The monitor's bounds that count what they drop: the feedback subscription's queue, the resolved-alert
history and the alert webhook's POSTs in flight (loom_monitor_dropped_total / loom_monitor_evicted_total)."""

from __future__ import annotations

import asyncio
import contextlib
import types
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import nats.errors
import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from services.common import subjects
from services.common.bus import Bus
from services.monitor import gauges
from services.monitor.alerts import AlertBook, condition
from services.monitor.notify import Notifier
from services.monitor.service import Monitor
from services.monitor.settings import MonitorSettings
from tests.loopback import serve_http

pytestmark = pytest.mark.unit


def exported(name: str, buffer: str) -> float:
    value = REGISTRY.get_sample_value(name, {"buffer": buffer})
    assert value is not None, f"{name}{{buffer={buffer!r}}} is not exported"
    return value


@dataclass
class RecordingBus:
    """Stands in for the bus in Monitor.start: records subscriptions, publishes nowhere."""

    subscriptions: dict[str, dict[str, Any]] = field(default_factory=dict)
    published: list[str] = field(default_factory=list)
    connected: bool = False

    async def subscribe(self, subject: str, handler: Any, **kwargs: Any) -> None:
        self.subscriptions[subject] = kwargs

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> None:
        self.published.append(subject)

    def pending(self) -> dict[str, int]:
        return {}


@pytest.fixture
def monitor() -> Iterator[Monitor]:
    settings = MonitorSettings(
        rollout_enabled=False,
        feedback_buffer=37,
        eval_interval_s=3600,
        triton_url="127.0.0.1:1",
        triton_metrics_url="http://127.0.0.1:1/metrics",
    )
    m = Monitor(settings)
    try:
        yield m
    finally:
        with contextlib.suppress(KeyError):  # Monitor.stop unregisters it too
            REGISTRY.unregister(m.triton)


async def test_feedback_subscription_is_bounded_and_its_drops_are_counted(monitor: Monitor) -> None:
    bus = RecordingBus()
    rt = types.SimpleNamespace(bus=bus, pipelines=types.SimpleNamespace(names=lambda: []))
    await monitor.start(rt)  # type: ignore[arg-type]
    try:
        assert bus.subscriptions[subjects.FEEDBACK_ALL]["pending_limit"] == 37
        assert bus.subscriptions[subjects.TELEMETRY_ALL]["pending_limit"] == monitor.ms.telemetry_buffer
        gauges.update(monitor, 0)
        before = exported("loom_monitor_dropped_total", "feedback")
        assert gauges.dropped_totals(monitor)["feedback"] == before
        # What nats-py reports when the feedback subscription's queue is full, through the real bus callback.
        sub = types.SimpleNamespace(subject=subjects.FEEDBACK_ALL)
        real = Bus("monitor")
        for _ in range(3):
            await real._on_error(nats.errors.SlowConsumerError("loom.fb.embed", "", 7, sub))  # type: ignore[arg-type]
        assert exported("loom_monitor_dropped_total", "feedback") == before + 3
    finally:
        await monitor.stop()


async def test_slow_consumer_drops_are_told_apart_by_subscription(monitor: Monitor) -> None:
    real = Bus("monitor")
    tel, fb = monitor.telemetry_dropped(), monitor.feedback_dropped()
    await real._on_error(
        nats.errors.SlowConsumerError("loom.tel.gateway", "", 1, types.SimpleNamespace(subject=subjects.TELEMETRY_ALL))  # type: ignore[arg-type]
    )
    assert (monitor.telemetry_dropped(), monitor.feedback_dropped()) == (tel + 1, fb)


def test_resolved_alert_history_counts_its_evictions(monitor: Monitor) -> None:
    book = AlertBook(history=3)
    for i in range(5):
        c = condition("LoomDriftHigh", "P2", {"feature": f"f{i}"}, True, 0.3, "drifted")
        book.evaluate([c], 1_000 * i)  # f{i} fires, f{i-1} resolves
    book.evaluate([], 10_000)  # the last one resolves too
    assert len(book.resolved) == 3 and book.evicted == 2
    assert [a.labels["feature"] for a in book.resolved] == ["f2", "f3", "f4"]
    monitor.alerts = book
    assert gauges.evicted_totals(monitor)["alerts"] == 2.0
    gauges.update(monitor, 0)
    assert exported("loom_monitor_evicted_total", "alerts") == 2.0


@dataclass
class StalledHook:
    """A webhook receiver that holds every POST until released."""

    url: str = ""
    received: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
async def hook() -> AsyncIterator[StalledHook]:
    stalled = StalledHook()

    async def post(request: web.Request) -> web.Response:
        stalled.received += 1
        await request.read()
        await stalled.release.wait()
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/hook", post)
    async with serve_http(app) as port:
        stalled.url = f"http://127.0.0.1:{port}/hook"
        try:
            yield stalled
        finally:
            stalled.release.set()


async def test_webhook_posts_in_flight_are_capped_and_the_rest_counted(hook: StalledHook) -> None:
    bus = RecordingBus()
    book = AlertBook()
    async with aiohttp.ClientSession() as session:
        notifier = Notifier(bus, session, hook.url, max_pending=4, timeout_s=30)  # type: ignore[arg-type]
        for i in range(10):
            changed = book.evaluate([condition("LoomDriftHigh", "P2", {"feature": f"f{i}"}, True, 0.3, "d")], i)
            await notifier.send(changed, book.firing())
        assert len(notifier._tasks) == 4 and notifier.dropped == 6
        assert len(bus.published) == 10 + 9  # NATS still carries every transition (10 fired, 9 resolved)
        for _ in range(200):  # the four POSTs reach the stalled receiver (bounded wait)
            if hook.received == 4:
                break
            await asyncio.sleep(0.01)
        assert hook.received == 4
        hook.release.set()
        for _ in range(200):
            if not notifier._tasks:
                break
            await asyncio.sleep(0.01)
        assert not notifier._tasks
        changed = book.evaluate([], 100)
        await notifier.send(changed, book.firing())  # room again: this one is posted
        assert notifier.dropped == 6 and len(notifier._tasks) == 1
        await asyncio.gather(*notifier._tasks)
    assert hook.received == 5


def test_webhook_drops_are_exported(monitor: Monitor) -> None:
    notifier = types.SimpleNamespace(dropped=5)
    monitor._notifier = notifier  # type: ignore[assignment]
    gauges.update(monitor, 0)
    assert exported("loom_monitor_dropped_total", "webhook") == 5.0


def test_the_mesh_s_own_pipelines_feed_no_drift_window(monitor: Monitor) -> None:
    """Postprocess embeds its label texts through inference as pipeline ``_labels``: not callers' inputs."""
    from services.common.pb.loom.v1 import envelope_pb2 as pb

    for pipeline in ("_labels", "embed"):
        event = pb.TelemetryEvent(
            service="inference", stage="loom.infer.minilm", pipeline=pipeline, model="minilm", model_version="1"
        )
        event.stats["text_chars"] = 42.0
        monitor.record(event)
    pipelines = {row["pipeline"] for row in monitor.drift.snapshot()}
    assert pipelines == {"embed"}
