"""The gateway's domain core: validate, split into parts, publish, await fusion.

Transport-free: the gRPC and HTTP adapters turn their input into a
:class:`PredictCall` and the :class:`PredictResponse` back into their output.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg

from services.common import envelope, metrics, subjects
from services.common.bus import Bus
from services.common.errors import DeadlineExceeded, InvalidArgument, as_loom_error, from_proto
from services.common.events import TelemetryPublisher
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.pb.loom.v1 import fusion_pb2, gateway_pb2
from services.common.pipelines import PipelineRegistry, PipelineSpec
from services.common.telemetry import current_trace_id
from services.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)


@dataclass
class PredictCall:
    pipeline: str
    inputs: dict[str, str]
    timeout_ms: int = 0
    request_id: str = ""
    #: The transport's own deadline (e.g. the gRPC deadline), seconds left.
    transport_remaining_s: float | None = None
    extra: dict[str, str] = field(default_factory=dict)


class GatewayCore:
    def __init__(self, bus: Bus, settings: GatewaySettings, pipelines: PipelineRegistry) -> None:
        self.bus = bus
        self.settings = settings
        self.pipelines = pipelines
        self._inbox = ""
        self._waiting: dict[str, asyncio.Future[fusion_pb2.FusedResult]] = {}
        self.telemetry = TelemetryPublisher(bus, "gateway")

    async def start(self) -> None:
        self._inbox = self.bus.new_inbox()
        await self.bus.subscribe(f"{self._inbox}.*", self._on_reply)

    async def _on_reply(self, msg: Msg) -> None:
        request_id = subjects.last_token(msg.subject)
        future = self._waiting.get(request_id)
        if future is None or future.done():
            log.info("late answer for %s ignored", request_id)
            return
        try:
            future.set_result(fusion_pb2.FusedResult.FromString(msg.data))
        except DecodeError:
            log.error("undecodable answer for %s", request_id)

    def record(self, pipeline: str, code: str, protocol: str, seconds: float) -> None:
        """Count one answered request (both adapters call this)."""
        label = self.pipelines.metric_label(pipeline)
        metrics.REQUESTS.labels(label, code, protocol).inc()
        metrics.REQUEST_DURATION.labels(label, protocol).observe(seconds)

    def validate(self, call: PredictCall) -> tuple[PipelineSpec, int]:
        """Check the call against its pipeline; return the spec and the timeout in ms."""
        spec = self.pipelines.get(call.pipeline)
        unknown = sorted(set(call.inputs) - set(spec.inputs))
        if unknown:
            raise InvalidArgument(
                f"unknown input(s) {unknown} for pipeline {spec.name!r}; expected {sorted(spec.inputs)}"
            )
        if not call.inputs:
            raise InvalidArgument(f"no inputs; pipeline {spec.name!r} takes {sorted(spec.inputs)}")
        missing = sorted(n for n, s in spec.inputs.items() if s.required and n not in call.inputs)
        if missing:
            raise InvalidArgument(f"missing required input(s) {missing}")
        for name, text in call.inputs.items():
            if not isinstance(text, str):
                raise InvalidArgument(f"input {name!r} must be a string")
            if not text.strip():
                raise InvalidArgument(f"input {name!r} is empty")
            if len(text) > self.settings.max_text_chars:
                raise InvalidArgument(f"input {name!r} exceeds {self.settings.max_text_chars} characters")
        if call.timeout_ms < 0:
            raise InvalidArgument("timeout_ms must not be negative")
        if call.timeout_ms > self.settings.max_timeout_ms:
            raise InvalidArgument(f"timeout_ms must be at most {self.settings.max_timeout_ms}")
        timeout_ms = call.timeout_ms or spec.deadline_ms or self.settings.default_timeout_ms
        if call.transport_remaining_s is not None:
            timeout_ms = min(timeout_ms, int(call.transport_remaining_s * 1000))
        if timeout_ms <= 0:
            raise DeadlineExceeded("the caller's deadline has already passed")
        if call.request_id:
            envelope.check_request_id(call.request_id)
        return spec, timeout_ms

    async def predict(self, call: PredictCall) -> gateway_pb2.PredictResponse:
        """Run ``call`` end to end; raises a LoomError on failure."""
        started = time.perf_counter()
        code, request_id = "OK", call.request_id
        try:
            response = await self._predict(call)
            request_id = response.request_id
            return response
        except Exception as exc:
            code = str(as_loom_error(exc).code)
            raise
        finally:
            elapsed_ms = (time.perf_counter() - started) * 1000.0
            await self.telemetry.emit(
                "gateway", pipeline=call.pipeline, request_id=request_id, duration_ms=elapsed_ms, code=code
            )

    async def _predict(self, call: PredictCall) -> gateway_pb2.PredictResponse:
        spec, timeout_ms = self.validate(call)
        request_id = call.request_id or envelope.new_request_id()
        if request_id in self._waiting:
            raise InvalidArgument(f"request_id {request_id!r} is already in flight")
        started = time.perf_counter()
        deadline_ms = envelope.now_ms() + timeout_ms
        fused = subjects.fuse(subjects.fuse_partition(request_id, self.settings.fusion_partitions))
        names = sorted(call.inputs)
        future: asyncio.Future[fusion_pb2.FusedResult] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            for name in names:
                part = pb.Part(
                    request_id=request_id,
                    part_id=name,
                    pipeline=spec.name,
                    modality=spec.inputs[name].modality,
                    slip=[*spec.inputs[name].stages, fused],
                    deadline_unix_ms=deadline_ms,
                    reply_to=f"{self._inbox}.{request_id}",
                    part_ids=names,
                    text=call.inputs[name],
                )
                await self.bus.publish(part.slip[0], part.SerializeToString())
            try:
                result = await asyncio.wait_for(future, timeout=timeout_ms / 1000.0)
            except TimeoutError:
                raise DeadlineExceeded(f"no answer within the {timeout_ms} ms deadline") from None
        finally:
            self._waiting.pop(request_id, None)
        if result.HasField("error"):
            raise from_proto(result.error)
        response = result.response
        response.request_id = request_id
        response.pipeline = spec.name
        response.trace_id = current_trace_id()
        response.timings_ms["gateway_total"] = (time.perf_counter() - started) * 1000.0
        return response
