"""Admission control: which calls are limited, the in-flight pool, tenant rates, and both adapters.

Also the stages' half of overload protection: a bounded subscription queue, and work past
its deadline dropped before its handler runs.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import grpc
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pydantic import ValidationError

from services.common import access as common_access
from services.common import auth, envelope, metrics
from services.common.access import FailureAudit, Gate
from services.common.auth import Authenticator, KeyRecord, KeyStore, Role, generate_api_key, hash_key
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.pb.loom.v1 import gateway_pb2
from services.common.settings import STAGE_QUEUE, CommonSettings
from services.common.stage import StageRunner
from services.gateway.access import TABLE
from services.gateway.admission import (
    Admission,
    AdmissionInterceptor,
    Lane,
    Overloaded,
    Pool,
    TenantRates,
    grpc_lane,
    http_lane,
    http_middleware,
)
from services.gateway.edges import grpc_unary
from services.gateway.http_api import OPENAPI
from services.gateway.settings import GatewaySettings

pytestmark = pytest.mark.unit

KSERVE = "/inference.GRPCInferenceService/"


def rejected(reason: str, tenant: str) -> float:
    return float(metrics.ADMISSION_REJECTED.labels(reason, tenant)._value.get())


# --- what is limited -------------------------------------------------------------------------------


def test_the_data_plane_is_limited_health_and_metrics_never_and_admin_apart() -> None:
    data_http = [
        ("POST", "/v1/pipelines/{pipeline}:predict"),
        ("POST", "/v1/feedback"),
        ("POST", "/v2/models/{model}/infer"),
        ("POST", "/v2/models/{model}/versions/{version}/infer"),
        ("GET", "/v2/models/{model}"),
    ]
    data_grpc = ["/loom.v1.Gateway/Predict", KSERVE + "ModelInfer", KSERVE + "ModelMetadata"]
    assert all(http_lane(method, route) is Lane.DATA for method, route in data_http)
    assert all(grpc_lane(name) is Lane.DATA for name in data_grpc)
    free_http = ["/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready", "/v2/models/{model}/ready"]
    assert all(http_lane("GET", route) is Lane.FREE for route in free_http)
    assert all(grpc_lane(m) is Lane.FREE for m in ("/grpc.health.v1.Health/Check", KSERVE + "ServerReady"))
    assert http_lane("GET", "/v1/admin/models") is Lane.CONTROL
    assert http_lane("PUT", "/v1/pipelines/{pipeline}") is Lane.CONTROL
    assert http_lane("POST", "/v1/admin/models/{model}/rollout") is Lane.CONTROL  # unlisted: admin
    assert grpc_lane("/loom.v1.Admin/SetTraffic") is Lane.CONTROL


def test_the_durable_lane_routes_are_data_plane() -> None:
    """They are the data plane only if the role table gives them the role predict (unlisted: admin)."""
    for method, route in (("POST", "/v1/pipelines/{pipeline}:submit"), ("GET", "/v1/results/{request_id}")):
        assert http_lane(method, route) is Lane.DATA, f"{method} {route} needs PREDICT in services/gateway/access.py"
    for name in ("/loom.v1.Gateway/Submit", "/loom.v1.Gateway/GetResult"):
        assert grpc_lane(name) is Lane.DATA, f"{name} needs PREDICT in services/gateway/access.py"


def test_the_openapi_document_gives_each_data_plane_operation_its_429() -> None:
    doc = yaml.safe_load(OPENAPI.read_text())
    responses = doc["components"]["responses"]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if method == "parameters":
                continue
            documented = op["responses"].get("429")
            if http_lane(method.upper(), path) is not Lane.DATA:
                assert documented is None, (method, path)
                continue
            assert documented is not None, f"{method} {path}: a data-plane operation needs its 429"
            name = documented["$ref"].rsplit("/", 1)[1]
            assert name == ("KServeOverloaded" if path.startswith("/v2") else "Overloaded"), (method, path)
            assert responses[name]["headers"]["Retry-After"]["schema"]["type"] == "integer"


# --- the pure decisions ----------------------------------------------------------------------------


def test_a_full_pool_refuses_at_once_and_spends_no_rate() -> None:
    pool = Pool(2)
    assert pool.take() and pool.take() and pool.full and not pool.take()
    pool.give()
    assert not pool.full and pool.inflight == 1

    async def run() -> None:
        admission = Admission(max_inflight=1, admin_max_inflight=1, rates=TenantRates("", {"t1": "1/minute"}))
        before = rejected("inflight", "t1")
        slot = await admission.enter(Lane.DATA, "t1")  # spends t1's one call a minute
        with pytest.raises(Overloaded) as err:
            await admission.enter(Lane.DATA, "t2")
        assert err.value.reason == "inflight" and err.value.retry_after == 1 and err.value.pushback_ms == 1000
        assert err.value.code == "RESOURCE_EXHAUSTED" and "limit of 1 requests in flight" in err.value.message
        assert ("retry-after", "1") in err.value.trailers()
        with pytest.raises(Overloaded):
            await admission.enter(Lane.DATA, "t1")
        assert rejected("inflight", "t1") == before + 1
        await admission.enter(Lane.CONTROL, "t1")  # a pool of its own
        with pytest.raises(Overloaded) as err:
            await admission.enter(Lane.CONTROL, "t1")
        assert err.value.reason == "admin_inflight"
        slot.give()
        with pytest.raises(Overloaded) as err:  # room again, but t1's minute is spent
            await admission.enter(Lane.DATA, "t1")
        assert err.value.reason == "rate" and 1 <= err.value.retry_after <= 60
        assert "tenant 't1' is over its rate limit (1 per 1 minute)" in err.value.message
        assert admission.pools[Lane.DATA].inflight == 0

    asyncio.run(run())


def test_tenant_rates_default_overrides_and_no_limit() -> None:
    async def run() -> None:
        rates = TenantRates("3/minute", {"big": "", "small": "1/minute; 100/hour"})
        assert [await rates.take("acme") for _ in range(3)] == [None, None, None]
        wait = await rates.take("acme")
        assert wait is not None and 0 < wait <= 60
        assert await rates.take("other") is None  # each tenant its own window
        assert all([await rates.take("big") is None for _ in range(50)])
        assert await rates.take("small") is None
        assert await rates.take("small") is not None

    asyncio.run(run())


def test_settings_read_the_environment_and_refuse_bad_rates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOM_GATEWAY_MAX_INFLIGHT", "8")
    monkeypatch.setenv("LOOM_GATEWAY_TENANT_RATES", '{"acme": "50/second"}')
    settings = GatewaySettings()
    assert settings.request_max_inflight == 8 and settings.max_inflight == 256  # LOOM_MAX_INFLIGHT is another knob
    assert settings.tenant_rates == {"acme": "50/second"} and settings.tenant_rate == "1000/second"
    assert CommonSettings().stage_queue == STAGE_QUEUE == 2048
    monkeypatch.setenv("LOOM_GATEWAY_TENANT_RATES", '{"acme": "fifty a second"}')
    with pytest.raises(ValidationError, match="acme"):
        GatewaySettings()
    monkeypatch.delenv("LOOM_GATEWAY_TENANT_RATES")
    monkeypatch.setenv("LOOM_GATEWAY_TENANT_RATE", "lots")
    with pytest.raises(ValidationError):
        GatewaySettings()


# --- the adapters, behind the real authentication ---------------------------------------------------


class FakeAudit:
    async def append(self, action: str, **fields: Any) -> int:
        return 0


def keys() -> tuple[Gate, str, str]:
    """A gate knowing a key of tenant "acme" and one of tenant "slow"."""
    acme, slow = generate_api_key(), generate_api_key()
    store = KeyStore(
        [
            KeyRecord(id="a", sha256=hash_key(acme), roles=frozenset({Role.PREDICT, Role.VIEWER}), tenant="acme"),
            KeyRecord(id="s", sha256=hash_key(slow), roles=frozenset({Role.PREDICT}), tenant="slow"),
        ]
    )
    return Gate(Authenticator(store), FailureAudit(cast(Any, FakeAudit()), per_source=10, per_second=10)), acme, slow


async def test_http_refuses_with_429_and_retry_after_and_lets_health_through() -> None:
    gate, acme, slow = keys()
    admission = Admission(max_inflight=2, admin_max_inflight=4, rates=TenantRates("", {"slow": "2/minute"}))
    release = asyncio.Event()

    async def work(_: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({"ok": True})

    async def quick(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    table = TABLE.served()
    app = web.Application(middlewares=[common_access.http_middleware(gate, table), http_middleware(admission)])
    app.router.add_post("/v1/pipelines/{pipeline}:predict", work)
    app.router.add_post("/v2/models/{model}/infer", quick)
    for route in ("/healthz", "/metrics", "/v1/admin/models"):
        app.router.add_get(route, quick)
    a, s = {"authorization": f"Bearer {acme}"}, {"x-api-key": slow}
    async with TestClient(TestServer(app)) as client:
        busy = [asyncio.ensure_future(client.post("/v1/pipelines/embed:predict", headers=a)) for _ in range(2)]
        while admission.pools[Lane.DATA].inflight < 2:
            await asyncio.sleep(0.01)
        resp = await client.post("/v1/pipelines/embed:predict", headers=a, data=b"x" * 100_000)
        assert resp.status == 429 and resp.headers["Retry-After"] == "1"
        body = await resp.json()
        assert body["error"]["code"] == "RESOURCE_EXHAUSTED" and "in flight" in body["error"]["message"]
        resp = await client.post("/v2/models/embed/infer", headers=a)
        assert resp.status == 429 and set(await resp.json()) == {"error"}  # KServe's shape under /v2
        assert (await client.post("/v1/pipelines/embed:predict")).status == 401  # credentials first
        for route in ("/healthz", "/metrics", "/v1/admin/models"):
            assert (await client.get(route, headers=a)).status == 200, route
        assert metrics.INFLIGHT.labels("gateway")._value.get() >= 2
        release.set()
        assert [(await r).status for r in busy] == [200, 200]
        assert [(await client.post("/v2/models/m/infer", headers=s)).status for _ in range(3)] == [200, 200, 429]
        resp = await client.post("/v2/models/m/infer", headers=s)
        assert 1 <= int(resp.headers["Retry-After"]) <= 60 and "'slow'" in (await resp.json())["error"]
        assert (await client.post("/v2/models/m/infer", headers=a)).status == 200  # another tenant is served
    assert admission.pools[Lane.DATA].inflight == 0 and auth.current() is None


async def test_grpc_refuses_with_resource_exhausted_and_retry_trailers() -> None:
    gate, acme, slow = keys()
    admission = Admission(max_inflight=1, admin_max_inflight=4, rates=TenantRates("", {"slow": "1/minute"}))
    release = asyncio.Event()
    seen: list[str] = []

    async def predict(req: gateway_pb2.PredictRequest, _: Any) -> gateway_pb2.PredictResponse:
        principal = auth.current()
        seen.append(principal.tenant if principal else "")
        if req.pipeline == "wait":
            await release.wait()
        return gateway_pb2.PredictResponse(request_id=req.pipeline)

    server = grpc.aio.server(
        interceptors=[common_access.AuthInterceptor(gate, TABLE.served()), AdmissionInterceptor(admission)]
    )
    handlers = {"Predict": grpc_unary("loom.v1.Gateway", "Predict", gateway_pb2.PredictRequest, predict)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("loom.v1.Gateway", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    a, s = (("authorization", f"Bearer {acme}"),), (("x-api-key", slow),)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/loom.v1.Gateway/Predict")
            busy = asyncio.ensure_future(
                call(gateway_pb2.PredictRequest(pipeline="wait").SerializeToString(), metadata=a)
            )
            while admission.pools[Lane.DATA].inflight < 1:
                await asyncio.sleep(0.01)
            for msg in (gateway_pb2.PredictRequest(pipeline="x").SerializeToString(), b"\x0a" + b"\xff" * 3_000_000):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call(msg, timeout=5, metadata=a)
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "in flight" in err.value.details()
                trailers = dict(err.value.trailing_metadata() or ())
                assert trailers["retry-after"] == "1" and trailers["grpc-retry-pushback-ms"] == "1000"
            with pytest.raises(grpc.aio.AioRpcError) as err:  # no credentials: that answer comes first
                await call(b"", timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            release.set()
            assert gateway_pb2.PredictResponse.FromString(await busy).request_id == "wait"
            await call(gateway_pb2.PredictRequest(pipeline="y").SerializeToString(), timeout=5, metadata=s)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(gateway_pb2.PredictRequest(pipeline="z").SerializeToString(), timeout=5, metadata=s)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "'slow'" in err.value.details()
            assert 1 <= int(dict(err.value.trailing_metadata() or ())["retry-after"]) <= 60
    finally:
        await server.stop(0)
    assert seen == ["acme", "slow"] and admission.pools[Lane.DATA].inflight == 0


# --- the stages ------------------------------------------------------------------------------------


class FakeBus:
    service = "preprocess"

    def __init__(self) -> None:
        self.subscriptions: list[dict[str, Any]] = []
        self.published: list[str] = []

    async def subscribe(self, subject: str, handler: Any, **options: Any) -> None:
        self.subscriptions.append({"subject": subject, **options})

    async def publish(self, subject: str, payload: bytes, headers: Any = None) -> None:
        self.published.append(subject)

    def publish_nowait(self, subject: str, payload: bytes, headers: Any = None) -> bool:
        return True


class FakeMsg:
    def __init__(self, subject: str, data: bytes) -> None:
        self.subject, self.data, self.headers, self.reply = subject, data, None, ""


def test_stages_bound_their_queue_and_never_work_past_the_deadline() -> None:
    bus = FakeBus()
    handled: list[str] = []

    async def handler(part: pb.Part) -> None:
        handled.append(part.part_id)

    runner = StageRunner(cast(Any, bus), "preprocess", "loom.pre.text", handler)

    def part(part_id: str, deadline_ms: int) -> FakeMsg:
        p = pb.Part(request_id="r", part_id=part_id, deadline_unix_ms=deadline_ms, slip=["loom.pre.text", "loom.x"])
        return FakeMsg("loom.pre.text", p.SerializeToString())

    async def run() -> None:
        await runner.start()
        await runner.on_message(cast(Any, part("late", envelope.now_ms() - 1)))
        await runner.on_message(cast(Any, part("in-time", envelope.now_ms() + 5000)))

    drops = metrics.DEADLINE_DROPS.labels("preprocess", "loom.pre.text")._value.get()
    asyncio.run(run())
    assert bus.subscriptions[0]["pending_limit"] == STAGE_QUEUE
    assert handled == ["in-time"] and bus.published == ["loom.x"]
    assert metrics.DEADLINE_DROPS.labels("preprocess", "loom.pre.text")._value.get() == drops + 1
