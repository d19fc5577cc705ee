"""gRPC adapter for ``loom.v1.Gateway``.

The method takes raw bytes (:func:`services.gateway.edges.grpc_unary`), so a
malformed message becomes INVALID_ARGUMENT with a message, not gRPC's generic
INTERNAL.
"""

from __future__ import annotations

from typing import Any

import grpc

from services.common.errors import Unavailable
from services.common.pb.loom.v1 import gateway_pb2
from services.gateway import convert
from services.gateway.core import ROUTE_KEY, GatewayCore
from services.gateway.durable import DurableFront
from services.gateway.edges import grpc_unary

SERVICE = "loom.v1.Gateway"


def metadata_value(context: grpc.aio.ServicerContext, key: str) -> str:
    """One text value of the call's metadata (keys are lower case on the wire); "" when absent."""
    for k, v in context.invocation_metadata() or ():
        if k == key and isinstance(v, str):
            return v
    return ""


class GatewayGrpc:
    def __init__(self, core: GatewayCore, lane: DurableFront | None = None) -> None:
        self.core = core
        self.lane = lane

    async def predict(self, req: gateway_pb2.PredictRequest, context: grpc.aio.ServicerContext) -> Any:
        call = convert.call_from_proto(req, context.time_remaining())
        call.route_key = metadata_value(context, ROUTE_KEY)
        return await self.core.predict(call)

    async def submit(self, req: gateway_pb2.SubmitRequest, context: grpc.aio.ServicerContext) -> Any:
        if self.lane is None:
            raise Unavailable("this gateway runs without the durable lane (LOOM_DURABLE=false)")
        call = convert.call_from_proto(req.request, None)
        call.route_key = metadata_value(context, ROUTE_KEY)
        return await self.lane.submit(call, req.idempotency_key)

    async def get_result(self, req: gateway_pb2.GetResultRequest, context: grpc.aio.ServicerContext) -> Any:
        if self.lane is None:
            raise Unavailable("this gateway runs without the durable lane (LOOM_DURABLE=false)")
        return await self.lane.get_result(req.request_id)

    def _done(self, req: gateway_pb2.PredictRequest | None, code: str, seconds: float) -> None:
        self.core.record(req.pipeline if req is not None else "", code, "grpc", seconds)

    def handler(self) -> grpc.GenericRpcHandler:
        predict = grpc_unary(SERVICE, "Predict", gateway_pb2.PredictRequest, self.predict, self._done)
        submit = grpc_unary(SERVICE, "Submit", gateway_pb2.SubmitRequest, self.submit)
        result = grpc_unary(SERVICE, "GetResult", gateway_pb2.GetResultRequest, self.get_result)
        return grpc.method_handlers_generic_handler(
            SERVICE, {"Predict": predict, "Submit": submit, "GetResult": result}
        )
