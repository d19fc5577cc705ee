"""The pipeline-stage runner shared by preprocess, inference and postprocess.

A stage's work is a plain ``async def handle(part) -> stats`` that fills in
the part (no NATS, gRPC or header code in it). The runner decodes, drops
expired work, calls the handler under the part's deadline, turns failures
into an error on the part, forwards it along the routing slip and reports
telemetry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg

from services.common import envelope, metrics
from services.common.bus import Bus
from services.common.claims import ClaimCheck
from services.common.errors import Code, DeadlineExceeded, as_loom_error, to_proto
from services.common.events import TelemetryPublisher
from services.common.pb.loom.v1 import envelope_pb2 as pb

log = logging.getLogger(__name__)

Stats = dict[str, float]
Handler = Callable[[pb.Part], Awaitable[Stats | None]]


class StageRunner:
    """Binds one subject to one handler for one service."""

    def __init__(
        self,
        bus: Bus,
        service: str,
        subject: str,
        handler: Handler,
        *,
        claims: ClaimCheck | None = None,
        carry_stats: bool = False,
        report_features: bool = False,
    ) -> None:
        self.bus = bus
        #: Also leave the handler's statistics on the part (``Part.features``) for a later stage.
        self.carry_stats = carry_stats
        #: Report the features an earlier stage left, with this stage's model version, then clear them.
        self.report_features = report_features
        #: Fetches claim-checked bytes before the handler, parks large ones before publishing.
        self.claims = claims
        self.service = service
        self.subject = subject
        self.handler = handler
        self.telemetry = TelemetryPublisher(bus, service)

    async def start(self) -> None:
        # The queue group is the service: replicas share the work.
        await self.bus.subscribe(self.subject, self.on_message, queue=self.service)

    async def on_message(self, msg: Msg) -> None:
        try:
            part = pb.Part.FromString(msg.data)
        except DecodeError:
            # Without a decodable part there is nowhere to report to.
            log.error("undecodable part on %s (%d bytes) dropped", msg.subject, len(msg.data))
            metrics.ERRORS.labels(self.service, Code.INVALID_ARGUMENT).inc()
            return
        if envelope.expired(part):
            log.info("dropped part %s/%s: deadline passed", part.request_id, part.part_id)
            metrics.DEADLINE_DROPS.labels(self.service, self.subject).inc()
            await self.telemetry.emit(self.subject, part=part, code=Code.DEADLINE_EXCEEDED)
            return
        envelope.pop_step(part, self.subject)
        stats, code, elapsed_ms = await self._run(part)
        if self.carry_stats and stats:
            part.features.clear()
            part.features.update(stats)
        elif self.report_features and code == Code.OK and part.features:
            stats = {**part.features, **stats}
            part.ClearField("features")
        envelope.add_timing(part, self.service, elapsed_ms)
        metrics.STAGE_DURATION.labels(
            self.service, self.subject, part.pipeline, part.model, part.model_version
        ).observe(elapsed_ms / 1000.0)
        target = envelope.next_subject(part)
        if target is None:
            log.error("part %s/%s has an empty routing slip", part.request_id, part.part_id)
        else:
            await self._publish(target, part)
        await self.telemetry.emit(self.subject, part=part, duration_ms=elapsed_ms, code=code, stats=stats)

    async def _publish(self, target: str, part: pb.Part) -> None:
        if part.HasField("error"):
            # A failed part goes straight to fusion, which needs no inputs.
            for name in ("data", "blob", "tensors"):
                part.ClearField(name)
        elif self.claims is not None:
            try:
                await self.claims.offload(part)
            except Exception as exc:
                part.error.CopyFrom(to_proto(as_loom_error(exc), self.service))
                return await self._publish(envelope.next_subject(part) or target, part)
        await self.bus.publish(target, part.SerializeToString())

    async def _call(self, part: pb.Part) -> Stats | None:
        if self.claims is not None:
            await self.claims.restore(part)
        return await self.handler(part)

    async def _run(self, part: pb.Part) -> tuple[Stats, str, float]:
        start = time.perf_counter()
        metrics.INFLIGHT.labels(self.service).inc()
        try:
            stats = await asyncio.wait_for(self._call(part), timeout=max(envelope.remaining_s(part), 0.001))
            code = Code.OK
        except Exception as exc:  # every failure is reported on the part
            if isinstance(exc, TimeoutError):
                exc = DeadlineExceeded(f"{self.service}: deadline passed while working")
            err = as_loom_error(exc)
            if err is not exc:
                log.exception("internal error on %s/%s", part.request_id, part.part_id)
            part.error.CopyFrom(to_proto(err, self.service))
            metrics.ERRORS.labels(self.service, err.code).inc()
            stats, code = None, err.code
        finally:
            metrics.INFLIGHT.labels(self.service).dec()
        return stats or {}, code, (time.perf_counter() - start) * 1000.0
