"""Telemetry events: every stage reports each message it handled to the monitor."""

from __future__ import annotations

import logging

from services.common import subjects
from services.common.bus import Bus
from services.common.envelope import now_ms
from services.common.pb.loom.v1 import envelope_pb2 as pb

log = logging.getLogger(__name__)


class TelemetryPublisher:
    """Publishes :class:`TelemetryEvent` on ``loom.tel.<service>``."""

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
    ) -> None:
        event = pb.TelemetryEvent(
            service=self._service,
            stage=stage,
            pipeline=part.pipeline if part else pipeline,
            model=part.model if part else "",
            model_version=part.model_version if part else "",
            request_id=part.request_id if part else request_id,
            part_id=part.part_id if part else "",
            duration_ms=duration_ms,
            code=code,
            timestamp_unix_ms=now_ms(),
            stats=stats or {},
        )
        try:
            await self._bus.publish(self._subject, event.SerializeToString())
        except Exception as exc:  # telemetry must never fail the work it describes
            log.warning("telemetry publish failed: %s", exc)
