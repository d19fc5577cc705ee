"""KServe v2 edge conversions, Loom side: requests to Loom calls, Loom answers to KServe outputs.

The KServe adapters decode the wire (:mod:`services.gateway.kserve_wire`) into
:class:`InferRequest`; this module turns that into a :class:`PredictCall` for a
pipeline or into per-row ``pb.Tensor`` dicts for a single Triton model, and the
answers back into :class:`KTensor` outputs. Pure: no I/O.

A pipeline as a KServe model: one BYTES input per pipeline input (text as UTF-8,
files as their encoded bytes), and the outputs ``result`` (the /v1 JSON answer),
``embedding`` (first text output), ``topics`` and ``topic_scores``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from tritonclient.grpc import service_pb2

from services.common import envelope
from services.common.errors import Internal, InvalidArgument, NotFound
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.pb.loom.v1 import gateway_pb2
from services.common.pipelines import PipelineSpec
from services.gateway.convert import response_to_json
from services.gateway.core import PredictCall
from services.gateway.kserve_wire import BYTES, InferRequest, InferResult, KTensor, pack_bytes, split_rows, unpack_bytes

PIPELINE_VERSION = "1"
PIPELINE_PLATFORM = "loom_pipeline"


@dataclass(frozen=True)
class Options:
    timeout_ms: int
    bypass_cache: bool
    #: The caller's id when it is a valid Loom request id; else "" (Loom makes one).
    request_id: str


def options(req: InferRequest) -> Options:
    """Loom's per-request options from the KServe parameters.

    ``timeout_ms`` (int) or Triton's own ``timeout`` (microseconds), ``bypass_cache`` (bool).
    """
    params = req.parameters
    timeout_ms = params.get("timeout_ms", 0)
    if "timeout_ms" not in params and "timeout" in params:
        timeout_us = params["timeout"]
        if isinstance(timeout_us, bool) or not isinstance(timeout_us, int) or timeout_us < 0:
            raise InvalidArgument("parameter 'timeout' must be a non-negative integer (microseconds)")
        timeout_ms = math.ceil(timeout_us / 1000)
    if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int) or timeout_ms < 0:
        raise InvalidArgument("parameter 'timeout_ms' must be a non-negative integer")
    bypass = params.get("bypass_cache", False)
    if not isinstance(bypass, bool):
        raise InvalidArgument("parameter 'bypass_cache' must be a bool")
    request_id = req.id if envelope.REQUEST_ID.match(req.id) else ""
    return Options(timeout_ms, bypass, request_id)


# ------------------------------------------------------------------ pipelines
def pipeline_outputs_meta(spec: PipelineSpec) -> list[tuple[str, str, list[int]]]:
    """(name, datatype, shape) of every output the pipeline can produce."""
    modalities = {i.modality for i in spec.inputs.values()}
    outputs = [("result", BYTES, [1])]
    if "text" in modalities:
        outputs.append(("embedding", "FP32", [1, -1]))
    if modalities & {"text", "image"}:
        outputs += [("topics", BYTES, [-1]), ("topic_scores", "FP32", [-1])]
    return outputs


def pipeline_metadata(spec: PipelineSpec) -> Any:
    """The ``inference.ModelMetadataResponse`` of a pipeline."""
    meta = service_pb2.ModelMetadataResponse(name=spec.name, versions=[PIPELINE_VERSION], platform=PIPELINE_PLATFORM)
    for name in spec.inputs:
        meta.inputs.add(name=name, datatype=BYTES, shape=[-1])
    for name, datatype, shape in pipeline_outputs_meta(spec):
        meta.outputs.add(name=name, datatype=datatype, shape=shape)
    return meta


def call_from_request(spec: PipelineSpec, req: InferRequest, remaining_s: float | None = None) -> PredictCall:
    """A pipeline call: each input a BYTES tensor of one element (text: UTF-8; files: their bytes)."""
    if req.version not in ("", PIPELINE_VERSION):
        raise NotFound(f"pipeline {spec.name!r} has only version {PIPELINE_VERSION}, not {req.version!r}")
    known = [name for name, _, _ in pipeline_outputs_meta(spec)]
    unknown_outputs = [n for n in req.outputs if n not in known]
    if unknown_outputs:
        raise InvalidArgument(f"unknown output(s) {unknown_outputs} for pipeline {spec.name!r}; it has {known}")
    inputs: dict[str, str | bytes] = {}
    content_types: dict[str, str] = {}
    for tensor in req.inputs:
        if tensor.name in inputs:
            raise InvalidArgument(f"input {tensor.name!r} is given twice")
        if tensor.name not in spec.inputs:
            raise InvalidArgument(
                f"unknown input {tensor.name!r} for pipeline {spec.name!r}; it takes {list(spec.inputs)}"
            )
        if tensor.datatype != BYTES:
            raise InvalidArgument(f"input {tensor.name!r} must be BYTES, got {tensor.datatype}")
        items = unpack_bytes(tensor.data)
        if len(items) != 1:
            raise InvalidArgument(f"input {tensor.name!r} must hold exactly one element, got {len(items)}")
        if spec.inputs[tensor.name].modality == "text":
            try:
                inputs[tensor.name] = items[0].decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidArgument(f"input {tensor.name!r} is text: send UTF-8") from None
        else:
            inputs[tensor.name] = items[0]
        ctype = tensor.parameters.get("content_type")
        if isinstance(ctype, str) and ctype:
            content_types[tensor.name] = ctype
    opts = options(req)
    return PredictCall(
        pipeline=spec.name,
        inputs=inputs,
        timeout_ms=opts.timeout_ms,
        request_id=opts.request_id,
        transport_remaining_s=remaining_s,
        content_types=content_types,
        bypass_cache=opts.bypass_cache,
    )


def _topics(resp: gateway_pb2.PredictResponse) -> list[pb.Label]:
    """The fused topics; without fusion, the labels of the first output that has any."""
    if resp.topics:
        return list(resp.topics)
    for _, out in sorted(resp.outputs.items()):
        kind = out.WhichOneof("kind")
        labels = out.text.labels if kind == "text" else out.image.topics if kind == "image" else []
        if labels:
            return list(labels)
    return []


def pipeline_result(req: InferRequest, resp: gateway_pb2.PredictResponse) -> InferResult:
    """The pipeline's answer as KServe outputs (those requested; all when none were)."""
    body = response_to_json(resp)
    outputs = {"result": KTensor("result", BYTES, [1], pack_bytes([json.dumps(body).encode()]))}
    texts = [out.text for _, out in sorted(resp.outputs.items()) if out.WhichOneof("kind") == "text"]
    embedding = next((list(t.embedding) for t in texts if t.embedding), None)
    if embedding is not None:
        outputs["embedding"] = KTensor.from_values("embedding", "FP32", [1, len(embedding)], embedding)
    topics = _topics(resp)
    if topics:
        names = pack_bytes([t.label.encode() for t in topics])
        outputs["topics"] = KTensor("topics", BYTES, [len(topics)], names)
        outputs["topic_scores"] = KTensor.from_values("topic_scores", "FP32", [len(topics)], [t.score for t in topics])
    # A requested output this answer cannot give (no text input, say) is left out; `result` says why.
    chosen = [outputs[n] for n in req.outputs if n in outputs] if req.outputs else list(outputs.values())
    params = {"request_id": resp.request_id, "trace_id": resp.trace_id}
    return InferResult(resp.pipeline, PIPELINE_VERSION, req.id or resp.request_id, chosen, params)


# ------------------------------------------------------------ single models
@dataclass(frozen=True)
class ModelEntry:
    """A Triton model the inference service serves."""

    name: str
    #: Its ready versions.
    versions: tuple[str, ...]
    #: Triton's max_batch_size when the inference service says; None: unknown (taken as batching).
    max_batch_size: int | None = None

    @property
    def batched(self) -> bool:
        return self.max_batch_size is None or self.max_batch_size > 0


def models_from_list(raw: bytes) -> dict[str, ModelEntry]:
    """The inference service's ``loom.models.list`` reply: ``[{"name": ..., "versions": [...]}, ...]``."""
    try:
        listing = json.loads(raw)
        entries = [
            ModelEntry(str(m["name"]), tuple(map(str, m.get("versions", []))), _int_or_none(m.get("max_batch_size")))
            for m in listing
        ]
    except (ValueError, TypeError, KeyError, AttributeError):
        raise Internal("the inference service sent an unreadable model list") from None
    return {m.name: m for m in entries}


def model_rows(req: InferRequest, *, batched: bool) -> list[dict[str, pb.Tensor]]:
    """The inputs of a Triton model as Part tensors: one dict per batch row (``batched``), else one as is.

    A Part carries one item of a batching model (the inference service batches
    parts itself), so the caller's batch dimension is split off here.
    """
    if not req.inputs:
        raise InvalidArgument(f"no inputs for model {req.model!r}")
    names = [t.name for t in req.inputs]
    if len(set(names)) != len(names):
        raise InvalidArgument(f"an input name is given twice: {names}")
    if not batched:
        return [{t.name: pb.Tensor(datatype=t.datatype, shape=t.shape, data=t.data) for t in req.inputs}]
    sizes = {t.shape[0] if t.shape else -1 for t in req.inputs}
    if len(sizes) != 1 or min(sizes) < 1:
        raise InvalidArgument(
            f"model {req.model!r} batches: every input needs the same batch size >= 1 as its first dimension"
        )
    rows = sizes.pop()
    per_input = {t.name: (t, split_rows(t, rows)) for t in req.inputs}
    return [
        {
            name: pb.Tensor(datatype=t.datatype, shape=t.shape[1:], data=chunks[i])
            for name, (t, chunks) in per_input.items()
        }
        for i in range(rows)
    ]


def model_result(req: InferRequest, answers: list[pb.Part], *, batched: bool, request_id: str) -> InferResult:
    """The answered parts (one per row) as KServe outputs; rows are stacked back on a batch dimension."""
    first = answers[0]
    names = req.outputs or sorted(first.tensors)
    missing = [n for n in names if n not in first.tensors]
    if missing:
        raise InvalidArgument(f"model {req.model!r} has no output(s) {missing}; it gave {sorted(first.tensors)}")
    outputs = []
    for name in names:
        head = first.tensors[name]
        if not all(name in p.tensors and _same_form(p.tensors[name], head) for p in answers):
            raise Internal(f"model {req.model!r}: the rows disagree on output {name!r}")
        shape = [len(answers), *head.shape] if batched else list(head.shape)
        outputs.append(KTensor(name, head.datatype, shape, b"".join(p.tensors[name].data for p in answers)))
    version = first.model_version
    return InferResult(req.model, version, req.id or request_id, outputs, {"request_id": request_id})


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _same_form(a: pb.Tensor, b: pb.Tensor) -> bool:
    return a.datatype == b.datatype and list(a.shape) == list(b.shape)
