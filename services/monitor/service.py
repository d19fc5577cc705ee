"""The monitor service: ``loom.tel.>`` -> /metrics and /v1/stats."""

from __future__ import annotations

import logging
from typing import ClassVar

from aiohttp import web
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from prometheus_client import Counter, Histogram

from services.common import metrics, subjects
from services.common.lifecycle import Runtime, Service
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.monitor.settings import MonitorSettings
from services.monitor.stats import StatsBook

log = logging.getLogger(__name__)

EVENTS = Counter(
    "loom_monitor_events_total",
    "Telemetry events seen, by service, stage and code.",
    ["service", "stage", "pipeline", "code"],
)
STAGE_LATENCY = Histogram(
    "loom_monitor_stage_latency_seconds",
    "Per-stage latency reported in telemetry.",
    ["service", "stage", "pipeline"],
    buckets=metrics.LATENCY_BUCKETS,
)


class Monitor(Service):
    name: ClassVar[str] = "monitor"

    def __init__(self, settings: MonitorSettings) -> None:
        super().__init__(settings)
        self.book = StatsBook(settings.window)

    async def start(self, rt: Runtime) -> None:
        # No queue group: one monitor sees all telemetry.
        await rt.bus.subscribe(subjects.TELEMETRY_ALL, self.on_event)

    async def on_event(self, msg: Msg) -> None:
        try:
            event = pb.TelemetryEvent.FromString(msg.data)
        except DecodeError:
            log.warning("undecodable telemetry on %s", msg.subject)
            return
        self.book.record(event)
        EVENTS.labels(event.service, event.stage, event.pipeline, event.code or "OK").inc()
        STAGE_LATENCY.labels(event.service, event.stage, event.pipeline).observe(event.duration_ms / 1000.0)

    def add_http(self, app: web.Application) -> None:
        async def stats(_: web.Request) -> web.Response:
            return web.json_response(self.book.snapshot())

        app.router.add_get("/v1/stats", stats)
