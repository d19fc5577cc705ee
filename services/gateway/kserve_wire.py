"""KServe v2 edge conversions, wire side: the neutral request form and the gRPC messages.

Both transports meet in one neutral form, :class:`KTensor` (raw little-endian
bytes; BYTES in KServe's raw form: a 4-byte little-endian length per element,
then its bytes), :class:`InferRequest` and :class:`InferResult`. The REST side
is :mod:`services.gateway.kserve_rest`. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2

from services.common.errors import InvalidArgument

BYTES = "BYTES"
#: numpy dtypes of the fixed-size datatypes; BF16 has none and travels raw (binary) only.
NUMPY: dict[str, np.dtype] = {
    name: np.dtype(code)
    for name, code in {
        "BOOL": "?",
        "UINT8": "<u1",
        "UINT16": "<u2",
        "UINT32": "<u4",
        "UINT64": "<u8",
        "INT8": "<i1",
        "INT16": "<i2",
        "INT32": "<i4",
        "INT64": "<i8",
        "FP16": "<f2",
        "FP32": "<f4",
        "FP64": "<f8",
    }.items()
}
ITEM_SIZE = {**{name: dt.itemsize for name, dt in NUMPY.items()}, "BF16": 2}
#: The typed ``InferTensorContents`` field of each datatype (FP16 and BF16: raw only).
CONTENTS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    BYTES: "bytes_contents",
}


def pack_bytes(items: list[bytes]) -> bytes:
    return b"".join(len(item).to_bytes(4, "little") + item for item in items)


def unpack_bytes(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        if pos + 4 > len(data):
            raise InvalidArgument("BYTES tensor data ends inside a length prefix")
        size = int.from_bytes(data[pos : pos + 4], "little")
        pos += 4
        if pos + size > len(data):
            raise InvalidArgument("BYTES tensor element runs past the end of the data")
        out.append(data[pos : pos + size])
        pos += size
    return out


def element_count(shape: list[int]) -> int:
    return int(np.prod(shape, dtype=np.int64)) if shape else 1


@dataclass
class KTensor:
    """A KServe tensor in neutral form: name, datatype, shape and raw bytes."""

    name: str
    datatype: str
    shape: list[int]
    data: bytes
    parameters: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_values(cls, name: str, datatype: str, shape: list[int], values: Any) -> KTensor:
        """From a flat list (or nested lists) of numbers or bools; range- and type-checked."""
        dtype = NUMPY.get(datatype)
        if dtype is None:
            raise InvalidArgument(f"{name}: datatype {datatype} cannot be given as JSON numbers")
        array = np.asarray(values)
        kind = array.dtype.kind
        ok = kind == "b" if datatype == "BOOL" else kind in "iu" if dtype.kind in "iu" else kind in "iuf"
        if array.size and not ok:
            raise InvalidArgument(f"{name}: the data does not fit datatype {datatype}")
        if (
            dtype.kind in "iu"
            and array.size
            and (array.min() < np.iinfo(dtype).min or array.max() > np.iinfo(dtype).max)
        ):
            raise InvalidArgument(f"{name}: a value is out of range for {datatype}")
        return cls(name, datatype, shape, array.astype(dtype).tobytes())

    def check(self) -> KTensor:
        """Raise InvalidArgument unless the bytes match the datatype and shape."""
        if any(d < 0 for d in self.shape):
            raise InvalidArgument(f"input {self.name!r}: shape {self.shape} has a negative dimension")
        count = element_count(self.shape)
        if self.datatype == BYTES:
            got = len(unpack_bytes(self.data))
            if got != count:
                raise InvalidArgument(f"input {self.name!r}: shape {self.shape} needs {count} elements, got {got}")
        elif self.datatype in ITEM_SIZE:
            need = count * ITEM_SIZE[self.datatype]
            if need != len(self.data):
                raise InvalidArgument(
                    f"input {self.name!r}: shape {self.shape} needs {need} bytes, got {len(self.data)}"
                )
        else:
            raise InvalidArgument(f"input {self.name!r}: unknown datatype {self.datatype!r}")
        return self

    def values(self) -> list[Any]:
        """The elements, flat, as JSON values (BYTES as UTF-8 strings)."""
        if self.datatype == BYTES:
            return [item.decode("utf-8") for item in unpack_bytes(self.data)]
        return list(np.frombuffer(self.data, dtype=NUMPY[self.datatype]).tolist())


@dataclass
class InferRequest:
    """One KServe inference request, whichever transport it came by."""

    model: str
    version: str = ""
    id: str = ""
    inputs: list[KTensor] = field(default_factory=list)
    #: Requested output names, in order; empty: every output.
    outputs: list[str] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    #: REST only: per requested output, whether it wants binary data; and the default for the rest.
    binary_outputs: dict[str, bool] = field(default_factory=dict)
    binary_default: bool = False


@dataclass
class InferResult:
    model: str
    version: str
    id: str
    outputs: list[KTensor]
    parameters: dict[str, str] = field(default_factory=dict)


def split_rows(tensor: KTensor, rows: int) -> list[bytes]:
    """The raw bytes of each of ``rows`` slices along the first dimension."""
    if tensor.datatype == BYTES:
        items = unpack_bytes(tensor.data)
        per = len(items) // rows
        return [pack_bytes(items[i * per : (i + 1) * per]) for i in range(rows)]
    size = len(tensor.data) // rows
    return [tensor.data[i * size : (i + 1) * size] for i in range(rows)]


# ------------------------------------------------------------------- gRPC
def grpc_parameters(params: Any) -> dict[str, Any]:
    """A ``map<string, InferParameter>`` as plain values."""
    out: dict[str, Any] = {}
    for key, param in params.items():
        choice = param.WhichOneof("parameter_choice")
        out[key] = getattr(param, choice) if choice else None
    return out


def request_from_grpc(msg: Any) -> InferRequest:
    """A ``ModelInferRequest``; input data from ``raw_input_contents`` or the typed contents."""
    if any(len(out.parameters) for out in msg.outputs):
        raise InvalidArgument("requested outputs take no parameters over gRPC (no classification)")
    return InferRequest(
        model=msg.model_name,
        version=msg.model_version,
        id=msg.id,
        inputs=_grpc_inputs(msg),
        outputs=[out.name for out in msg.outputs],
        parameters=grpc_parameters(msg.parameters),
    )


def _grpc_inputs(msg: Any) -> list[KTensor]:
    raw = list(msg.raw_input_contents)
    if raw and len(raw) != len(msg.inputs):
        raise InvalidArgument(f"raw_input_contents holds {len(raw)} entries for {len(msg.inputs)} inputs")
    tensors = []
    for i, inp in enumerate(msg.inputs):
        shape, dt = list(inp.shape), inp.datatype
        if raw:
            data = raw[i]
        elif dt == BYTES:
            data = pack_bytes(list(inp.contents.bytes_contents))
        elif dt in CONTENTS:
            values = list(getattr(inp.contents, CONTENTS[dt]))
            data = KTensor.from_values(inp.name, dt, shape, values).data
        else:
            raise InvalidArgument(f"input {inp.name!r}: {dt} data must come in raw_input_contents")
        params = grpc_parameters(inp.parameters)
        tensors.append(KTensor(inp.name, dt, shape, data, params).check())
    return tensors


def to_grpc_response(res: InferResult) -> Any:
    """A ``ModelInferResponse`` with every output in ``raw_output_contents``, as Triton answers."""
    resp = service_pb2.ModelInferResponse(model_name=res.model, model_version=res.version, id=res.id)
    for key, value in res.parameters.items():
        resp.parameters[key].string_param = value
    for out in res.outputs:
        resp.outputs.add(name=out.name, datatype=out.datatype, shape=out.shape)
        resp.raw_output_contents.append(out.data)
    return resp
