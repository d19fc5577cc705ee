"""The gateway as a stage: its duration histogram, ``_unknown`` for junk pipeline names, and
UNAVAILABLE "gateway not ready" on every data-plane call until it is ready (HTTP and gRPC,
wired as the service wires them; no NATS: a pipeline registry that is still empty, as at start)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from prometheus_client import REGISTRY

from services.common.access import HttpHandler as Handler
from services.common.bus import Bus
from services.common.errors import DeadlineExceeded, NotFound
from services.common.lifecycle import Runtime, _base_app
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.pb.loom.v1 import fusion_pb2, gateway_pb2
from services.common.pipelines import PipelineRegistry
from services.gateway.core import GatewayCore, PredictCall
from services.gateway.service import Gateway
from services.gateway.settings import GatewaySettings

pytestmark = pytest.mark.unit


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _core() -> tuple[GatewayCore, list[pb.TelemetryEvent]]:
    core = GatewayCore(Bus("gateway"), GatewaySettings(), PipelineRegistry())
    events: list[pb.TelemetryEvent] = []

    def capture(subject: str, payload: bytes, headers: dict[str, str] | None = None) -> bool:
        events.append(pb.TelemetryEvent.FromString(payload))
        return True

    core.bus.publish_nowait = capture  # type: ignore[method-assign]
    return core, events


def _duration_count(pipeline: str, model: str = "", version: str = "") -> float:
    labels = {"service": "gateway", "stage": "gateway", "pipeline": pipeline, "model": model, "version": version}
    return _sample("loom_stage_duration_seconds_count", **labels)


async def test_a_call_for_a_pipeline_that_does_not_exist_is_reported_as_unknown() -> None:
    core, events = _core()
    before = _duration_count("_unknown")
    with pytest.raises(NotFound):
        await core.predict(PredictCall("drop table pipelines;", {"text": "hi"}))
    [event] = events
    assert event.pipeline == "_unknown" and event.code == "NOT_FOUND"
    assert _duration_count("_unknown") == before + 1


async def test_an_answered_call_is_timed_with_the_models_that_answered_it() -> None:
    core, events = _core()
    fused = fusion_pb2.FusedResult()
    text = fused.response.outputs["text"].text
    text.model, text.model_version = "minilm", "3"

    async def answer(request_id: str, parts: list[pb.Part], timeout_ms: int) -> bytes:
        return fused.SerializeToString()

    core._publish_and_wait = answer  # type: ignore[method-assign]
    before = _duration_count("embed", "minilm", "3")
    response = await core.predict(PredictCall("embed", {"text": "hi"}))
    assert response.pipeline == "embed"
    assert _duration_count("embed", "minilm", "3") == before + 1
    assert [(e.pipeline, e.model, e.model_version) for e in events] == [("embed", "minilm", "3")]


async def test_a_call_whose_deadline_has_already_passed_is_refused_unworked_and_counted_as_a_drop() -> None:
    core, _ = _core()
    labels = {"service": "gateway", "stage": "gateway"}
    before = _sample("loom_deadline_drops_total", **labels)
    with pytest.raises(DeadlineExceeded):
        await core.predict(PredictCall("embed", {"text": "hi"}, transport_remaining_s=0.0))
    assert _sample("loom_deadline_drops_total", **labels) == before + 1


# --- not ready -----------------------------------------------------------------------------------


@pytest.fixture
def wired() -> tuple[Gateway, Runtime]:
    settings = GatewaySettings()
    rt = Runtime.create("gateway", settings)
    gateway = Gateway(settings)
    gateway.bind(rt)  # rt.pipelines is empty until the store loads: NOT_FOUND for every pipeline
    return gateway, rt


@web.middleware
async def _anyone(request: web.Request, handler: Handler) -> web.StreamResponse:
    return await handler(request)  # the runtime's authentication stands here


@pytest.fixture
async def http(wired: tuple[Gateway, Runtime]) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    gateway, rt = wired
    async with TestClient(TestServer(_base_app(rt, gateway, _anyone))) as client:
        yield client


async def test_http_calls_before_the_gateway_is_ready_are_503_not_ready_never_404(
    wired: tuple[Gateway, Runtime], http: TestClient[web.Request, web.Application]
) -> None:
    _, rt = wired
    calls = [
        ("POST", "/v1/pipelines/embed:predict", {"inputs": {"text": "hi"}}),
        ("POST", "/v1/pipelines/embed:submit", {"inputs": {"text": "hi"}}),
        ("GET", "/v1/results/r-1", None),
        ("GET", "/v1/pipelines/embed", None),
    ]
    for method, path, body in calls:
        resp = await http.request(method, path, json=body)
        doc = await resp.json()
        assert resp.status == 503 and resp.headers["Retry-After"] == "1", (path, doc)
        assert doc["error"]["code"] == "UNAVAILABLE" and "gateway not ready" in doc["error"]["message"], doc
    resp = await http.post("/v2/models/minilm/infer", json={"inputs": []})
    assert resp.status == 503 and "gateway not ready" in (await resp.json())["error"]  # KServe's shape
    for path in ("/healthz", "/metrics"):
        assert (await http.get(path)).status == 200
    assert (await http.get("/readyz")).status == 503  # says so itself, as before

    rt.ready.set()  # from now on the handlers answer; the registry is still empty here, so: NOT_FOUND
    resp = await http.get("/v1/pipelines/embed")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "NOT_FOUND"


async def test_grpc_calls_before_the_gateway_is_ready_are_unavailable_never_not_found(
    wired: tuple[Gateway, Runtime],
) -> None:
    gateway, rt = wired
    server = grpc.aio.server(interceptors=gateway.grpc_interceptors())
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    gateway.add_grpc(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    request = gateway_pb2.PredictRequest(pipeline="embed")
    request.inputs["text"].text = "hi"
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            predict = channel.unary_unary(
                "/loom.v1.Gateway/Predict",
                request_serializer=gateway_pb2.PredictRequest.SerializeToString,
                response_deserializer=gateway_pb2.PredictResponse.FromString,
            )
            result = channel.unary_unary(
                "/loom.v1.Gateway/GetResult",
                request_serializer=gateway_pb2.GetResultRequest.SerializeToString,
                response_deserializer=gateway_pb2.Result.FromString,
            )
            for call, message in ((predict, request), (result, gateway_pb2.GetResultRequest(request_id="r-1"))):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call(message, timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
                assert "gateway not ready" in (err.value.details() or "")
            check = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert check is not None  # health checks pass through

            rt.ready.set()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await predict(request, timeout=5)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND  # the handler's own answer, once ready
    finally:
        await server.stop(None)
