"""KServe v2 edge conversions, REST side: JSON bodies and Triton's binary tensor data extension.

A request body is JSON, or a JSON header of ``Inference-Header-Content-Length``
bytes followed by the raw data of each input whose ``binary_data_size``
parameter says so, in input order. A response carries an output as binary data
when the request asks (per output ``binary_data``, or ``binary_data_output``
for all), and always when JSON cannot carry it (BF16, non-UTF-8 BYTES); the
answer's JSON header length then goes back in the same header. BYTES elements
in JSON are strings, or ``{"b64": "..."}`` for a file, as in the /v1 JSON API.
Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from services.common.errors import InvalidArgument
from services.gateway.kserve_wire import BYTES, InferRequest, InferResult, KTensor, pack_bytes


def _flatten(value: Any) -> list[Any]:
    if not isinstance(value, list):
        return [value]
    return [x for item in value for x in _flatten(item)]


def _json_bytes(name: str, item: Any) -> bytes:
    # Strings are UTF-8 text; {"b64": "..."} carries a file, as in the /v1 JSON API.
    if isinstance(item, str):
        return item.encode("utf-8")
    if isinstance(item, dict) and set(item) == {"b64"} and isinstance(item["b64"], str):
        try:
            return base64.b64decode(item["b64"], validate=True)
        except (binascii.Error, ValueError):
            raise InvalidArgument(f"input {name!r}: 'b64' is not valid base64") from None
    raise InvalidArgument(f'input {name!r}: BYTES elements are strings or {{"b64": "..."}}')


def _rest_input(spec: Any, binary: memoryview, offset: int) -> tuple[KTensor, int]:
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not isinstance(spec.get("datatype"), str):
        raise InvalidArgument("each input needs a 'name' and a 'datatype'")
    name, dt, shape = spec["name"], spec["datatype"], spec.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidArgument(f"input {name!r}: 'shape' must be a list of integers")
    params = spec.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidArgument(f"input {name!r}: 'parameters' must be an object")
    size = params.pop("binary_data_size", None)
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise InvalidArgument(f"input {name!r}: binary_data_size {size!r} does not fit the binary data")
        return KTensor(name, dt, shape, bytes(binary[offset : offset + size]), params).check(), offset + size
    if "data" not in spec:
        raise InvalidArgument(f"input {name!r} has neither 'data' nor a binary_data_size parameter")
    flat = _flatten(spec["data"])
    if dt == BYTES:
        tensor = KTensor(name, dt, shape, pack_bytes([_json_bytes(name, item) for item in flat]), params)
    else:
        tensor = KTensor.from_values(name, dt, shape, flat)
        tensor.parameters = params
    return tensor.check(), offset


def request_from_rest(model: str, version: str, body: bytes, header_length: str | None) -> InferRequest:
    """A REST inference body: JSON, or a JSON header of ``header_length`` bytes followed by binary tensors."""
    try:
        split = len(body) if header_length is None else int(header_length)
    except ValueError:
        raise InvalidArgument("Inference-Header-Content-Length must be an integer") from None
    if not 0 <= split <= len(body):
        raise InvalidArgument(f"Inference-Header-Content-Length {split} does not fit a body of {len(body)} bytes")
    try:
        header = json.loads(body[:split])
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument("the inference request header is not valid JSON") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise InvalidArgument("the inference request must be a JSON object with an 'inputs' list")
    params = header.get("parameters")
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise InvalidArgument("'parameters' must be an object")
    id_ = header.get("id", "")
    if not isinstance(id_, str):
        raise InvalidArgument("'id' must be a string")
    binary, offset, inputs = memoryview(body)[split:], 0, []
    for spec in header["inputs"]:
        tensor, offset = _rest_input(spec, binary, offset)
        inputs.append(tensor)
    if offset != len(binary):
        raise InvalidArgument(f"{len(binary) - offset} bytes of binary data follow the inputs unclaimed")
    names, wants = _rest_outputs(header.get("outputs"))
    return InferRequest(
        model, version, id_, inputs, names, params, wants, binary_default=params.get("binary_data_output") is True
    )


def _rest_outputs(outputs: Any) -> tuple[list[str], dict[str, bool]]:
    if not isinstance(outputs, list | None):
        raise InvalidArgument("'outputs' must be a list")
    names, binary = [], {}
    for out in outputs or []:
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise InvalidArgument("each requested output needs a 'name'")
        params = out.get("parameters") or {}
        if not isinstance(params, dict) or set(params) - {"binary_data"}:
            raise InvalidArgument(f"output {out['name']!r}: only the 'binary_data' parameter is supported")
        names.append(out["name"])
        if "binary_data" in params:
            binary[out["name"]] = params["binary_data"] is True
    return names, binary


def to_rest_response(req: InferRequest, res: InferResult) -> tuple[bytes, int | None]:
    """The REST answer body and, when any output is binary, the length of its JSON header."""
    blobs, described = [], []
    for out in res.outputs:
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        binary = req.binary_outputs.get(out.name, req.binary_default) or out.datatype == "BF16"
        if not binary:
            try:
                entry["data"] = out.values()
            except UnicodeDecodeError:  # not text: only binary data can carry it
                binary = True
        if binary:
            entry["parameters"] = {"binary_data_size": len(out.data)}
            blobs.append(out.data)
        described.append(entry)
    header = {
        "model_name": res.model,
        "model_version": res.version,
        "id": res.id,
        "parameters": res.parameters,
        "outputs": described,
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    return (head + b"".join(blobs), len(head)) if blobs else (head, None)


def metadata_to_json(meta: Any) -> dict[str, Any]:
    """An ``inference.ModelMetadataResponse`` as the REST model metadata object."""

    def tensors(items: Any) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]

    return {
        "name": meta.name,
        "versions": list(meta.versions),
        "platform": meta.platform,
        "inputs": tensors(meta.inputs),
        "outputs": tensors(meta.outputs),
    }
