"""Triton edge: one long-lived ``tritonclient.grpc.aio`` client and conversions.

Triton's errors are mapped to Loom's here, so nothing else sees a transport
exception.
"""

from __future__ import annotations

import numpy as np
import tritonclient.grpc.aio as triton
from opentelemetry import trace
from opentelemetry.trace import SpanKind
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
from services.common.telemetry import inject

_tracer = trace.get_tracer("loom.inference")

_BY_STATUS: dict[str, type[LoomError]] = {
    "StatusCode.UNAVAILABLE": Unavailable,
    "StatusCode.DEADLINE_EXCEEDED": DeadlineExceeded,
    "StatusCode.INVALID_ARGUMENT": InvalidArgument,
    "StatusCode.NOT_FOUND": NotFound,
    "StatusCode.RESOURCE_EXHAUSTED": ResourceExhausted,
}


def to_loom_error(exc: InferenceServerException, model: str) -> LoomError:
    status = str(exc.status() or "")
    message = exc.message() or str(exc)
    if "unknown model" in message.lower() or "not ready" in message.lower():
        return Unavailable(f"model {model} is not available on Triton")
    cls = _BY_STATUS.get(status)
    if cls is Unavailable:
        return Unavailable(f"Triton is unavailable for model {model}")
    if cls is None:
        return Internal(f"Triton failed on model {model}")
    return cls(f"Triton: {message}")


def to_inputs(tensors: dict[str, np.ndarray]) -> list[triton.InferInput]:
    inputs = []
    for name, array in tensors.items():
        batch = array[np.newaxis, ...]  # one part = a batch of one; Triton batches across parts
        inp = triton.InferInput(name, list(batch.shape), _datatype(batch))
        inp.set_data_from_numpy(batch)
        inputs.append(inp)
    return inputs


def _datatype(array: np.ndarray) -> str:
    return str(np_to_triton_dtype(array.dtype))


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
        self, model: str, tensors: dict[str, np.ndarray], *, timeout_s: float, version: str = ""
    ) -> tuple[dict[str, np.ndarray], str]:
        """Run one request; returns the outputs (batch dim removed) and the model version used."""
        with _tracer.start_as_current_span(
            f"triton infer {model}",
            kind=SpanKind.CLIENT,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": "inference.GRPCInferenceService",
                "rpc.method": "ModelInfer",
                "server.address": self.url,
                "loom.model": model,
            },
        ) as span:
            try:
                result = await self.client.infer(
                    model,
                    to_inputs(tensors),
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
            outputs = {out.name: result.as_numpy(out.name)[0] for out in response.outputs}
            return outputs, response.model_version

    async def ready(self, model: str) -> bool:
        try:
            return bool(await self.client.is_model_ready(model))
        except InferenceServerException:
            return False

    async def close(self) -> None:
        await self.client.close()
