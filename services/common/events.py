"""Telemetry events: every stage reports each message it handled to the monitor."""

from __future__ import annotations

from services.common import metrics, subjects
from services.common.bus import Bus
from services.common.envelope import now_ms
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.pii import mask
from services.common.telemetry import inject


class TelemetryPublisher:
    """Publishes :class:`TelemetryEvent` on ``loom.tel.<service>``.

    Fire and forget: events go through the bus's bounded outbox, so telemetry
    never blocks or fails the work it describes; when the outbox is full the
    event is dropped and counted in ``loom_telemetry_dropped_total``.

    PII is masked before the event leaves (:func:`services.common.pii.mask`):
    in the request id, the outcome, the names the caller chose (pipeline,
    model, version, part) and the stats' keys. Masking is deterministic, so the
    monitor can still join an answer's event with feedback about it.
    """

    def __init__(self, bus: Bus, service: str) -> None:
        self._bus = bus
        self._service = service
        self._subject = subjects.telemetry(service)

    async def emit(
        self,
        stage: str,
        *,
        part: pb.Part | None = None,
        pipeline: str = "",
        request_id: str = "",
        duration_ms: float = 0.0,
        code: str = "OK",
        stats: dict[str, float] | None = None,
        outcome: str = "",
        model: str = "",
        model_version: str = "",
    ) -> None:
        event = pb.TelemetryEvent(
            service=self._service,
            stage=stage,
            pipeline=mask(part.pipeline if part else pipeline),
            model=mask(part.model if part else model),
            model_version=mask(part.model_version if part else model_version),
            request_id=mask(part.request_id if part else request_id),
            part_id=mask(part.part_id if part else ""),
            duration_ms=duration_ms,
            code=code,
            timestamp_unix_ms=now_ms(),
            stats={mask(k): v for k, v in stats.items()} if stats else {},
            outcome=mask(outcome),
        )
        # The trace context travels with the event: the monitor's span joins the request's trace.
        if not self._bus.publish_nowait(self._subject, event.SerializeToString(), inject({})):
            metrics.TELEMETRY_DROPPED.labels(self._service).inc()
