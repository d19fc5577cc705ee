"""Conversions between numpy arrays and the envelope's Tensor message (numeric and KServe BYTES)."""

from __future__ import annotations

import struct
from collections.abc import Sequence

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


BYTES = "BYTES"


def strings_to_tensor(strings: Sequence[str] | np.ndarray, shape: Sequence[int] | None = None) -> pb.Tensor:
    """A BYTES tensor in KServe v2's raw form: per element a 4-byte little-endian length, then UTF-8.

    ``surrogateescape``: bytes that were not UTF-8 on the way in survive the round trip.
    """
    items = [str(s).encode("utf-8", "surrogateescape") for s in np.asarray(strings, dtype=object).ravel()]
    data = b"".join(struct.pack("<I", len(b)) + b for b in items)
    return pb.Tensor(datatype=BYTES, shape=list(shape) if shape is not None else [len(items)], data=data)


def tensor_to_strings(tensor: pb.Tensor) -> list[str]:
    """The strings of a BYTES tensor, flat in row-major order (undecodable bytes become U+FFFD)."""
    if tensor.datatype != BYTES:
        raise InvalidArgument(f"expected a BYTES tensor, got {tensor.datatype!r}")
    return [b.decode("utf-8", "replace") for b in unpack_bytes(tensor)]


def unpack_bytes(tensor: pb.Tensor) -> list[bytes]:
    """The raw elements of a BYTES tensor; malformed data is INVALID_ARGUMENT."""
    data, offset, out = tensor.data, 0, []
    while offset < len(data):
        if offset + 4 > len(data):
            raise InvalidArgument("BYTES tensor data ends inside a length prefix")
        (size,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + size > len(data):
            raise InvalidArgument("BYTES tensor element runs past the end of the data")
        out.append(data[offset : offset + size])
        offset += size
    if len(out) != int(np.prod(tensor.shape, dtype=np.int64)):
        raise InvalidArgument(f"BYTES tensor of shape {list(tensor.shape)} holds {len(out)} elements")
    return out
