"""The monitor service: telemetry, feedback and spans in; signals, alerts and a dashboard out.

Inputs: ``loom.tel.>`` (every stage's events, a bounded queue), ``loom.fb.*``
(ground truth), OTLP spans (gRPC on the monitor's gRPC port, HTTP at
/v1/traces), Triton's repository index and metrics, and the state of the
dead-letter stream ``LOOM_DLQ`` (``services.monitor.dlq_watch``). Every
``eval_interval_s`` it recomputes drift, accuracy and SLOs, evaluates the
alert rules and announces what changed. With ``rollout_enabled`` it also
follows the model registry (``loom_models``) and runs the rollout controller
on every evaluation (``services.monitor.rollout``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any, ClassVar

import aiohttp
import grpc
from aiohttp import web
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from opentelemetry import trace
from prometheus_client import REGISTRY, Counter, Histogram

from services.common import metrics, subjects
from services.common.access import AccessTable
from services.common.answers import DURABLE_ANSWER_STAGE
from services.common.audit import AuditLog
from services.common.envelope import now_ms
from services.common.lifecycle import Runtime, Service
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.pb.loom.v1 import monitor_pb2
from services.common.pii import mask
from services.common.pipelines import SloSpec
from services.common.registry.store import RegistryStore
from services.common.telemetry import extract
from services.monitor import gauges, rules
from services.monitor.accuracy import AccuracyBook, AnswerBook
from services.monitor.alerts import AlertBook
from services.monitor.api import ACCESS, add_routes
from services.monitor.capacity import DEFAULT_CONCURRENCY, CapacityBook, CapacityPolicy
from services.monitor.dlq_watch import DlqWatch
from services.monitor.drift import DriftBook
from services.monitor.notify import Notifier
from services.monitor.otlp_receiver import TraceReceiver
from services.monitor.rollout import RolloutController
from services.monitor.series import SloBook, SloWindows
from services.monitor.settings import MonitorSettings
from services.monitor.stats import ModelTraffic, StatsBook
from services.monitor.traces import TraceStore
from services.monitor.triton_watch import TritonWatch
from services.monitor.versions import VersionBook

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
FEEDBACK = Counter("loom_feedback_total", "Ground-truth feedback received, by result.", ["pipeline", "result"])
GATEWAY_STAGE = "gateway"
#: One slow STREAM.INFO must not hold up the evaluation (the alert keeps its last reading).
DLQ_POLL_TIMEOUT_S = 2.0


#: Pipelines the mesh runs for itself (``_labels``: postprocess embedding its label texts). Their
#: parts are real work (stage latency, capacity, traffic) but not callers' inputs, so no drift.
INTERNAL_PREFIX = "_"


class Monitor(Service):
    name: ClassVar[str] = "monitor"

    def __init__(self, settings: MonitorSettings) -> None:
        super().__init__(settings)
        s = self.ms = settings
        self.book = StatsBook(s.window)
        self.traffic = ModelTraffic()
        self.slo = SloBook(SloWindows(short_s=s.slo_short_s, long_s=s.slo_long_s))
        self.drift = DriftBook(reference_size=s.drift_reference, window=s.drift_window, min_samples=s.drift_min_samples)
        self.answers = AnswerBook(max_answers=s.answers)
        self.accuracy = AccuracyBook(
            self.answers, window=s.accuracy_window, min_samples=s.accuracy_min_samples, bucket_s=s.accuracy_bucket_s
        )
        self.versions = VersionBook(keep_s=s.slo_long_s, samples=s.version_samples)
        self.capacity = CapacityBook(
            CapacityPolicy(
                concurrency={**DEFAULT_CONCURRENCY, **s.capacity_concurrency},
                target_utilization=s.capacity_target_utilization,
                min_replicas=s.capacity_min_replicas,
                max_replicas=s.capacity_max_replicas,
            ),
            window_s=s.capacity_window_s,
            started_ms=now_ms(),
        )
        #: The model registry and the rollout controller (started in ``start`` when rollout_enabled).
        self.registry: RegistryStore | None = None
        self.rollouts: RolloutController | None = None
        self.traces = TraceStore(max_traces=s.traces_max, max_spans_per_trace=s.spans_per_trace, max_spans=s.spans_max)
        self.triton = TritonWatch(
            s.triton_url, s.triton_metrics_url, expected={m.strip() for m in s.models.split(",") if m.strip()}
        )
        self.dlq = DlqWatch()
        self.alerts = AlertBook()
        self.thresholds = rules.Thresholds(
            latency_p1_ms=s.latency_p1_ms,
            drift_alert=s.drift_alert,
            accuracy_drop_points=s.accuracy_drop_points,
            accuracy_drop_p1_points=s.accuracy_drop_p1_points,
            burn_rate=s.burn_rate,
            saturation=s.saturation,
        )
        self.drops = rules.DropWatch()
        #: What the last evaluation computed (served by the API between evaluations).
        self.latest: dict[str, Any] = {"drift": [], "accuracy": [], "pipelines": []}
        self._tracer = trace.get_tracer("loom.monitor")
        self._rt: Runtime | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._notifier: Notifier | None = None
        self._session: aiohttp.ClientSession | None = None
        self._started_ms = now_ms()
        REGISTRY.register(self.triton)

    @property
    def audit(self) -> AuditLog | None:
        """Where the monitor's admin routes record what they did: ``None`` until it has started (no bus)."""
        return self._rt.audit if self._rt is not None else None

    # -- life cycle ---------------------------------------------------------
    async def start(self, rt: Runtime) -> None:
        self._rt = rt
        if self.ms.drift_baseline_file:
            with open(self.ms.drift_baseline_file, encoding="utf-8") as fh:
                self.drift.load(json.load(fh))
            log.info("drift baselines loaded from %s", self.ms.drift_baseline_file)
        # No queue group: one monitor sees all telemetry. The subscription's queue is the bounded buffer.
        await rt.bus.subscribe(
            subjects.TELEMETRY_ALL, self.on_event, pending_limit=self.ms.telemetry_buffer, inline=True
        )
        # Feedback is bounded too: beyond feedback_buffer the client drops and counts (buffer="feedback").
        await rt.bus.subscribe(subjects.FEEDBACK_ALL, self.on_feedback, pending_limit=self.ms.feedback_buffer)
        # One HTTP session for Triton's polls and the alert webhook.
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0))
        if self.ms.rollout_enabled:
            await self._start_rollouts(rt)
        self._notifier = Notifier(
            rt.bus,
            self._session,
            self.ms.alert_webhook_url,
            generator_url=f"{'https' if self.ms.tls_enabled else 'http'}://{self.ms.bind_host}:{self.ms.http_port}/",
            max_pending=self.ms.webhook_pending,
        )
        self._loop_task = asyncio.create_task(self._evaluate_forever())

    async def _start_rollouts(self, rt: Runtime) -> None:
        self.registry = RegistryStore(rt.bus, self.ms.models_bucket, service=self.name)
        await self.registry.start(watch=True)
        await rt.audit.start()
        self.rollouts = RolloutController(
            self.registry,
            rt.audit,
            self.versions,
            self.accuracy,
            alert_hold_s=self.ms.rollback_alert_hold_s,
            min_output_samples=self.ms.rollout_min_output_samples,
        )

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        if self.registry is not None:
            await self.registry.stop()
        if self._session is not None:
            await self._session.close()
        REGISTRY.unregister(self.triton)

    def access(self) -> AccessTable:
        return ACCESS

    def add_grpc(self, server: grpc.aio.Server) -> None:
        TraceReceiver(self.traces).add_to_server(server)

    def grpc_options(self) -> list[tuple[str, int]]:
        return [("grpc.max_receive_message_length", 16 * 1024 * 1024)]

    def http_client_max_size(self) -> int:
        return 16 * 1024 * 1024

    def add_http(self, app: web.Application) -> None:
        add_routes(app, self)

    # -- inputs -------------------------------------------------------------
    async def on_event(self, msg: Msg) -> None:
        try:
            event = pb.TelemetryEvent.FromString(msg.data)
        except DecodeError:
            log.warning("undecodable telemetry on %s", msg.subject)
            return
        self.record(event, msg.headers)

    def record(self, event: pb.TelemetryEvent, headers: dict[str, str] | None = None) -> None:
        code = event.code or "OK"
        t = now_ms()
        self.book.record(event)
        # Every handled item, failed ones included: they kept a replica busy all the same.
        self.capacity.record(event.service, event.stage, event.duration_ms, t)
        # Before the OK filter below: a version's failures are what a rollout is judged on.
        self.versions.record(event, t)
        EVENTS.labels(event.service, event.stage, event.pipeline, code).inc()
        STAGE_LATENCY.labels(event.service, event.stage, event.pipeline).observe(event.duration_ms / 1000.0)
        if event.stage == GATEWAY_STAGE:
            self.slo.record(event.pipeline, event.duration_ms, code, t)
            if code == "OK" and event.request_id:
                self.answers.add(event.pipeline, event.request_id, event.model, event.model_version, event.outcome, t)
            if headers:  # the monitor's hop in the request's trace
                with self._tracer.start_as_current_span(
                    "monitor record", context=extract(headers), attributes={"loom.pipeline": event.pipeline}
                ):
                    pass
        elif event.stage == DURABLE_ANSWER_STAGE:
            # A durable answer: joinable with feedback; not in the SLOs (nobody waited on the call).
            if code == "OK" and event.request_id:
                self.answers.add(event.pipeline, event.request_id, event.model, event.model_version, event.outcome, t)
        elif code != "OK":
            return
        elif event.pipeline.startswith(INTERNAL_PREFIX):
            return  # the mesh's own work (postprocess embedding its labels): no user input to drift
        elif event.stage.startswith("loom.infer."):
            self.traffic.record(event.model, event.model_version, event.duration_ms, t)
            for feature, value in event.stats.items():
                self.drift.record(event.pipeline, event.model, event.model_version, feature, value, "input", t)
        elif event.stage.startswith("loom.post."):
            for feature, value in event.stats.items():
                self.drift.record(event.pipeline, event.model, event.model_version, feature, value, "output", t)

    async def on_feedback(self, msg: Msg) -> None:
        pipeline = subjects.last_token(msg.subject)
        result = "invalid"
        try:
            fb = _parse_feedback(msg.data)
            result = self.accuracy.feedback(
                fb.pipeline or pipeline,
                mask(fb.request_id),  # the answer's telemetry carries its request id masked
                fb.label or None,
                fb.correct if fb.HasField("correct") else None,
                now_ms(),
            )
        except ValueError as exc:
            log.info("invalid feedback on %s: %s", msg.subject, exc)
        FEEDBACK.labels(pipeline, result).inc()
        if msg.reply and self._rt is not None:
            await self._rt.bus.respond(msg, json.dumps({"result": result}).encode())

    # -- evaluation ---------------------------------------------------------
    async def _evaluate_forever(self) -> None:
        while True:
            try:
                await self.evaluate()
            except Exception:
                log.exception("evaluation failed")
            await asyncio.sleep(self.ms.eval_interval_s)

    def slo_specs(self) -> dict[str, SloSpec]:
        if self._rt is None:
            return {}
        return {name: self._rt.pipelines.get(name).slo for name in self._rt.pipelines.names()}

    async def evaluate(self) -> None:
        t = now_ms()
        if self._session is not None:
            await self.triton.poll(self._session, t)
        if self._rt is not None and self._rt.bus.connected:  # else the last reading stands
            await self.dlq.poll(self._rt.bus.nc.jetstream(timeout=DLQ_POLL_TIMEOUT_S), t)
        specs = self.slo_specs()
        self.latest = {
            "drift": self.drift.evaluate(t),
            "accuracy": self.accuracy.snapshot(),
            "pipelines": self.slo.snapshot(specs, t),
        }
        if self.rollouts is not None:
            await self.rollouts.tick(t)
        gauges.update(self, t)
        th = self.thresholds
        conditions = [
            *rules.model_unavailable(self.triton, starting=t - self._started_ms < self.ms.triton_grace_s * 1000),
            *rules.high_latency(self.slo, t, th),
            *rules.slo_burn(self.slo, specs, t, th),
            *rules.drift_high(self.latest["drift"], th),
            *rules.accuracy_drop(self.latest["accuracy"], th),
            *rules.saturation(self.triton, th),
            *rules.dead_letters(self.dlq),
            *self.drops.conditions(gauges.dropped_totals(self), t, th),
            *(self.rollouts.conditions(t) if self.rollouts is not None else []),
        ]
        changed = self.alerts.evaluate(conditions, t)
        if self._notifier is not None:
            await self._notifier.send(changed, self.alerts.firing())

    def telemetry_dropped(self) -> float:
        """Telemetry events the NATS client dropped because the monitor's queue was full."""
        return slow_consumer_drops(subjects.TELEMETRY_ALL)

    def feedback_dropped(self) -> float:
        """Feedback messages the NATS client dropped because the monitor's feedback queue was full."""
        return slow_consumer_drops(subjects.FEEDBACK_ALL)

    def webhook_dropped(self) -> float:
        """Alert webhook POSTs not sent because ``webhook_pending`` were already in flight."""
        return float(self._notifier.dropped) if self._notifier is not None else 0.0


def slow_consumer_drops(subject: str) -> float:
    """What the NATS client dropped on the subscription to ``subject`` (counted by the bus's error callback)."""
    total = 0.0
    for metric in metrics.SLOW_CONSUMER_DROPS.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels.get("subject") == subject:
                total += sample.value
    return total


def _parse_feedback(data: bytes) -> monitor_pb2.Feedback:
    """Feedback as protobuf (the contract) or, for hand-written publishers, JSON."""
    if data[:1] == b"{":
        try:
            doc = json.loads(data)
            fb = monitor_pb2.Feedback(
                pipeline=str(doc.get("pipeline", "")),
                request_id=str(doc.get("request_id", "")),
                label=str(doc.get("label") or ""),
                source=str(doc.get("source", "")),
            )
            if isinstance(doc.get("correct"), bool):
                fb.correct = doc["correct"]
        except (ValueError, AttributeError) as exc:
            raise ValueError(f"feedback is neither protobuf nor a JSON object: {exc}") from None
    else:
        try:
            fb = monitor_pb2.Feedback.FromString(data)
        except DecodeError:
            raise ValueError("undecodable feedback") from None
    if not fb.request_id:
        raise ValueError("feedback needs a request_id")
    return fb
