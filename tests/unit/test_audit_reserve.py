"""The audit log's rules without a server: kinds, the reserve kept for admin entries, where a call comes from.

tests/integration/test_audit_stream.py shows the same against a real nats-server with a tiny stream.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY

from services.common import audit, auth
from services.common.access import READ, AccessTable, AuthInterceptor, FailureAudit, Gate, http_middleware
from services.common.audit import AuditLog
from services.common.auth import Authenticator, KeyRecord, KeyStore, Principal, Role, generate_api_key, hash_key
from services.common.errors import InvalidArgument
from services.common.pb.loom.v1 import gateway_pb2

pytestmark = pytest.mark.unit


class FakeJs:
    """A stream of ``max_bytes`` that is ``used`` bytes full; publishes are kept, never stored."""

    def __init__(self, used: int, max_bytes: int = 1000) -> None:
        self.used, self.max_bytes, self.infos = used, max_bytes, 0
        self.published: list[tuple[str, dict[str, Any]]] = []

    async def stream_info(self, _: str) -> Any:
        self.infos += 1
        return SimpleNamespace(config=SimpleNamespace(max_bytes=self.max_bytes), state=SimpleNamespace(bytes=self.used))

    async def publish(self, subject: str, payload: bytes, stream: str) -> Any:
        self.published.append((subject, json.loads(payload)))
        return SimpleNamespace(seq=len(self.published))


def log_on(js: FakeJs, clock: list[float]) -> AuditLog:
    bus = SimpleNamespace(js=js)
    return AuditLog(cast(Any, bus), service="gateway", clock=lambda: clock[0])


def skipped() -> float:
    return REGISTRY.get_sample_value("loom_audit_skipped_total", {"reason": "full"}) or 0.0


async def test_refusals_stop_in_the_reserve_and_admin_entries_do_not() -> None:
    js, clock = FakeJs(used=899), [0.0]
    log = log_on(js, clock)
    assert await log.append("auth.unauthenticated", actor="x", target="GET /v1/x") == 1  # 89.9 %: still room
    js.used = 900
    assert await log.append("auth.unauthenticated", actor="x") == 2  # the fill is re-read after FILL_TTL_S only
    clock[0] += audit.FILL_TTL_S
    before = skipped()
    assert await log.append("auth.permission_denied", actor="x") == 0  # 90 %: the reserve is for admin entries
    assert skipped() == before + 1
    assert await log.append("traffic.set", actor="ana", target="minilm") == 3
    assert [s for s, _ in js.published] == ["loom.audit.auth", "loom.audit.auth", "loom.audit.traffic"]
    assert js.infos == 2 and REGISTRY.get_sample_value("loom_audit_stream_fill_ratio") == 0.9


async def test_an_unreadable_fill_writes_refusals_as_before() -> None:
    class NoInfo(FakeJs):
        async def stream_info(self, _: str) -> Any:
            raise PermissionError("no stream info")

    log = log_on(NoInfo(used=0), [0.0])
    assert await log.fill() is None
    assert await log.append("auth.unauthenticated", actor="x") == 1


async def test_every_action_is_of_a_known_kind_on_its_subject() -> None:
    js = FakeJs(used=0)
    log = log_on(js, [0.0])
    with pytest.raises(InvalidArgument, match="must begin with one of"):
        await log.append("payroll.export", actor="ana")
    for kind in audit.KINDS:
        await log.append(f"{kind}.x", actor="ana")
    assert [s for s, _ in js.published] == [f"loom.audit.{k}" for k in audit.KINDS]


async def test_record_carries_the_bound_tenant_and_source_and_never_raises() -> None:
    js = FakeJs(used=0)
    log = log_on(js, [0.0])
    token = auth.bind(Principal("ana", "acme", frozenset({Role.ADMIN}), "api-key"), "10.1.2.3")
    try:
        await log.record("pipeline.put", actor="ana", target="embed", details={"revision": 4})
        await log.record("bad action!", actor="ana")  # refused by append: logged, not raised
    finally:
        auth.unbind(token)
    assert auth.current() is None and auth.source() == ""
    (_, entry), *rest = js.published
    assert not rest
    assert (entry["source"], entry["details"]) == ("10.1.2.3", {"revision": 4, "tenant": "acme"})


# --- the access layer binds where a call comes from ---------------------------------------------------


def gate_for(key: str) -> Gate:
    store = KeyStore([KeyRecord(id="ana", sha256=hash_key(key), roles=frozenset({Role.ADMIN}))])
    return Gate(Authenticator(store), FailureAudit(cast(Any, None), per_source=0, per_second=0))


async def test_the_middleware_binds_the_peer_address_for_the_handler() -> None:
    key, seen = generate_api_key(), []

    async def handler(_: web.Request) -> web.Response:
        seen.append(auth.source())
        return web.json_response({})

    app = web.Application(middlewares=[http_middleware(gate_for(key), AccessTable({("GET", "/x"): READ}).served())])
    app.router.add_get("/x", handler)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        assert (await client.get("/x", headers={"x-api-key": key})).status == 200
    assert seen == ["127.0.0.1"] and auth.source() == ""


async def test_the_interceptor_binds_the_peer_address_for_the_method() -> None:
    from services.gateway.edges import grpc_unary

    key, seen = generate_api_key(), []

    async def predict(req: gateway_pb2.PredictRequest, _: Any) -> gateway_pb2.PredictResponse:
        seen.append(auth.source())
        return gateway_pb2.PredictResponse()

    server = grpc.aio.server(interceptors=[AuthInterceptor(gate_for(key), AccessTable().served())])
    handlers = {"Predict": grpc_unary("loom.v1.Gateway", "Predict", gateway_pb2.PredictRequest, predict)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("loom.v1.Gateway", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/loom.v1.Gateway/Predict")
            await call(gateway_pb2.PredictRequest().SerializeToString(), timeout=5, metadata=(("x-api-key", key),))
    finally:
        await server.stop(0)
    assert seen == ["127.0.0.1"]
