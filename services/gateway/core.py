"""The gateway's domain core: validate, split into parts, publish, await fusion.

Transport-free: the adapters (loom.v1 gRPC, /v1 HTTP, and the KServe v2
front door on both) turn their input into a :class:`PredictCall` and the
:class:`PredictResponse` back into their output. The KServe adapters also
call a single Triton model through the mesh (:meth:`GatewayCore.infer_model`)
and ask the inference service about models (:meth:`GatewayCore.model_query`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from opentelemetry import trace

from services.common import envelope, media, metrics, subjects
from services.common.answers import answer_models, top_label
from services.common.bus import Bus
from services.common.claims import ClaimCheck
from services.common.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, as_loom_error, from_proto
from services.common.events import TelemetryPublisher
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.pb.loom.v1 import fusion_pb2, gateway_pb2, monitor_pb2
from services.common.pipelines import PipelineRegistry, PipelineSpec
from services.common.retry import NO_RESPONDERS
from services.common.telemetry import current_trace_id
from services.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

#: HTTP header and gRPC metadata key of the sticky routing key (canary, experiment arms); empty: per request.
ROUTE_KEY = "x-loom-route-key"
MAX_ROUTE_KEY = 256


@dataclass
class PredictCall:
    pipeline: str
    #: Named inputs: text as ``str``, encoded files (image, audio) as ``bytes``.
    inputs: dict[str, str | bytes]
    timeout_ms: int = 0
    request_id: str = ""
    #: The transport's own deadline (e.g. the gRPC deadline), seconds left.
    transport_remaining_s: float | None = None
    #: Media types the caller declared, by input name.
    content_types: dict[str, str] = field(default_factory=dict)
    bypass_cache: bool = False
    #: Requests with the same key reach the same model version (``Part.route_key``), e.g. a user id.
    route_key: str = ""


class GatewayCore:
    def __init__(
        self, bus: Bus, settings: GatewaySettings, pipelines: PipelineRegistry, claims: ClaimCheck | None = None
    ) -> None:
        self.bus = bus
        self.settings = settings
        self.pipelines = pipelines
        self.claims = claims
        self._inbox = ""
        self._waiting: dict[str, asyncio.Future[bytes]] = {}
        #: Triton models the inference service serves (kept by the KServe front door), for metric labels.
        self.served_models: frozenset[str] = frozenset()
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
        future.set_result(msg.data)

    def record(self, pipeline: str, code: str, protocol: str, seconds: float) -> None:
        """Count one answered request (every adapter calls this); a direct model call is ``model:<name>``."""
        label = self.pipelines.metric_label(pipeline)
        if label == "_unknown" and pipeline in self.served_models:
            label = f"model:{pipeline}"
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
        for name, value in call.inputs.items():
            self._check_input(name, value, spec.inputs[name].modality)
        if call.timeout_ms < 0:
            raise InvalidArgument("timeout_ms must not be negative")
        if call.timeout_ms > self.settings.max_timeout_ms:
            raise InvalidArgument(f"timeout_ms must be at most {self.settings.max_timeout_ms}")
        timeout_ms = call.timeout_ms or spec.deadline_ms or self.settings.default_timeout_ms
        if call.transport_remaining_s is not None:
            timeout_ms = min(timeout_ms, int(call.transport_remaining_s * 1000))
        if timeout_ms <= 0:
            metrics.DEADLINE_DROPS.labels("gateway", "gateway").inc()  # refused unworked: nobody waits for it
            raise DeadlineExceeded("the caller's deadline has already passed")
        if call.request_id:
            envelope.check_request_id(call.request_id)
        if len(call.route_key) > MAX_ROUTE_KEY:
            raise InvalidArgument(f"the route key ({ROUTE_KEY}) must be at most {MAX_ROUTE_KEY} characters")
        return spec, timeout_ms

    def _check_input(self, name: str, value: str | bytes, modality: str) -> None:
        if modality == "text":
            if not isinstance(value, str):
                raise InvalidArgument(f"input {name!r} is text: send a string, not a file")
            if not value.strip():
                raise InvalidArgument(f"input {name!r} is empty")
            if len(value) > self.settings.max_text_chars:
                raise InvalidArgument(f"input {name!r} exceeds {self.settings.max_text_chars} characters")
            return
        if not isinstance(value, bytes):
            raise InvalidArgument(f"input {name!r} is an {modality} file: send its bytes, not text")
        if len(value) > self.settings.max_input_bytes:
            raise ResourceExhausted(
                f"input {name!r} is {len(value)} bytes; the limit is {self.settings.max_input_bytes} bytes"
            )
        media.check_media(name, value, modality)

    async def predict(self, call: PredictCall) -> gateway_pb2.PredictResponse:
        """Run ``call`` end to end; raises a LoomError on failure."""
        started = time.perf_counter()
        code, response = "OK", None
        try:
            response = await self._predict(call)
            return response
        except Exception as exc:
            code = str(as_loom_error(exc).code)
            raise
        finally:
            elapsed_ms = (time.perf_counter() - started) * 1000.0
            self._observe(call, response, elapsed_ms)
            await self._report(call, response, elapsed_ms, code)

    def _observe(self, call: PredictCall, response: gateway_pb2.PredictResponse | None, elapsed_ms: float) -> None:
        """``loom_stage_duration_seconds{stage="gateway"}``: the whole call, with the models that answered it."""
        model, version = answer_models(response) if response is not None else ("", "")
        self.observe_stage("gateway", self.pipelines.metric_label(call.pipeline), model, version, elapsed_ms)

    def observe_stage(self, stage: str, label: str, model: str, version: str, elapsed_ms: float) -> None:
        """One ``loom_stage_duration_seconds`` sample of the gateway (``label``: a pipeline, ``model:<name>``)."""
        metrics.STAGE_DURATION.labels("gateway", stage, label, model, version).observe(elapsed_ms / 1000.0)

    async def _report(
        self, call: PredictCall, response: gateway_pb2.PredictResponse | None, elapsed_ms: float, code: str
    ) -> None:
        """One telemetry event per answer: the monitor's SLOs, and its join with feedback."""
        if response is None:
            # A name that is no pipeline is ``_unknown``: callers' junk never becomes a pipeline in the monitor.
            pipeline = self.pipelines.metric_label(call.pipeline)
            await self.telemetry.emit(
                "gateway", pipeline=pipeline, request_id=call.request_id, duration_ms=elapsed_ms, code=code
            )
            return
        model, version = answer_models(response)
        await self.telemetry.emit(
            "gateway",
            pipeline=response.pipeline or call.pipeline,
            request_id=response.request_id,
            duration_ms=elapsed_ms,
            code="DEGRADED" if response.degraded and code == "OK" else code,
            outcome=top_label(response),
            model=model,
            model_version=version,
        )

    async def _predict(self, call: PredictCall) -> gateway_pb2.PredictResponse:
        spec, timeout_ms = self.validate(call)
        # The caller's id labels the answer; the mesh routes on an id of its own, because
        # callers reuse ids (KServe clients often send "1") and fusion drops repeats.
        route_id = envelope.new_request_id()
        trace.get_current_span().set_attribute("loom.request_id", call.request_id or route_id)
        started = time.perf_counter()
        deadline_ms = envelope.now_ms() + timeout_ms
        parts = self.make_parts(spec, call, route_id, deadline_ms, reply_to=f"{self._inbox}.{route_id}")
        raw = await self._publish_and_wait(route_id, parts, timeout_ms)
        try:
            result = fusion_pb2.FusedResult.FromString(raw)
        except DecodeError:
            raise InvalidArgument("fusion sent an undecodable answer") from None
        if result.HasField("error"):
            raise from_proto(result.error)
        response = result.response
        response.request_id = call.request_id or route_id
        response.pipeline = spec.name
        response.trace_id = current_trace_id()
        response.timings_ms["gateway_total"] = (time.perf_counter() - started) * 1000.0
        return response

    def make_parts(
        self,
        spec: PipelineSpec,
        call: PredictCall,
        request_id: str,
        deadline_ms: int,
        *,
        reply_to: str = "",
        durable: bool = False,
        tenant: str = "",
    ) -> list[pb.Part]:
        """One part per input, each with its routing slip ending at the request's fusion partition."""
        fused = subjects.fuse(subjects.fuse_partition(request_id, self.settings.fusion_partitions))
        names = sorted(call.inputs)
        parts = []
        for name in names:
            value = call.inputs[name]
            part = pb.Part(
                request_id=request_id,
                part_id=name,
                pipeline=spec.name,
                modality=spec.inputs[name].modality,
                slip=[*spec.inputs[name].subjects(), fused],
                deadline_unix_ms=deadline_ms,
                reply_to=reply_to,
                part_ids=names,
                content_type=call.content_types.get(name, ""),
                bypass_cache=call.bypass_cache,
                route_key=call.route_key,
                durable=durable,
                tenant=tenant,
            )
            if isinstance(value, str):
                part.text = value
            else:
                part.data = value
            parts.append(part)
        return parts

    async def _publish_and_wait(self, request_id: str, parts: list[pb.Part], timeout_ms: int) -> bytes:
        """Send the parts on their way and wait for the one answer on our inbox."""
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            for part in parts:
                if self.claims is not None:
                    await self.claims.offload(part)
                await self.bus.publish(part.slip[0], part.SerializeToString())
            try:
                return await asyncio.wait_for(future, timeout=timeout_ms / 1000.0)
            except TimeoutError:
                raise DeadlineExceeded(f"no answer within the {timeout_ms} ms deadline") from None
        finally:
            self._waiting.pop(request_id, None)

    async def infer_model(
        self,
        model: str,
        tensors: dict[str, pb.Tensor],
        *,
        timeout_ms: int,
        request_id: str = "",
        bypass_cache: bool = False,
    ) -> pb.Part:
        """Run one Triton model through the mesh (``loom.infer.<model>``); returns the answered part.

        The answer's ``request_id`` is ``request_id`` (or a new one); routing uses an id of its own.
        """
        if request_id:
            envelope.check_request_id(request_id)
        route_id = envelope.new_request_id()
        part = pb.Part(
            request_id=route_id,
            part_id=model,
            pipeline=f"model:{model}",
            slip=[subjects.infer(model), f"{self._inbox}.{route_id}"],
            deadline_unix_ms=envelope.now_ms() + timeout_ms,
            bypass_cache=bypass_cache,
        )
        for name, tensor in tensors.items():
            part.tensors[name].CopyFrom(tensor)
        raw = await self._publish_and_wait(route_id, [part], timeout_ms)
        try:
            answer = pb.Part.FromString(raw)
        except DecodeError:
            raise InvalidArgument("inference sent an undecodable answer") from None
        if answer.HasField("error"):
            raise from_proto(answer.error)
        if self.claims is not None:
            await self.claims.restore(answer)
        answer.request_id = request_id or route_id
        return answer

    async def feedback(self, doc: object) -> monitor_pb2.Feedback:
        """Check ground truth for an answer and publish it on ``loom.fb.<pipeline>`` for the monitor."""
        if not isinstance(doc, dict):
            raise InvalidArgument("feedback must be a JSON object")
        pipeline, request_id = doc.get("pipeline"), doc.get("request_id")
        label, correct = doc.get("label"), doc.get("correct")
        if not isinstance(pipeline, str) or not pipeline:
            raise InvalidArgument("feedback needs 'pipeline'")
        self.pipelines.get(pipeline)  # NOT_FOUND for an unknown pipeline
        if not isinstance(request_id, str) or not request_id:
            raise InvalidArgument("feedback needs 'request_id', the id of the answer it is about")
        if label is not None and (not isinstance(label, str) or not label):
            raise InvalidArgument("'label' must be a non-empty string")
        if correct is not None and not isinstance(correct, bool):
            raise InvalidArgument("'correct' must be true or false")
        if label is None and correct is None:
            raise InvalidArgument("feedback needs 'label' (the true label) or 'correct' (true/false)")
        fb = monitor_pb2.Feedback(
            pipeline=pipeline,
            request_id=request_id,
            label=label or "",
            source=str(doc.get("source") or ""),
            timestamp_unix_ms=envelope.now_ms(),
        )
        if correct is not None:
            fb.correct = correct
        await self.bus.publish(subjects.feedback(pipeline), fb.SerializeToString())
        return fb

    async def model_query(self, op: str, model: str, *, timeout_s: float = 5.0) -> bytes:
        """Ask the inference service about a model (``metadata``, ``ready``, ``list``); raw reply bytes."""
        reply = await self.bus.request(subjects.model_query(op), model.encode(), timeout=timeout_s, retry=NO_RESPONDERS)
        return bytes(reply.data)
