"""The access layer every service shares: tables, the HTTP middleware, the gRPC interceptor, the failure audit.

Also the monitor's table against its routes and its OpenAPI document, and the
default table of the services that add no routes of their own.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from services.common import access, auth, metrics
from services.common.access import (
    ADMIN,
    OPEN,
    PREDICT,
    READ,
    AccessTable,
    AuthInterceptor,
    FailureAudit,
    Gate,
    http_middleware,
)
from services.common.auth import (
    Authenticator,
    KeyRecord,
    KeyStore,
    Principal,
    Refused,
    Role,
    generate_api_key,
    hash_key,
)
from services.common.pb.loom.v1 import gateway_pb2
from services.gateway.access import TABLE as GATEWAY
from services.monitor import api as monitor_api

pytestmark = pytest.mark.unit

RUNTIME_ROUTES = {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics")}


# --- tables ------------------------------------------------------------------------------------------


def test_the_runtime_opens_health_only_and_metrics_to_viewers_unless_told() -> None:
    bare = AccessTable().served()  # preprocess, inference, postprocess, fusion: no routes of their own
    assert {r for r in RUNTIME_ROUTES if bare.http_access(*r) is OPEN} == {("GET", "/healthz"), ("GET", "/readyz")}
    assert bare.http_access("GET", "/metrics") == READ and bare.http_access("HEAD", "/metrics") == READ
    assert bare.grpc_access("/grpc.health.v1.Health/Check") is OPEN
    assert bare.grpc_access("/grpc.health.v1.Health/Watch") is OPEN
    assert bare.grpc_access("/loom.v1.Gateway/Predict") == ADMIN  # not listed: admin only
    assert bare.http_access("POST", "/v1/anything") == ADMIN
    assert AccessTable().served(open_metrics=True).http_access("GET", "/metrics") is OPEN
    # A service cannot open or close the runtime's routes by listing them.
    sneaky = AccessTable({("GET", "/metrics"): OPEN, ("GET", "/healthz"): ADMIN}).served()
    assert sneaky.http_access("GET", "/metrics") == READ and sneaky.http_access("GET", "/healthz") is OPEN
    assert GATEWAY.plain("/v2") and GATEWAY.plain("/v2/models/x") and not GATEWAY.plain("/v20")


def monitor_routes() -> set[tuple[str, str]]:
    app = web.Application()
    # The handlers close over the monitor; none is called here.
    monitor_api.add_routes(app, cast(Any, SimpleNamespace(traces=None)))
    return {(r.method, r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"} | RUNTIME_ROUTES  # type: ignore[union-attr]


def test_the_monitor_table_names_its_routes_reads_for_viewers_writes_for_admins() -> None:
    served = monitor_routes()
    table = monitor_api.ACCESS.served()
    assert set(monitor_api.HTTP) <= served, set(monitor_api.HTTP) - served  # no stale entries
    needs = {route: table.http_access(*route) for route in served}
    assert {r for r, a in needs.items() if a is OPEN} == {
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/"),
        ("GET", "/static"),  # the page and its files: no data in them
    }
    assert {r for r, a in needs.items() if a == READ} == {(m, p) for m, p in served if m == "GET"} - {
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/"),
        ("GET", "/static"),
    }
    assert needs[("POST", "/v1/traces")] == PREDICT  # span ingest: services and Triton
    assert needs[("POST", "/v1/drift/baseline")] == ADMIN == needs[("POST", "/v1/evaluate")]
    assert table.grpc_access(monitor_api.OTLP_GRPC_EXPORT) == PREDICT


def test_the_monitor_openapi_document_matches_its_routes_and_roles() -> None:
    doc = yaml.safe_load(monitor_api.OPENAPI.read_text())
    assert doc["openapi"].startswith("3.") and set(doc["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    table = monitor_api.ACCESS.served()
    documented = set()
    for path, ops in doc["paths"].items():
        route = "/static" if path == "/static/{file}" else path  # aiohttp names a static folder by its prefix
        for method, op in ops.items():
            documented.add((method.upper(), route))
            need = table.http_access(method.upper(), route)
            security = op.get("security", doc["security"])  # the document's default: admin-only
            if need is None:
                assert security == [], (method, path)
            else:
                assert security == [{"bearer": sorted(need)}, {"apiKey": sorted(need)}], (method, path)
                assert {"401", "403"} <= set(op["responses"]), (method, path)
    assert documented == monitor_routes()


# --- the failure audit -----------------------------------------------------------------------------


class FakeAudit:
    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []

    async def append(self, action: str, **fields: Any) -> int:
        self.entries.append({"action": action, **fields})
        return len(self.entries)


def test_refusals_are_audited_within_per_source_and_total_limits() -> None:
    now = [100.0]
    fake = FakeAudit()
    failures = FailureAudit(cast(Any, fake), per_source=2, per_second=3, clock=lambda: now[0])
    before = metrics.AUTH_FAILURES.labels("missing")._value.get()
    suppressed = metrics.AUTH_AUDIT_SUPPRESSED._value.get()
    err = Refused("credentials required", reason="missing")

    async def flood() -> None:
        for peer in ["ipv4:10.0.0.1:1000", "ipv4:10.0.0.1:1001", "10.0.0.1", "ipv6:[::1]:5", "10.0.0.3"]:
            failures(err, "/loom.v1.Admin/SetTraffic", peer)
        now[0] = 101.2  # a new second: the counts start again
        failures(err, "GET /v1/admin/audit", "10.0.0.1")
        await asyncio.sleep(0)

    asyncio.run(flood())
    assert [(e["source"], e["target"]) for e in fake.entries] == [
        ("ipv4:10.0.0.1:1000", "/loom.v1.Admin/SetTraffic"),
        ("ipv4:10.0.0.1:1001", "/loom.v1.Admin/SetTraffic"),  # the same source, another port
        ("ipv6:[::1]:5", "/loom.v1.Admin/SetTraffic"),  # the third and last of that second
        ("10.0.0.1", "GET /v1/admin/audit"),
    ]
    entry = fake.entries[0]
    assert entry["action"] == "auth.unauthenticated" and entry["actor"] == "unknown" and entry["result"] == "refused"
    assert entry["details"] == {"reason": "missing", "message": "credentials required"}
    assert metrics.AUTH_FAILURES.labels("missing")._value.get() == before + 6  # every one counted
    assert metrics.AUTH_AUDIT_SUPPRESSED._value.get() == suppressed + 2
    assert [access.source_of(p) for p in ("ipv4:1.2.3.4:5", "ipv6:[::1]:5", "1.2.3.4", "unix:/tmp/s")] == [
        "1.2.3.4",
        "::1",
        "1.2.3.4",
        "unix:/tmp/s",
    ]


# --- the HTTP middleware ---------------------------------------------------------------------------


async def test_the_middleware_refuses_denies_and_binds_the_principal() -> None:
    predict_key, admin_key = generate_api_key(), generate_api_key()
    store = KeyStore(
        [
            KeyRecord(id="ci", sha256=hash_key(predict_key), roles=frozenset({Role.PREDICT}), tenant="acme"),
            KeyRecord(id="root", sha256=hash_key(admin_key), roles=frozenset({Role.ADMIN})),
        ]
    )
    fake = FakeAudit()
    gate = Gate(Authenticator(store), FailureAudit(cast(Any, fake), per_source=10, per_second=10))
    seen: list[Principal | None] = []

    async def handler(_: web.Request) -> web.Response:
        seen.append(auth.current())
        return web.json_response({"ok": True})

    app = web.Application(middlewares=[http_middleware(gate, GATEWAY.served())])
    app.router.add_get("/healthz", handler)
    app.router.add_post("/v1/pipelines/{pipeline}:predict", handler)
    app.router.add_put("/v1/pipelines/{pipeline}", handler)
    app.router.add_get("/v2/models/{model}", handler)
    async with TestClient(TestServer(app)) as client:
        assert (await client.get("/healthz")).status == 200 and seen == [None]
        resp = await client.post("/v1/pipelines/embed:predict")
        assert resp.status == 401 and resp.headers["WWW-Authenticate"] == 'Bearer realm="loom"'
        assert (await resp.json())["error"]["code"] == "UNAUTHENTICATED"
        resp = await client.get("/v2/models/embed", headers={"x-api-key": "loom_wrong"})
        assert resp.status == 401 and 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
        assert set(await resp.json()) == {"error"}  # KServe's shape under /v2
        resp = await client.put("/v1/pipelines/embed", headers={"Authorization": f"Bearer {predict_key}"})
        assert resp.status == 403 and (await resp.json())["error"]["code"] == "PERMISSION_DENIED"
        assert "needs the role admin" in (await resp.json())["error"]["message"]
        resp = await client.post("/v1/pipelines/embed:predict", headers={"Authorization": f"Bearer {predict_key}"})
        assert resp.status == 200 and seen[-1] is not None and (seen[-1].name, seen[-1].tenant) == ("ci", "acme")
        assert (await client.get("/nowhere")).status == 401  # unrouted: credentials first
        assert (await client.get("/nowhere", headers={"x-api-key": admin_key})).status == 404
        await asyncio.sleep(0)
    assert [(e["action"], e["actor"], e["target"], e["details"]["reason"]) for e in fake.entries] == [
        ("auth.unauthenticated", "unknown", "POST /v1/pipelines/{pipeline}:predict", "missing"),
        ("auth.unauthenticated", "unknown", "GET /v2/models/{model}", "unknown_key"),
        ("auth.permission_denied", "ci", "PUT /v1/pipelines/{pipeline}", "forbidden"),
        ("auth.unauthenticated", "unknown", "GET /nowhere", "missing"),
    ]
    assert fake.entries[2]["details"]["tenant"] == "acme" and fake.entries[0]["source"] == "127.0.0.1"
    assert auth.current() is None


# --- the gRPC interceptor --------------------------------------------------------------------------


async def test_the_interceptor_refuses_before_reading_and_binds_the_principal() -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_health.v1.health import aio as health_aio

    from services.gateway.edges import grpc_unary

    predict_key = generate_api_key()
    store = KeyStore([KeyRecord(id="ci", sha256=hash_key(predict_key), roles=frozenset({Role.PREDICT}), tenant="t")])
    fake = FakeAudit()
    gate = Gate(Authenticator(store), FailureAudit(cast(Any, fake), per_source=10, per_second=10))
    seen: list[Principal | None] = []

    async def predict(req: gateway_pb2.PredictRequest, _: Any) -> gateway_pb2.PredictResponse:
        seen.append(auth.current())
        return gateway_pb2.PredictResponse(request_id=req.pipeline)

    server = grpc.aio.server(interceptors=[AuthInterceptor(gate, GATEWAY.served())])
    handlers = {
        "Predict": grpc_unary("loom.v1.Gateway", "Predict", gateway_pb2.PredictRequest, predict),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("loom.v1.Gateway", handlers),))
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/loom.v1.Gateway/Predict")
            msg = gateway_pb2.PredictRequest(pipeline="embed").SerializeToString()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(msg, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "credentials required" in err.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as err:  # a big message is refused as well (not read)
                await call(b"\x0a" + b"\xff" * (3 * 1024 * 1024), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            reply = await call(msg, timeout=5, metadata=(("authorization", f"Bearer {predict_key}"),))
            assert gateway_pb2.PredictResponse.FromString(reply).request_id == "embed"
            assert seen and seen[-1] is not None and (seen[-1].name, seen[-1].tenant) == ("ci", "t")
            check = health_pb2_grpc.HealthStub(channel).Check
            assert (await check(health_pb2.HealthCheckRequest(service=""), timeout=5)).status  # open
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await channel.unary_unary("/loom.v1.Admin/SetTraffic")(b"", timeout=5, metadata=(("x-api-key", "x"),))
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED  # no such method here: nothing to protect
        await asyncio.sleep(0)
    finally:
        await server.stop(0)
    assert [(e["actor"], e["target"], e["details"]["reason"]) for e in fake.entries] == [
        ("unknown", "/loom.v1.Gateway/Predict", "missing"),
        ("unknown", "/loom.v1.Gateway/Predict", "missing"),
    ]
    assert fake.entries[0]["source"].startswith("ipv4:127.0.0.1:")
    assert auth.current() is None
