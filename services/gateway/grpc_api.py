"""gRPC adapter for ``loom.v1.Gateway``.

The method takes raw bytes (:func:`services.gateway.edges.grpc_unary`), so a
malformed message becomes INVALID_ARGUMENT with a message, not gRPC's generic
INTERNAL.
"""

from __future__ import annotations

from typing import Any

import grpc

from services.common.pb.loom.v1 import gateway_pb2
from services.gateway import convert
from services.gateway.core import ROUTE_KEY, GatewayCore
from services.gateway.edges import grpc_unary

SERVICE = "loom.v1.Gateway"


def metadata_value(context: grpc.aio.ServicerContext, key: str) -> str:
    """One text value of the call's metadata (keys are lower case on the wire); "" when absent."""
    for k, v in context.invocation_metadata() or ():
        if k == key and isinstance(v, str):
            return v
    return ""


class GatewayGrpc:
    def __init__(self, core: GatewayCore) -> None:
        self.core = core

    async def predict(self, req: gateway_pb2.PredictRequest, context: grpc.aio.ServicerContext) -> Any:
        call = convert.call_from_proto(req, context.time_remaining())
        call.route_key = metadata_value(context, ROUTE_KEY)
        return await self.core.predict(call)

    def _done(self, req: gateway_pb2.PredictRequest | None, code: str, seconds: float) -> None:
        self.core.record(req.pipeline if req is not None else "", code, "grpc", seconds)

    def handler(self) -> grpc.GenericRpcHandler:
        predict = grpc_unary(SERVICE, "Predict", gateway_pb2.PredictRequest, self.predict, self._done)
        return grpc.method_handlers_generic_handler(SERVICE, {"Predict": predict})
