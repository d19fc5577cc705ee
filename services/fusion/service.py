"""The fusion service: ``loom.fuse.<partition>`` -> the caller's inbox.

Metrics: ``loom_stage_duration_seconds{stage="loom.fuse"}`` per part handled,
``loom_inflight{service="fusion"}`` the requests waiting for parts (and durable
parts being handled), ``loom_deadline_drops_total{stage="loom.fuse"}`` the parts
thrown away because of their deadline: one that comes after its request was
answered at the deadline, or one already past its deadline for a request fusion
never saw (the caller has given up). An answer at the deadline with the parts
that came is a degraded answer, not a drop.

On SIGTERM (:meth:`Fusion.stop`, after the runtime drained the subscriptions)
every request still waiting is answered at once with what has arrived, the
missing parts named; the durable lane's parts are in JetStream and come back
to another replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import ClassVar

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg

from services.common import envelope, metrics, subjects
from services.common.bus import Bus
from services.common.events import TelemetryPublisher
from services.common.lifecycle import Runtime, Service
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.pipelines import PipelineRegistry
from services.fusion.collector import Collector, Pending, fuse
from services.fusion.durable import DurableFusion
from services.fusion.settings import FusionSettings

log = logging.getLogger(__name__)

#: The ``stage`` label of fusion's metrics.
STAGE = "loom.fuse"


class Fusion(Service):
    name: ClassVar[str] = "fusion"

    def __init__(self, settings: FusionSettings) -> None:
        super().__init__(settings)
        self.fs = settings
        self.collector = Collector(remember_ms=int(settings.remember_s * 1000))
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._background: set[asyncio.Future[None]] = set()
        self._bus: Bus | None = None
        self._telemetry: TelemetryPublisher | None = None
        self._pipelines: PipelineRegistry | None = None
        self._durable: DurableFusion | None = None
        metrics.INFLIGHT.labels(self.name).set_function(self._inflight)

    def _inflight(self) -> float:
        held = self._durable.active if self._durable is not None else 0
        return float(len(self.collector.pending) + held)

    def _label(self, pipeline: str) -> str:
        return self._pipelines.metric_label(pipeline) if self._pipelines is not None else pipeline

    async def start(self, rt: Runtime) -> None:
        self._bus = rt.bus
        self._pipelines = rt.pipelines
        self._telemetry = TelemetryPublisher(rt.bus, self.name)
        for partition in self.fs.owned_partitions():
            # No queue group: a partition belongs to exactly one replica.
            await rt.bus.subscribe(subjects.fuse(partition), self.on_part, pending_limit=rt.settings.stage_queue)
        log.info("fusion owns partitions %s of %d", self.fs.owned_partitions(), self.fs.fusion_partitions)
        if rt.lane is not None:
            self._durable = DurableFusion(rt.bus, rt.lane, rt.pipelines, self._telemetry)
            await self._durable.start()

    async def stop(self) -> None:
        """Drain: answer every request still waiting now, with what has arrived (degraded, missing parts named).

        Called once the runtime has drained the subscriptions (no part comes any more) and before it
        closes NATS, so the answers still go out. Durable work needs nothing here: the pull workers
        stopped first, and parts not acked come back to another replica.
        """
        for timer in self._timers.values():
            timer.cancel()
        if self._background:  # answers the deadline timers already started
            await asyncio.wait(set(self._background), timeout=5.0)
        waiting = list(self.collector.pending)
        for request_id in waiting:
            try:
                await self._answer(request_id, note="answered early: the fusion replica is shutting down")
            except Exception:  # one failed answer must not keep the others from going out
                log.exception("could not answer %s while draining", request_id)
        self._timers.clear()
        if waiting:
            log.info("drained: answered %d waiting request(s) with what had arrived", len(waiting))

    async def on_part(self, msg: Msg) -> None:
        started = time.perf_counter()
        try:
            part = pb.Part.FromString(msg.data)
        except DecodeError:
            log.error("undecodable part on %s dropped", msg.subject)
            metrics.ERRORS.labels(self.name, "INVALID_ARGUMENT").inc()
            return
        now = envelope.now_ms()
        rid = part.request_id
        if envelope.expired(part) and rid not in self.collector.pending and not self.collector.answered(rid):
            # Past its deadline, for a request not waiting here: the caller has given up, nobody to answer.
            return await self._drop(msg.subject, part, "past its deadline")
        state, complete = self.collector.add(part, now)
        if state is None:
            if part.deadline_unix_ms and now >= part.deadline_unix_ms - self.fs.deadline_margin_ms:
                return await self._drop(msg.subject, part, "after its request was answered at the deadline without it")
            log.info("duplicate part %s/%s ignored", part.request_id, part.part_id)
        elif complete:
            await self._answer(part.request_id)
        elif part.request_id not in self._timers:
            delay = max(0.0, (state.deadline_unix_ms - self.fs.deadline_margin_ms - envelope.now_ms()) / 1000.0)
            loop = asyncio.get_running_loop()
            self._timers[part.request_id] = loop.call_later(delay, self._answer_later, part.request_id)
        elapsed = time.perf_counter() - started
        metrics.STAGE_DURATION.labels(self.name, STAGE, self._label(part.pipeline), "", "").observe(elapsed)
        assert self._telemetry is not None
        await self._telemetry.emit(
            msg.subject,
            part=part,
            duration_ms=elapsed * 1000.0,
            code=part.error.code if part.HasField("error") else "OK",
        )

    async def _drop(self, subject: str, part: pb.Part, why: str) -> None:
        """A part thrown away because of its deadline: counted, reported, never fused."""
        log.info("dropped part %s/%s: %s", part.request_id, part.part_id, why)
        metrics.DEADLINE_DROPS.labels(self.name, STAGE).inc()
        assert self._telemetry is not None
        await self._telemetry.emit(subject, part=part, code="DEADLINE_EXCEEDED")

    def _answer_later(self, request_id: str) -> None:
        # The deadline came first: answer with what has arrived.
        task = asyncio.ensure_future(self._answer(request_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _answer(self, request_id: str, *, note: str = "") -> None:
        timer = self._timers.pop(request_id, None)
        if timer is not None:
            timer.cancel()
        state: Pending | None = self.collector.finish(request_id, envelope.now_ms())
        if state is None or not state.reply_to:
            return
        # The spec as it is now: a strategy changed in KV applies to the next answer.
        spec = self._pipelines.find(state.pipeline) if self._pipelines is not None else None
        result = fuse(state, spec)
        if note and (result.response.missing or result.HasField("error")):
            result.response.notes["fusion/early"] = note
        if result.response.degraded or result.HasField("error"):
            log.info("request %s answered without %s", request_id, list(result.response.missing))
        assert self._bus is not None
        await self._bus.publish(state.reply_to, result.SerializeToString())
