"""Edge conversions: protobuf and HTTP JSON <-> the gateway core's types."""

from __future__ import annotations

from typing import Any

from services.common.errors import InvalidArgument
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.pb.loom.v1 import gateway_pb2
from services.gateway.core import PredictCall


def call_from_proto(req: gateway_pb2.PredictRequest, remaining_s: float | None) -> PredictCall:
    inputs: dict[str, str] = {}
    for name, value in req.inputs.items():
        if value.WhichOneof("kind") != "text":
            raise InvalidArgument(f"input {name!r} has no value")
        inputs[name] = value.text
    return PredictCall(
        pipeline=req.pipeline,
        inputs=inputs,
        timeout_ms=req.timeout_ms,
        request_id=req.request_id,
        transport_remaining_s=remaining_s,
    )


def call_from_json(pipeline: str, body: Any) -> PredictCall:
    """``{"inputs": {"text": "..."}, "timeout_ms": 2000, "request_id": "..."}``."""
    if not isinstance(body, dict):
        raise InvalidArgument("the body must be a JSON object")
    unknown = sorted(set(body) - {"inputs", "timeout_ms", "request_id"})
    if unknown:
        raise InvalidArgument(f"unknown field(s) {unknown}")
    inputs = body.get("inputs")
    if not isinstance(inputs, dict):
        raise InvalidArgument("'inputs' must be an object of named inputs")
    for name, value in inputs.items():
        if not isinstance(value, str):
            raise InvalidArgument(f"input {name!r} must be a string, got {type(value).__name__}")
    timeout_ms = body.get("timeout_ms", 0)
    if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int):
        raise InvalidArgument("'timeout_ms' must be an integer")
    request_id = body.get("request_id", "")
    if not isinstance(request_id, str):
        raise InvalidArgument("'request_id' must be a string")
    return PredictCall(pipeline=pipeline, inputs=dict(inputs), timeout_ms=timeout_ms, request_id=request_id)


def output_to_json(output: pb.PartOutput) -> dict[str, Any]:
    kind = output.WhichOneof("kind")
    if kind == "text":
        t = output.text
        return {
            "model": t.model,
            "model_version": t.model_version,
            "embedding": [float(x) for x in t.embedding],
            "labels": [{"label": lb.label, "score": float(lb.score)} for lb in t.labels],
        }
    return {}


def response_to_json(resp: gateway_pb2.PredictResponse) -> dict[str, Any]:
    body: dict[str, Any] = {
        "request_id": resp.request_id,
        "trace_id": resp.trace_id,
        "pipeline": resp.pipeline,
        "outputs": {name: output_to_json(out) for name, out in sorted(resp.outputs.items())},
        "degraded": resp.degraded,
        "missing": list(resp.missing),
        "timings_ms": {k: round(v, 3) for k, v in sorted(resp.timings_ms.items())},
    }
    if resp.errors:
        body["errors"] = {n: {"code": e.code, "message": e.message} for n, e in sorted(resp.errors.items())}
    return body
