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
from nats.js import JetStreamContext

from services.common import durable, envelope, metrics
from services.common.bus import Bus
from services.common.claims import ClaimCheck
from services.common.durable import LaneSettings
from services.common.errors import Code, DeadlineExceeded, as_loom_error, to_proto
from services.common.events import TelemetryPublisher
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.settings import STAGE_QUEUE
from services.common.telemetry import inject

log = logging.getLogger(__name__)

Stats = dict[str, float]
Handler = Callable[[pb.Part], Awaitable[Stats | None]]
#: Failures a durable part is tried again for (later, maybe on another replica); others answer with the error.
RETRYABLE = frozenset({Code.UNAVAILABLE, Code.RESOURCE_EXHAUSTED, Code.DEADLINE_EXCEEDED, Code.INTERNAL})


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
        lane: LaneSettings | None = None,
        pending_limit: int = STAGE_QUEUE,
    ) -> None:
        self.bus = bus
        #: Messages waiting for this stage beyond which NATS drops (and bus.py counts) them: LOOM_STAGE_QUEUE.
        self.pending_limit = pending_limit
        #: Also take this subject's durable twin (``loom.work.*``) from JetStream; None: core NATS only.
        self.lane = lane
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
        await self.bus.subscribe(self.subject, self.on_message, queue=self.service, pending_limit=self.pending_limit)
        if self.lane is not None:
            work = durable.work_subject(self.subject)
            await durable.PullWorker(self.bus, durable.WORK_STREAM, work, self.on_work, self.lane).start()

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
        target, stats = self._finish(part, stats, code, elapsed_ms)
        if target is not None:
            await self._publish(target, part)
        await self.telemetry.emit(self.subject, part=part, duration_ms=elapsed_ms, code=code, stats=stats)

    def _finish(
        self, part: pb.Part, stats: Stats, code: str, elapsed_ms: float, *, worked: bool = True
    ) -> tuple[str | None, Stats]:
        """Leave the stage's statistics and timing on the part; return where it goes next and what to report.

        ``worked``: the stage ran its handler (a part dropped at its deadline was never worked on, so it
        adds no sample to ``loom_stage_duration_seconds``).
        """
        if self.carry_stats and stats:
            part.features.clear()
            part.features.update(stats)
        elif self.report_features and code == Code.OK and part.features:
            stats = {**part.features, **stats}
            part.ClearField("features")
        if worked:
            envelope.add_timing(part, self.service, elapsed_ms)
            metrics.STAGE_DURATION.labels(
                self.service, self.subject, part.pipeline, part.model, part.model_version
            ).observe(elapsed_ms / 1000.0)
        target = envelope.next_subject(part)
        if target is None:
            log.error("part %s/%s has an empty routing slip", part.request_id, part.part_id)
        return target, stats

    async def on_work(self, msg: Msg) -> None:
        """One durable part: work, store the next hop, then ack; transient failures are tried again."""
        assert self.lane is not None
        js = self.bus.js
        stage = durable.consumer_name(msg.subject)
        if await durable.give_up_if_redelivered(js, self.service, stage, msg, self.lane):
            return None
        tries = durable.deliveries(msg)
        try:
            part = pb.Part.FromString(msg.data)
        except DecodeError:
            return await durable.dead_letter(js, self.service, stage, msg, "undecodable loom.v1.Part")
        envelope.pop_step(part, self.subject)
        dropped = envelope.expired(part)
        if dropped:
            # Never processed: the part goes on to fusion as DEADLINE_EXCEEDED, so the request still gets its answer.
            metrics.DEADLINE_DROPS.labels(self.service, self.subject).inc()
            err = DeadlineExceeded(f"{self.service}: the deadline passed before the work started")
            part.error.CopyFrom(to_proto(err, self.service))
            stats: Stats = {}
            code: str = Code.DEADLINE_EXCEEDED
            elapsed_ms = 0.0
        else:
            stats, code, elapsed_ms = await self._run(part, limit_s=self.lane.attempt_s)
        if code in RETRYABLE and not envelope.expired(part):
            if tries < self.lane.max_deliver:
                metrics.DURABLE.labels(self.service, stage, "retried").inc()
                await msg.nak(delay=self.lane.backoff.delay(tries))
                return None
            reason = f"{code} on each of {tries} tries: {part.error.message}"
            return await durable.dead_letter(js, self.service, stage, msg, reason)
        target, stats = self._finish(part, stats, code, elapsed_ms, worked=not dropped)
        if target is None:  # nowhere to go: parked with the reason, never acked and lost
            reason = f"part {part.request_id}/{part.part_id} has an empty routing slip after {self.subject}"
            return await durable.dead_letter(js, self.service, stage, msg, reason)
        # Ack only once the next hop is stored: a failed publish raises, the message stays unacked and comes back.
        await self._publish(target, part, js=js)
        await msg.ack()
        metrics.DURABLE.labels(self.service, stage, "forwarded").inc()
        await self.telemetry.emit(self.subject, part=part, duration_ms=elapsed_ms, code=code, stats=stats)
        return None

    async def _publish(self, target: str, part: pb.Part, *, js: JetStreamContext | None = None) -> None:
        """Send the part on; with ``js`` (durable) store it on the target's twin, once per hop."""
        if part.HasField("error"):
            # A failed part goes straight to fusion, which needs no inputs.
            for name in ("data", "blob", "tensors"):
                part.ClearField(name)
        elif self.claims is not None:
            try:
                await self.claims.offload(part)
            except Exception as exc:
                part.error.CopyFrom(to_proto(as_loom_error(exc), self.service))
                return await self._publish(envelope.next_subject(part) or target, part, js=js)
        if js is None:
            await self.bus.publish(target, part.SerializeToString())
            return
        msg_id = durable.part_msg_id(part.request_id, part.part_id, len(part.slip))
        headers = inject({})
        if not await durable.publish_once(js, durable.work_subject(target), part.SerializeToString(), msg_id, headers):
            metrics.DURABLE.labels(self.service, durable.consumer_name(target), "duplicate").inc()

    async def _call(self, part: pb.Part) -> Stats | None:
        if self.claims is not None:
            await self.claims.restore(part)
        return await self.handler(part)

    async def _run(self, part: pb.Part, *, limit_s: float | None = None) -> tuple[Stats, str, float]:
        start = time.perf_counter()
        metrics.INFLIGHT.labels(self.service).inc()
        timeout = max(envelope.remaining_s(part), 0.001)
        if limit_s is not None:
            timeout = min(timeout, limit_s)
        try:
            stats = await asyncio.wait_for(self._call(part), timeout=timeout)
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
