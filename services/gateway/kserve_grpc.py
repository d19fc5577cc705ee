"""gRPC adapter for the KServe v2 / Triton ``inference.GRPCInferenceService``.

An unmodified ``tritonclient.grpc`` client can call the gateway as if it were
Triton. Methods take raw bytes (:func:`services.gateway.edges.grpc_unary`, as
:mod:`services.gateway.grpc_api` does), so a malformed message is INVALID_ARGUMENT
with a message; methods Loom does not offer answer UNIMPLEMENTED, saying so.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from tritonclient.grpc import service_pb2

from services.gateway.edges import GrpcCall, grpc_unary
from services.gateway.kserve_dataplane import EXTENSIONS, SERVER_NAME, KServeDataPlane
from services.gateway.kserve_wire import request_from_grpc, to_grpc_response

SERVICE = "inference.GRPCInferenceService"
PROTOCOL = "kserve-grpc"


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

    def _unary(self, name: str, request_type: Any, method: GrpcCall) -> grpc.RpcMethodHandler:
        done = self._record if name == "ModelInfer" else None  # only inference calls are counted
        return grpc_unary(SERVICE, name, request_type, method, done)

    def _record(self, req: Any, code: str, seconds: float) -> None:
        self.plane.core.record(getattr(req, "model_name", ""), code, PROTOCOL, seconds)

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
