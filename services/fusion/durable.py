"""Durable fusion: parts from ``loom.work.fuse.>`` -> the ``loom_results`` bucket and ``loom.res.<pipeline>``.

No replica owns a request here: any replica may get any part. A request of
one part is answered at once. A part of a larger request is first stored in
the ``loom_fusion`` bucket (``<request id>.<part id>``) and acked; then the
replica reads the siblings, and whoever stores the last part fuses. Two
replicas storing the last two parts at the same moment may both fuse: both
write the same answer, and the result stream keeps one (``Nats-Msg-Id``).
A part is acked only once it is stored or answered, so a replica killed in
between leaves it to be delivered again.
"""

from __future__ import annotations

import contextlib
import logging
import time

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError as JsNotFound
from nats.js.kv import KeyValue

from services.common import durable, metrics
from services.common.answers import DURABLE_ANSWER_STAGE, answer_models, top_label
from services.common.bus import Bus
from services.common.events import TelemetryPublisher
from services.common.kv_follow import open_bucket
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.pb.loom.v1 import gateway_pb2
from services.common.pipelines import PipelineRegistry
from services.common.results import ResultStore
from services.fusion.collector import Pending, fuse

log = logging.getLogger(__name__)

STAGE = "fuse"


def to_result(state: Pending, pipelines: PipelineRegistry | None, tenant: str) -> gateway_pb2.Result:
    """The fused answer of a complete (or failed) durable request as its stored record."""
    fused = fuse(state, pipelines.find(state.pipeline) if pipelines is not None else None)
    result = gateway_pb2.Result(request_id=state.request_id, pipeline=state.pipeline, tenant=tenant)
    if fused.HasField("error"):
        result.state = gateway_pb2.Result.FAILED
        result.error.CopyFrom(fused.error)
    else:
        result.state = gateway_pb2.Result.DONE
    result.response.CopyFrom(fused.response)
    return result


class DurableFusion:
    def __init__(
        self,
        bus: Bus,
        lane: durable.LaneSettings,
        pipelines: PipelineRegistry | None,
        telemetry: TelemetryPublisher,
        service: str = "fusion",
    ) -> None:
        self.bus = bus
        self.lane = lane
        self.pipelines = pipelines
        self.telemetry = telemetry
        self.service = service
        self.results = ResultStore(bus, lane)
        self._parts: KeyValue | None = None
        #: Durable parts being handled now (part of ``loom_inflight{service="fusion"}``).
        self.active = 0

    async def start(self) -> None:
        await self.results.start()
        self._parts = await open_bucket(self.bus.js, durable.bucket(self.lane, durable.FUSION_BUCKET))
        subject = durable.work_subject("loom.fuse.>")
        await durable.PullWorker(self.bus, durable.WORK_STREAM, subject, self.on_part, self.lane, durable=STAGE).start()

    async def on_part(self, msg: Msg) -> None:
        """One durable part: store it or fuse its request, then ack; a failed store or publish raises, unacked."""
        self.active += 1
        try:
            return await self._on_part(msg)
        finally:
            self.active -= 1

    async def _on_part(self, msg: Msg) -> None:
        started = time.perf_counter()
        js = self.bus.js
        if await durable.give_up_if_redelivered(js, self.service, STAGE, msg, self.lane):
            return None
        try:
            part = pb.Part.FromString(msg.data)
        except DecodeError:
            return await durable.dead_letter(js, self.service, STAGE, msg, "undecodable loom.v1.Part")
        ids = list(part.part_ids) or [part.part_id]
        state = Pending(part.request_id, part.pipeline, "", ids, part.deadline_unix_ms, {part.part_id: part})
        if len(ids) > 1:
            await self._store(part)
            state.parts = await self._siblings(part.request_id, ids)
            state.parts[part.part_id] = part
        known = await self.results.find(part.request_id) if state.complete else None
        if known is not None and known.state != gateway_pb2.Result.PENDING:
            # Answered before: also a try whose KV write landed but whose loom.res publish failed (a
            # stream leader lost); publish again, the stream drops it if the first one got there.
            await self.results.publish(known)
            metrics.DURABLE.labels(self.service, STAGE, "duplicate").inc()  # a part delivered again
        elif state.complete:
            result = to_result(state, self.pipelines, part.tenant)
            result.accepted_unix_ms = known.accepted_unix_ms if known is not None else 0
            fresh = await self.results.answer(result)
            metrics.DURABLE.labels(self.service, STAGE, "answered" if fresh else "duplicate").inc()
            if fresh:
                await self._report(result)
            if len(ids) > 1:
                await self._forget(part.request_id, ids)
        await msg.ack()
        elapsed = time.perf_counter() - started
        label = self.pipelines.metric_label(part.pipeline) if self.pipelines is not None else part.pipeline
        metrics.STAGE_DURATION.labels(self.service, "loom.fuse", label, "", "").observe(elapsed)
        await self.telemetry.emit(
            msg.subject,
            part=part,
            duration_ms=elapsed * 1000.0,
            code=part.error.code if part.HasField("error") else "OK",
        )
        return None

    async def _report(self, result: gateway_pb2.Result) -> None:
        """The answer's telemetry (``stage="loom.res"``), so the monitor joins feedback to durable answers too.

        Its duration is the request's whole stay in the lane, accepted to answered; the monitor keeps
        it out of the SLOs, which are about calls a client waits on.
        """
        model, version = answer_models(result.response)
        code = result.error.code if result.HasField("error") else "DEGRADED" if result.response.degraded else "OK"
        accepted = result.accepted_unix_ms
        await self.telemetry.emit(
            DURABLE_ANSWER_STAGE,
            pipeline=result.pipeline,
            request_id=result.request_id,
            duration_ms=float(max(result.finished_unix_ms - accepted, 0)) if accepted else 0.0,
            code=code or "UNKNOWN",
            outcome=top_label(result.response),
            model=model,
            model_version=version,
        )

    def _key(self, request_id: str, part_id: str) -> str:
        return f"{request_id}.{part_id}"

    async def _store(self, part: pb.Part) -> None:
        assert self._parts is not None
        await self._parts.put(self._key(part.request_id, part.part_id), part.SerializeToString())

    async def _siblings(self, request_id: str, ids: list[str]) -> dict[str, pb.Part]:
        assert self._parts is not None
        found: dict[str, pb.Part] = {}
        for part_id in ids:
            try:
                entry = await self._parts.get(self._key(request_id, part_id))
            except JsNotFound:
                continue
            if entry.value:
                found[part_id] = pb.Part.FromString(entry.value)
        return found

    async def _forget(self, request_id: str, ids: list[str]) -> None:
        """Best effort: the bucket's TTL removes what this misses."""
        assert self._parts is not None
        for part_id in ids:
            with contextlib.suppress(Exception):
                await self._parts.purge(self._key(request_id, part_id))
