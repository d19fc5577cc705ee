"""The gRPC health service every Loom service registers (services/common/lifecycle.py)."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from services.common.lifecycle import _set_health, add_health

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_UTF8 = b"\n\x02\xff\x88"  # field 1 (service, a string) holding bytes that are not UTF-8


async def test_health_answers_and_refuses_a_malformed_request_as_invalid_argument() -> None:
    server = grpc.aio.server()
    health = health_aio.HealthServicer()
    add_health(server, health)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await _set_health(health, ("loom.v1.Gateway",), serving=True)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            assert (await stub.Check(health_pb2.HealthCheckRequest(service="loom.v1.Gateway"))).status == SERVING
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == SERVING
            watch.cancel()
            try:
                await stub.Check(health_pb2.HealthCheckRequest(service="nope"))
                raise AssertionError("an unknown service name must be NOT_FOUND")
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.NOT_FOUND
            for call in (
                channel.unary_unary("/grpc.health.v1.Health/Check"),
                channel.unary_stream("/grpc.health.v1.Health/Watch"),
            ):
                try:
                    result = call(NOT_UTF8)
                    if isinstance(result, grpc.aio.UnaryStreamCall):
                        await result.read()
                    else:
                        await result
                    raise AssertionError("a malformed request must be refused")
                except grpc.aio.AioRpcError as err:
                    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert "HealthCheckRequest" in (err.details() or "")
    finally:
        await server.stop(0)
