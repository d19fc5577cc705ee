"""gRPC adapter for the KServe v2 / Triton ``inference.GRPCInferenceService``.

An unmodified ``tritonclient.grpc`` client can call the gateway as if it were
Triton. Methods are registered with raw-bytes deserializers (as in
:mod:`services.gateway.grpc_api`), so a malformed message is INVALID_ARGUMENT
with a message; methods Loom does not offer answer UNIMPLEMENTED, saying so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from tritonclient.grpc import service_pb2

from services.common.errors import InvalidArgument, LoomError, as_loom_error, grpc_status
from services.common.telemetry import extract
from services.gateway.kserve_dataplane import EXTENSIONS, SERVER_NAME, KServeDataPlane
from services.gateway.kserve_wire import request_from_grpc, to_grpc_response

SERVICE = "inference.GRPCInferenceService"
PROTOCOL = "kserve-grpc"
_tracer = trace.get_tracer("loom.gateway")
log = logging.getLogger(__name__)

Method = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


class KServeGrpc:
    def __init__(self, plane: KServeDataPlane) -> None:
        self.plane = plane

    async def server_live(self, _: Any, __: grpc.aio.ServicerContext) -> Any:
        return service_pb2.ServerLiveResponse(live=True)

    async def server_ready(self, _: Any, __: grpc.aio.ServicerContext) -> Any:
        return service_pb2.ServerReadyResponse(ready=self.plane.is_ready())

    async def server_metadata(self, _: Any, __: grpc.aio.ServicerContext) -> Any:
        return service_pb2.ServerMetadataResponse(name=SERVER_NAME, version=self.plane.version, extensions=EXTENSIONS)

    async def model_ready(self, req: Any, _: grpc.aio.ServicerContext) -> Any:
        return service_pb2.ModelReadyResponse(ready=await self.plane.model_ready(req.name, req.version))

    async def model_metadata(self, req: Any, _: grpc.aio.ServicerContext) -> Any:
        return await self.plane.model_metadata(req.name, req.version)

    async def model_infer(self, req: Any, context: grpc.aio.ServicerContext) -> Any:
        return to_grpc_response(await self.plane.infer(request_from_grpc(req), context.time_remaining()))

    async def repository_index(self, req: Any, _: grpc.aio.ServicerContext) -> Any:
        resp = service_pb2.RepositoryIndexResponse()
        for name, version, state, reason in await self.plane.repository_index():
            if not req.ready or state == "READY":
                resp.models.add(name=name, version=version, state=state, reason=reason)
        return resp

    def _unary(self, name: str, request_type: Any, method: Method) -> grpc.RpcMethodHandler:
        async def call(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
            carrier = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
            started, code, model = time.perf_counter(), "OK", ""
            with _tracer.start_as_current_span(
                f"{SERVICE}/{name}",
                context=extract(carrier),
                kind=SpanKind.SERVER,
                attributes={"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": name},
            ) as span:
                try:
                    try:
                        req = request_type.FromString(raw)
                    except DecodeError:
                        raise InvalidArgument(f"malformed inference.{request_type.__name__}") from None
                    model = getattr(req, "model_name", "")
                    resp = await method(req, context)
                    return bytes(resp.SerializeToString())
                except Exception as exc:
                    err = as_loom_error(exc)
                    code = str(err.code)
                    span.set_attribute("rpc.grpc.status_code", grpc_status(err).value[0])
                    if not isinstance(exc, LoomError):
                        span.record_exception(exc)
                        log.exception("KServe gRPC %s failed", name)
                    await context.abort(grpc_status(err), err.message)
                    raise  # abort raises; this keeps type checkers content
                finally:
                    if name == "ModelInfer":
                        self.plane.core.record(model, code, PROTOCOL, time.perf_counter() - started)

        return grpc.unary_unary_rpc_method_handler(call, request_deserializer=None, response_serializer=None)

    def handler(self) -> grpc.GenericRpcHandler:
        methods = {
            "ServerLive": self._unary("ServerLive", service_pb2.ServerLiveRequest, self.server_live),
            "ServerReady": self._unary("ServerReady", service_pb2.ServerReadyRequest, self.server_ready),
            "ServerMetadata": self._unary("ServerMetadata", service_pb2.ServerMetadataRequest, self.server_metadata),
            "ModelReady": self._unary("ModelReady", service_pb2.ModelReadyRequest, self.model_ready),
            "ModelMetadata": self._unary("ModelMetadata", service_pb2.ModelMetadataRequest, self.model_metadata),
            "ModelInfer": self._unary("ModelInfer", service_pb2.ModelInferRequest, self.model_infer),
            "RepositoryIndex": self._unary(
                "RepositoryIndex", service_pb2.RepositoryIndexRequest, self.repository_index
            ),
        }
        for method in service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
            if method.name not in methods:
                methods[method.name] = _unimplemented(method.name, streaming=method.client_streaming)
        return grpc.method_handlers_generic_handler(SERVICE, methods)


def _unimplemented(name: str, *, streaming: bool) -> grpc.RpcMethodHandler:
    message = (
        f"Loom's KServe v2 front door does not offer {name}; it offers ServerLive, ServerReady, "
        "ServerMetadata, ModelReady, ModelMetadata, ModelInfer and RepositoryIndex"
    )

    async def unary(_: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)
        raise AssertionError("unreachable")

    async def stream(_: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)
        yield b""  # never reached: makes this an async generator, as a streaming handler must be

    if streaming:
        return grpc.stream_stream_rpc_method_handler(stream, request_deserializer=None, response_serializer=None)
    return grpc.unary_unary_rpc_method_handler(unary, request_deserializer=None, response_serializer=None)
