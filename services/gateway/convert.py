"""Edge conversions: protobuf and HTTP JSON/multipart <-> the gateway core's types."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from services.common.errors import InvalidArgument
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.pb.loom.v1 import gateway_pb2
from services.gateway.core import PredictCall

FIELDS = {"inputs", "timeout_ms", "request_id", "bypass_cache"}


def call_from_proto(req: gateway_pb2.PredictRequest, remaining_s: float | None) -> PredictCall:
    inputs: dict[str, str | bytes] = {}
    content_types: dict[str, str] = {}
    for name, value in req.inputs.items():
        kind = value.WhichOneof("kind")
        if kind == "text":
            inputs[name] = value.text
        elif kind == "data":
            inputs[name] = value.data
        else:
            raise InvalidArgument(f"input {name!r} has no value")
        if value.content_type:
            content_types[name] = value.content_type
    return PredictCall(
        pipeline=req.pipeline,
        inputs=inputs,
        timeout_ms=req.timeout_ms,
        request_id=req.request_id,
        transport_remaining_s=remaining_s,
        content_types=content_types,
        bypass_cache=req.bypass_cache,
    )


def call_to_proto(call: PredictCall) -> gateway_pb2.PredictRequest:
    """The wire form of a call (what the durable lane stores on ``loom.req.<pipeline>``)."""
    req = gateway_pb2.PredictRequest(
        pipeline=call.pipeline, timeout_ms=call.timeout_ms, request_id=call.request_id, bypass_cache=call.bypass_cache
    )
    for name, value in call.inputs.items():
        if isinstance(value, str):
            req.inputs[name].text = value
        else:
            req.inputs[name].data = value
        if name in call.content_types:
            req.inputs[name].content_type = call.content_types[name]
    return req


def _input_from_json(name: str, value: Any, content_types: dict[str, str]) -> str | bytes:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and set(value) <= {"b64", "content_type"} and isinstance(value.get("b64"), str):
        ctype = value.get("content_type", "")
        if not isinstance(ctype, str):
            raise InvalidArgument(f"input {name!r}: 'content_type' must be a string")
        if ctype:
            content_types[name] = ctype
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, ValueError):
            raise InvalidArgument(f"input {name!r}: 'b64' is not valid base64") from None
    raise InvalidArgument(
        f'input {name!r} must be a string (text) or {{"b64": "..."}} (a file), got {type(value).__name__}'
    )


def call_from_json(pipeline: str, body: Any) -> PredictCall:
    """``{"inputs": {"text": "...", "image": {"b64": "..."}}, "timeout_ms": 2000, ...}``."""
    if not isinstance(body, dict):
        raise InvalidArgument("the body must be a JSON object")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise InvalidArgument(f"unknown field(s) {unknown}")
    inputs = body.get("inputs")
    if not isinstance(inputs, dict):
        raise InvalidArgument("'inputs' must be an object of named inputs")
    content_types: dict[str, str] = {}
    values = {name: _input_from_json(name, value, content_types) for name, value in inputs.items()}
    return _call(pipeline, values, content_types, body.get("timeout_ms", 0), body.get("request_id", ""), body)


def _call(
    pipeline: str,
    inputs: dict[str, str | bytes],
    content_types: dict[str, str],
    timeout_ms: Any,
    request_id: Any,
    options: dict[str, Any],
) -> PredictCall:
    if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int):
        raise InvalidArgument("'timeout_ms' must be an integer")
    if not isinstance(request_id, str):
        raise InvalidArgument("'request_id' must be a string")
    bypass = options.get("bypass_cache", False)
    if not isinstance(bypass, bool):
        raise InvalidArgument("'bypass_cache' must be true or false")
    return PredictCall(
        pipeline=pipeline,
        inputs=inputs,
        timeout_ms=timeout_ms,
        request_id=request_id,
        content_types=content_types,
        bypass_cache=bypass,
    )


def call_from_form(pipeline: str, fields: dict[str, tuple[bytes, str, bool]]) -> PredictCall:
    """multipart/form-data: one field per input (files for image/audio) plus the options as fields.

    ``fields`` maps a field name to (bytes, content type, is_file).
    """
    options: dict[str, Any] = {}
    inputs: dict[str, str | bytes] = {}
    content_types: dict[str, str] = {}
    for name, (data, ctype, is_file) in fields.items():
        if name in ("timeout_ms", "request_id", "bypass_cache"):
            text = data.decode("utf-8", "replace").strip()
            if name == "timeout_ms":
                if not text.isdigit():
                    raise InvalidArgument("'timeout_ms' must be an integer")
                options[name] = int(text)
            elif name == "bypass_cache":
                options[name] = text.lower() in ("1", "true", "yes")
            else:
                options[name] = text
        elif is_file:
            inputs[name] = data
            if ctype and ctype != "application/octet-stream":
                content_types[name] = ctype
        else:
            try:
                inputs[name] = data.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidArgument(f"form field {name!r} is not UTF-8 text; send files as file parts") from None
    return _call(pipeline, inputs, content_types, options.get("timeout_ms", 0), options.get("request_id", ""), options)


def _labels(labels: Any) -> list[dict[str, Any]]:
    return [{"label": lb.label, "score": round(float(lb.score), 6)} for lb in labels]


def output_to_json(output: pb.PartOutput) -> dict[str, Any]:
    kind = output.WhichOneof("kind")
    if kind == "text":
        t = output.text
        return {
            "model": t.model,
            "model_version": t.model_version,
            "embedding": [float(x) for x in t.embedding],
            "labels": _labels(t.labels),
        }
    if kind == "image":
        im = output.image
        return {
            "model": im.model,
            "model_version": im.model_version,
            "width": im.width,
            "height": im.height,
            "ocr": [
                {"text": ln.text, "score": round(float(ln.score), 4), "box": [round(float(v), 1) for v in ln.box]}
                for ln in im.ocr
            ],
            "text": im.text,
            "topics": _labels(im.topics),
        }
    if kind == "audio":
        au = output.audio
        return {
            "model": au.model,
            "model_version": au.model_version,
            "duration_s": round(float(au.duration_s), 3),
            "speech_segments": [
                {"start_s": round(float(s.start_s), 3), "end_s": round(float(s.end_s), 3)} for s in au.speech_segments
            ],
            "speech_ratio": round(float(au.speech_ratio), 4),
        }
    return {}


def response_to_json(resp: gateway_pb2.PredictResponse) -> dict[str, Any]:
    body: dict[str, Any] = {
        "request_id": resp.request_id,
        "trace_id": resp.trace_id,
        "pipeline": resp.pipeline,
        "topics": _labels(resp.topics),
        "outputs": {name: output_to_json(out) for name, out in sorted(resp.outputs.items())},
        "degraded": resp.degraded,
        "missing": list(resp.missing),
        "timings_ms": {k: round(v, 3) for k, v in sorted(resp.timings_ms.items())},
    }
    if resp.notes:
        body["notes"] = dict(sorted(resp.notes.items()))
    if resp.errors:
        body["errors"] = {n: {"code": e.code, "message": e.message} for n, e in sorted(resp.errors.items())}
    return body


def result_to_json(result: gateway_pb2.Result) -> dict[str, Any]:
    """``GET /v1/results/{id}``: the record of a durable request; ``response`` once it is answered."""
    body: dict[str, Any] = {
        "request_id": result.request_id,
        "state": gateway_pb2.Result.State.Name(result.state),
        "pipeline": result.pipeline,
        "accepted_unix_ms": result.accepted_unix_ms,
    }
    if result.state != gateway_pb2.Result.PENDING:
        body["finished_unix_ms"] = result.finished_unix_ms
    if result.state == gateway_pb2.Result.DONE:
        body["response"] = response_to_json(result.response)
    if result.HasField("error"):
        body["error"] = {"code": result.error.code, "message": result.error.message, "service": result.error.service}
    return body
