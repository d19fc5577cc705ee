"""gRPC adapter for ``loom.v1.Gateway``.

The method is registered with a raw-bytes deserializer so that a malformed
message becomes INVALID_ARGUMENT with a message, not gRPC's generic INTERNAL.
"""

from __future__ import annotations

import time

import grpc
from google.protobuf.message import DecodeError
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from services.common.errors import InvalidArgument, LoomError, as_loom_error, grpc_status
from services.common.pb.loom.v1 import gateway_pb2
from services.common.telemetry import extract
from services.gateway import convert
from services.gateway.core import GatewayCore

SERVICE = "loom.v1.Gateway"
_tracer = trace.get_tracer("loom.gateway")


class GatewayGrpc:
    def __init__(self, core: GatewayCore) -> None:
        self.core = core

    async def predict(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        carrier = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        started = time.perf_counter()
        pipeline, code = "", "OK"
        with _tracer.start_as_current_span(
            f"{SERVICE}/Predict",
            context=extract(carrier),
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": "Predict"},
        ) as span:
            try:
                try:
                    req = gateway_pb2.PredictRequest.FromString(raw)
                except DecodeError:
                    raise InvalidArgument("malformed loom.v1.PredictRequest") from None
                pipeline = req.pipeline
                resp = await self.core.predict(convert.call_from_proto(req, context.time_remaining()))
                return resp.SerializeToString()
            except Exception as exc:
                err = as_loom_error(exc)
                code = str(err.code)
                span.set_attribute("rpc.grpc.status_code", grpc_status(err).value[0])
                if not isinstance(exc, LoomError):
                    span.record_exception(exc)
                await context.abort(grpc_status(err), err.message)
                raise  # abort raises; this keeps type checkers content
            finally:
                self.core.record(pipeline, code, "grpc", time.perf_counter() - started)

    def handler(self) -> grpc.GenericRpcHandler:
        method = grpc.unary_unary_rpc_method_handler(self.predict, request_deserializer=None, response_serializer=None)
        return grpc.method_handlers_generic_handler(SERVICE, {"Predict": method})
