"""Conversions between numpy arrays and the envelope's Tensor message."""

from __future__ import annotations

import numpy as np

from services.common.errors import InvalidArgument
from services.common.pb.loom.v1 import envelope_pb2 as pb

_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "INT8": np.dtype("<i1"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "UINT8": np.dtype("<u1"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_FROM_NUMPY = {dt: name for name, dt in _TO_NUMPY.items()}


def datatype(array: np.ndarray) -> str:
    try:
        return _FROM_NUMPY[array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype]
    except KeyError as exc:
        raise InvalidArgument(f"unsupported tensor dtype {array.dtype}") from exc


def from_numpy(array: np.ndarray) -> pb.Tensor:
    name = datatype(array)
    data = np.ascontiguousarray(array, dtype=_TO_NUMPY[name]).tobytes()
    return pb.Tensor(datatype=name, shape=list(array.shape), data=data)


def to_numpy(tensor: pb.Tensor) -> np.ndarray:
    dtype = _TO_NUMPY.get(tensor.datatype)
    if dtype is None:
        raise InvalidArgument(f"unsupported tensor datatype {tensor.datatype!r}")
    shape = tuple(tensor.shape)
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if expected != len(tensor.data):
        raise InvalidArgument(f"tensor of shape {list(shape)} needs {expected} bytes, got {len(tensor.data)}")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
