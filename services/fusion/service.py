"""The fusion service: ``loom.fuse.<partition>`` -> the caller's inbox."""

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

    async def start(self, rt: Runtime) -> None:
        self._bus = rt.bus
        self._pipelines = rt.pipelines
        self._telemetry = TelemetryPublisher(rt.bus, self.name)
        for partition in self.fs.owned_partitions():
            # No queue group: a partition belongs to exactly one replica.
            await rt.bus.subscribe(subjects.fuse(partition), self.on_part, pending_limit=rt.settings.stage_queue)
        log.info("fusion owns partitions %s of %d", self.fs.owned_partitions(), self.fs.fusion_partitions)
        if rt.lane is not None:
            await DurableFusion(rt.bus, rt.lane, rt.pipelines, self._telemetry).start()

    async def on_part(self, msg: Msg) -> None:
        started = time.perf_counter()
        try:
            part = pb.Part.FromString(msg.data)
        except DecodeError:
            log.error("undecodable part on %s dropped", msg.subject)
            metrics.ERRORS.labels(self.name, "INVALID_ARGUMENT").inc()
            return
        state, complete = self.collector.add(part, envelope.now_ms())
        if state is None:
            log.info("late or duplicate part %s/%s ignored", part.request_id, part.part_id)
        elif complete:
            await self._answer(part.request_id)
        elif part.request_id not in self._timers:
            delay = max(0.0, (state.deadline_unix_ms - self.fs.deadline_margin_ms - envelope.now_ms()) / 1000.0)
            loop = asyncio.get_running_loop()
            self._timers[part.request_id] = loop.call_later(delay, self._answer_later, part.request_id)
        assert self._telemetry is not None
        await self._telemetry.emit(
            msg.subject,
            part=part,
            duration_ms=(time.perf_counter() - started) * 1000.0,
            code=part.error.code if part.HasField("error") else "OK",
        )

    def _answer_later(self, request_id: str) -> None:
        # The deadline came first: answer with what has arrived.
        task = asyncio.ensure_future(self._answer(request_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _answer(self, request_id: str) -> None:
        timer = self._timers.pop(request_id, None)
        if timer is not None:
            timer.cancel()
        state: Pending | None = self.collector.finish(request_id, envelope.now_ms())
        if state is None or not state.reply_to:
            return
        # The spec as it is now: a strategy changed in KV applies to the next answer.
        spec = self._pipelines.find(state.pipeline) if self._pipelines is not None else None
        result = fuse(state, spec)
        if result.response.degraded or result.HasField("error"):
            log.info("request %s answered without %s", request_id, list(result.response.missing))
        assert self._bus is not None
        await self._bus.publish(state.reply_to, result.SerializeToString())
