"""Triton edge: one long-lived ``tritonclient.grpc.aio`` client and conversions.

Triton's errors are mapped to Loom's here, so nothing else sees a transport
exception. BYTES tensors travel in a Part in the KServe v2 raw form
(:func:`services.common.tensors.strings_to_tensor`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import tritonclient.grpc.aio as triton
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from services.common.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    LoomError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.telemetry import inject
from services.common.tensors import BYTES, from_numpy, strings_to_tensor, to_numpy, unpack_bytes

_tracer = trace.get_tracer("loom.inference")

#: One item's outputs by name; BYTES outputs are object arrays of ``str``.
Outputs = dict[str, np.ndarray]

_BY_STATUS: dict[str, type[LoomError]] = {
    "StatusCode.UNAVAILABLE": Unavailable,
    "StatusCode.DEADLINE_EXCEEDED": DeadlineExceeded,
    "StatusCode.INVALID_ARGUMENT": InvalidArgument,
    "StatusCode.NOT_FOUND": NotFound,
    "StatusCode.RESOURCE_EXHAUSTED": ResourceExhausted,
}


class TritonUnreachable(Unavailable):
    """Triton did not answer (refused, reset, gone) or said UNAVAILABLE: transient, an idempotent call may retry."""


class ModelNotReady(Unavailable):
    """Triton answered: the model (version) is not loaded, not ready or unknown; a retry would meet the same."""


def to_loom_error(exc: InferenceServerException, model: str) -> LoomError:
    status = str(exc.status() or "")
    message = exc.message() or str(exc)
    if "unknown model" in message.lower() or "not ready" in message.lower():
        return ModelNotReady(f"model {model} is not available on Triton")
    cls = _BY_STATUS.get(status)
    if cls is Unavailable:
        return TritonUnreachable(f"Triton is unavailable for model {model}")
    if cls is None:
        return Internal(f"Triton failed on model {model}")
    return cls(f"Triton: {message}")


def from_tensor(tensor: pb.Tensor) -> np.ndarray:
    """A Part tensor as an input array; BYTES become an object array of ``bytes``."""
    if tensor.datatype == BYTES:
        return np.array(unpack_bytes(tensor), dtype=object).reshape(tuple(tensor.shape))
    return to_numpy(tensor)


def to_tensor(array: np.ndarray) -> pb.Tensor:
    """An output array as a Part tensor; object arrays (BYTES) keep their shape."""
    if array.dtype == np.object_:
        return strings_to_tensor(array, array.shape)
    return from_numpy(array)


def to_inputs(tensors: dict[str, np.ndarray], *, add_batch_dim: bool = True) -> list[triton.InferInput]:
    """Triton inputs; by default one part = a batch of one (Triton batches across requests)."""
    inputs = []
    for name, array in tensors.items():
        data = array[np.newaxis, ...] if add_batch_dim else array
        inp = triton.InferInput(name, list(data.shape), str(np_to_triton_dtype(data.dtype)))
        inp.set_data_from_numpy(data)
        inputs.append(inp)
    return inputs


def _decoded(array: np.ndarray) -> np.ndarray:
    # surrogateescape: bytes that are not UTF-8 survive the trip back in strings_to_tensor.
    flat = [b.decode("utf-8", "surrogateescape") if isinstance(b, bytes) else str(b) for b in array.ravel()]
    return np.array(flat, dtype=object).reshape(array.shape)


@dataclass(frozen=True)
class ModelInfo:
    """What the inference service needs to know about a model served by Triton."""

    max_batch_size: int  # Triton's; 0 = the model takes no batch dimension
    version: str  # the highest ready version; "" when none is ready


class TritonModels:
    """The inference service's client to Triton."""

    def __init__(self, url: str, *, reconnect_backoff_ms: int = 1000) -> None:
        self.url = url
        # Fail fast while Triton is down, and come back soon after it returns:
        # gRPC's default reconnect backoff grows to two minutes.
        self.client = triton.InferenceServerClient(
            url,
            channel_args=[
                ("grpc.max_reconnect_backoff_ms", reconnect_backoff_ms),
                ("grpc.initial_reconnect_backoff_ms", min(200, reconnect_backoff_ms)),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ],
        )

    async def infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        *,
        batched: bool,
        timeout_s: float,
        version: str = "",
        links: Sequence[Link] = (),
    ) -> tuple[list[Outputs], str]:
        """Run one request; returns one output dict per row and the model version used.

        ``batched``: the inputs carry a batch dimension (rows); otherwise they
        are one item and the result is a list of one.
        """
        rows = next(iter(inputs.values())).shape[0] if batched and inputs else 1
        attrs: dict[str, str | int] = {
            "rpc.system": "grpc",
            "rpc.service": "inference.GRPCInferenceService",
            "rpc.method": "ModelInfer",
            "server.address": self.url,
            "loom.model": model,
            "loom.batch_size": rows,
        }
        # One span per Triton call; the other parts of the batch are linked to it.
        with _tracer.start_as_current_span(
            f"triton infer {model}", kind=SpanKind.CLIENT, attributes=attrs, links=links
        ) as span:
            try:
                result = await self.client.infer(
                    model,
                    to_inputs(inputs, add_batch_dim=False),
                    model_version=version,
                    client_timeout=max(timeout_s, 0.001),
                    headers=inject({}),
                )
            except InferenceServerException as exc:
                err = to_loom_error(exc, model)
                span.set_attribute("error.type", str(err.code))
                raise err from None
            response = result.get_response()
            span.set_attribute("loom.model_version", response.model_version)
            outputs: Outputs = {}
            for out in response.outputs:
                array = result.as_numpy(out.name)
                outputs[out.name] = _decoded(array) if out.datatype == BYTES else array
            if not batched:
                return [outputs], response.model_version
            if any(a.ndim == 0 or a.shape[0] != rows for a in outputs.values()):
                raise Internal(f"Triton returned outputs without {rows} rows for model {model}")
            return [{name: a[i] for name, a in outputs.items()} for i in range(rows)], response.model_version

    async def model_info(self, model: str, *, timeout_s: float = 2.0) -> ModelInfo:
        """Triton's max_batch_size for ``model`` and its highest ready version."""
        try:
            response = await self.client.get_model_config(model, as_json=False, client_timeout=timeout_s)
        except InferenceServerException as exc:
            raise to_loom_error(exc, model) from None
        versions = await self.ready_versions(model, timeout_s=timeout_s)
        return ModelInfo(int(response.config.max_batch_size), versions[-1] if versions else "")

    async def metadata(self, model: str, version: str = "", *, timeout_s: float = 5.0) -> Any:
        """Triton's ``inference.ModelMetadataResponse`` for ``model``."""
        try:
            return await self.client.get_model_metadata(
                model, model_version=version, as_json=False, client_timeout=timeout_s
            )
        except InferenceServerException as exc:
            raise to_loom_error(exc, model) from None

    async def ready(self, model: str, version: str = "", *, timeout_s: float = 5.0) -> bool:
        try:
            return bool(await self.client.is_model_ready(model, model_version=version, client_timeout=timeout_s))
        except InferenceServerException:
            return False

    async def ready_response(self, model: str, version: str = "") -> bytes:
        """A serialized ``inference.ModelReadyResponse``."""
        ready = await self.ready(model, version)
        return cast(bytes, service_pb2.ModelReadyResponse(ready=ready).SerializeToString())

    async def ready_versions(self, model: str, *, timeout_s: float = 5.0) -> list[str]:
        """The versions of ``model`` Triton has ready, lowest first; [] when none (or Triton is away)."""
        try:
            meta = await self.metadata(model, timeout_s=timeout_s)
        except LoomError:
            return []
        versions = sorted(meta.versions, key=lambda v: (len(v), v))  # numeric order without int()
        ready = await asyncio.gather(*(self.ready(model, v, timeout_s=timeout_s) for v in versions))
        return [v for v, ok in zip(versions, ready, strict=True) if ok]

    async def load_versions(self, model: str, versions: Sequence[str], *, timeout_s: float) -> list[str]:
        """Make Triton serve exactly ``versions`` of ``model``; returns them once all are ready.

        Triton (explicit model control) loads the model with its current config
        and ``version_policy`` replaced. Learned by test: a load brings up new
        instances of every listed version beside the old ones and switches
        over only when all are ready, so versions that stay keep answering; a
        load that fails changes nothing (the old versions serve on); a listed
        version with no folder in the repository is skipped without an error,
        which is why the ready set is checked here.
        """
        wanted = sorted(set(versions), key=int)
        deadline = time.monotonic() + timeout_s
        config = await self._config(model, deadline)
        config["version_policy"] = {"specific": {"versions": [int(v) for v in wanted]}}
        try:
            await self.client.load_model(
                model, config=json.dumps(config), client_timeout=max(deadline - time.monotonic(), 0.001)
            )
        except InferenceServerException as exc:
            raise _load_error(exc, model, wanted, timeout_s) from None
        # The load returns when it is done; a short wait covers a slow readiness report.
        settle = min(deadline, time.monotonic() + 5.0)
        while True:
            ready = await self.ready_versions(model, timeout_s=max(1.0, min(5.0, deadline - time.monotonic())))
            if ready == wanted or time.monotonic() >= settle:
                break
            await asyncio.sleep(0.1)
        if ready != wanted:
            missing = ", ".join(v for v in wanted if v not in ready) or "none"
            raise InvalidArgument(
                f"Triton loaded {model} but serves versions [{', '.join(ready)}], not [{', '.join(wanted)}]; "
                f"missing: {missing} (is there a folder {model}/<version> in Triton's model repository?)"
            )
        return ready

    async def _config(self, model: str, deadline: float) -> dict[str, Any]:
        """The model's current config as JSON; a model Triton has not loaded is loaded from the repository first."""
        for attempt in range(2):
            try:
                answer = await self.client.get_model_config(
                    model, as_json=True, client_timeout=max(deadline - time.monotonic(), 0.001)
                )
                return cast(dict[str, Any], answer["config"])
            except InferenceServerException as exc:
                if attempt or "StatusCode.NOT_FOUND" not in str(exc.status()):
                    raise _load_error(exc, model, [], deadline - time.monotonic()) from None
            try:  # not loaded (explicit mode): its config comes with loading it as the repository says
                await self.client.load_model(model, client_timeout=max(deadline - time.monotonic(), 0.001))
            except InferenceServerException as exc:
                raise _load_error(exc, model, [], deadline - time.monotonic()) from None
        raise Internal(f"no config for model {model}")  # unreachable: the loop returns or raises

    async def close(self) -> None:
        await self.client.close()


def one_line(text: str, limit: int = 1000) -> str:
    """Triton's messages carry python tracebacks: one line, bounded (a NATS header takes no newline)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _load_error(exc: InferenceServerException, model: str, versions: Sequence[str], timeout_s: float) -> LoomError:
    status = str(exc.status() or "")
    what = f"{model} versions [{', '.join(versions)}]" if versions else model
    if status == "StatusCode.UNAVAILABLE":
        return Unavailable(f"Triton is unavailable: cannot load {what}")
    if status == "StatusCode.DEADLINE_EXCEEDED":
        return Unavailable(f"Triton did not finish loading {what} within {max(timeout_s, 0):.0f}s")
    return InvalidArgument(f"Triton could not load {what}: {one_line(exc.message() or str(exc))}")
