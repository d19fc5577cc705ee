"""Credentials on every port of every service of the real mesh: only health answers without them.

What each port serves is enumerated, not listed here, so a route or method
added later is covered without a change: HTTP routes from the OpenAPI
documents (gateway, monitor) and from each service's app as the runtime builds
it; gRPC methods from the servicers each service registers, resolved in the
protobuf descriptor pool (and checked against it: a registered service
implements every method its descriptor names). The gateway's own finer points
(KServe's error shape, JWT audiences, the caller on spans) are in test_auth.py.
"""

from __future__ import annotations

import importlib
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import grpc
import jwt
import pytest
import yaml
from aiohttp import web
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2
from prometheus_client import REGISTRY

from services.common.access import AccessTable
from services.common.auth import Role
from services.common.launch.mesh import SERVICES, Mesh, grpc_serving
from services.common.lifecycle import Runtime, Service, _base_app
from services.gateway.http_api import OPENAPI as GATEWAY_OPENAPI
from services.monitor.api import OPENAPI as MONITOR_OPENAPI
from tests.support import (
    TEST_API_KEY,
    TEST_JWT_AUDIENCE,
    TEST_JWT_SECRET,
    TEST_PREDICT_KEY,
    TEST_VIEWER_KEY,
    bearer,
    eventually,
    grpc_auth,
    http_json,
    metric,
)

pytestmark = pytest.mark.integration

DOCUMENTS = {"gateway": GATEWAY_OPENAPI, "monitor": MONITOR_OPENAPI}
HEALTH = {f"/grpc.health.v1.Health/{m.name}" for m in health_pb2.DESCRIPTOR.services_by_name["Health"].methods}
#: Real-looking values for path parameters (a refused call never looks at them).
PATH_VALUES = {
    "{pipeline}": "embed",
    "{model}": "minilm",
    "{version}": "1",
    "{request_id}": "auth-everywhere",
    "{seq}": "1",
    "{id}": "0" * 32,
}
#: Refused calls carry a message that is not even valid protobuf: it must never be read.
GARBAGE = b"\x0a\xff\xff\xff"
KEY_ROLES = {TEST_PREDICT_KEY: Role.PREDICT, TEST_VIEWER_KEY: Role.VIEWER}


@dataclass(frozen=True)
class Port:
    """One service's two ports and what is served on them."""

    service: str
    http: str
    grpc: str
    table: AccessTable
    routes: frozenset[tuple[str, str]]  # (method, canonical route)
    methods: frozenset[tuple[str, bool]]  # (/pkg.Service/Method, streaming)


class _Recorder:
    """Stands in for a grpc.aio server: records the methods a service registers."""

    def __init__(self) -> None:
        self.paths: set[str] = set()

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        for handler in handlers:
            self.paths.update(getattr(handler, "_method_handlers", {}))

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        self.paths.update(f"/{service}/{name}" for name in handlers)


def _service(name: str) -> Service:
    module = importlib.import_module(f"services.{name}.service")
    settings = importlib.import_module(f"services.{name}.settings")
    title = name.capitalize()
    svc: Service = getattr(module, title)(getattr(settings, f"{title}Settings")())
    svc.bind(Runtime.create(name, svc.settings))
    return svc


def _methods(paths: set[str]) -> frozenset[tuple[str, bool]]:
    """Each method with its streaming flag from the descriptor pool; every method of a registered service."""
    pool = descriptor_pool.Default()
    found = set()
    for service in {p.split("/")[1] for p in paths}:
        desc = pool.FindServiceByName(service)
        declared = {f"/{service}/{m.name}" for m in desc.methods}
        assert declared == {p for p in paths if p.split("/")[1] == service}, service  # nothing left unregistered
        found |= {(f"/{service}/{m.name}", m.client_streaming or m.server_streaming) for m in desc.methods}
    return frozenset(found)


def _documented(name: str) -> set[tuple[str, str]]:
    if name not in DOCUMENTS:
        return set()
    doc = yaml.safe_load(DOCUMENTS[name].read_text())
    return {
        (m.upper(), "/static" if path == "/static/{file}" else path)  # aiohttp names a static folder by its prefix
        for path, ops in doc["paths"].items()
        for m in ops
        if m != "parameters"
    }


@pytest.fixture(scope="module")
def ports(mesh: Mesh) -> Iterator[list[Port]]:
    @web.middleware
    async def passthrough(request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)  # pragma: no cover - listed, never served
        return response

    found, monitors = [], []
    for name in SERVICES:
        svc = _service(name)
        if name == "monitor":
            monitors.append(svc)
        app = _base_app(Runtime.create(name, svc.settings), svc, passthrough)
        served = {(r.method, r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}  # type: ignore[union-attr]
        recorder = _Recorder()
        svc.add_grpc(cast(Any, recorder))
        found.append(
            Port(
                name,
                mesh.http_url(name),
                f"127.0.0.1:{mesh.ports[f'{name}_grpc']}",
                svc.access().served(),
                frozenset(served | _documented(name)),
                _methods(recorder.paths | HEALTH),
            )
        )
    try:
        yield found
    finally:
        for m in monitors:  # it registered its Triton collector in this process's registry
            REGISTRY.unregister(m.triton)  # type: ignore[attr-defined]


def url_of(port: Port, route: str) -> str:
    path = "/static/dashboard.js" if route == "/static" else route
    for name, value in PATH_VALUES.items():
        path = path.replace(name, value)
    return port.http + path


def call(url: str, method: str, headers: dict[str, str]) -> tuple[int, dict[str, str], Any]:
    data = b"{}" if method in ("POST", "PUT", "PATCH") else None
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, dict(exc.headers), json.loads(raw or b"null")
        except ValueError:
            return exc.code, dict(exc.headers), raw


def rpc(target: str, path: str, streaming: bool, metadata: tuple[tuple[str, str], ...] = ()) -> grpc.StatusCode:
    with grpc.insecure_channel(target) as channel:
        try:
            if streaming:
                for _ in channel.stream_stream(path)(iter([GARBAGE]), timeout=15, metadata=metadata):
                    pass
            else:
                channel.unary_unary(path)(GARBAGE, timeout=15, metadata=metadata)
        except grpc.RpcError as err:
            code: grpc.StatusCode = err.code()
            return code
    return grpc.StatusCode.OK


def token(secret: str = TEST_JWT_SECRET, **claims: Any) -> str:
    base = {"sub": "jwt-viewer", "exp": int(time.time()) + 600, "aud": TEST_JWT_AUDIENCE, "roles": ["viewer"]}
    return jwt.encode({**base, **claims}, secret, algorithm="HS256")


def error_message(body: Any) -> str:
    err = body.get("error") if isinstance(body, dict) else None
    return str(err.get("message") if isinstance(err, dict) else err)


# --- without credentials -------------------------------------------------------------------------


def test_without_credentials_only_health_answers_on_any_port(ports: list[Port]) -> None:
    assert {p.service for p in ports} == set(SERVICES)
    assert sum(len(p.routes) for p in ports) > 60 and sum(len(p.methods) for p in ports) > 40
    before = {p.service: metric(p.http, "loom_auth_failures_total", reason="missing") for p in ports}
    open_routes, refused = set(), {p.service: 0 for p in ports}
    for port in ports:
        for method, route in sorted(port.routes):
            status, headers, body = call(url_of(port, route), method, {})
            if status != 401:
                open_routes.add((port.service, method, route))
                assert status < 400, (port.service, method, route, status, body)
                continue
            refused[port.service] += 1
            assert headers["WWW-Authenticate"] == 'Bearer realm="loom"', (port.service, route)
            assert "credentials required" in error_message(body), (port.service, route, body)
        assert call(f"{port.http}/v1/nothing/here", "GET", {})[0] == 401  # unrouted: nobody learns what exists
        refused[port.service] += 1
        assert grpc_serving(port.grpc), port.service  # the health check itself, without credentials
        for path, streaming in sorted(port.methods):
            code = rpc(port.grpc, path, streaming)
            if path in HEALTH:  # open: it answers (here: about the garbage it was sent)
                assert code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED), path
                continue
            assert code == grpc.StatusCode.UNAUTHENTICATED, (port.service, path, code)
            refused[port.service] += 1

    health = {(s, "GET", r) for s in SERVICES for r in ("/healthz", "/readyz")}
    page = {("monitor", "GET", "/"), ("monitor", "GET", "/static")}  # the dashboard's files: no data in them
    assert open_routes == health | page
    for port in ports:  # every refusal counted where it happened
        now = metric(port.http, "loom_auth_failures_total", reason="missing")
        assert now >= before[port.service] + refused[port.service], port.service


# --- roles -----------------------------------------------------------------------------------------


def test_a_key_without_the_role_is_refused_on_every_port(ports: list[Port]) -> None:
    denied = 0
    for key, role in KEY_ROLES.items():
        for port in ports:
            for method, route in sorted(port.routes):
                need = port.table.http_access(method, route)
                if need is None or role in need:
                    continue  # open, or something this key may really do
                status, _, body = call(url_of(port, route), method, bearer(key))
                assert status == 403, (port.service, role, method, route, status, body)
                assert f"(roles: {role})" in error_message(body), body
                denied += 1
            assert call(f"{port.http}/v1/nothing/here", "GET", bearer(key))[0] == 404  # known caller: the truth
            for path, streaming in sorted(port.methods):
                need = port.table.grpc_access(path)
                if need is not None and role not in need:
                    code = rpc(port.grpc, path, streaming, grpc_auth(key))
                    assert code == grpc.StatusCode.PERMISSION_DENIED, (port.service, role, path, code)
                    denied += 1
    assert denied > 50
    for port in ports:  # a viewer scrapes every service's /metrics
        assert call(f"{port.http}/metrics", "GET", bearer(TEST_VIEWER_KEY))[0] == 200, port.service


# --- JWTs ----------------------------------------------------------------------------------------


def test_every_service_takes_the_mesh_jwts_and_refuses_expired_or_forged_ones(ports: list[Port]) -> None:
    expired = token(exp=int(time.time()) - 120)
    forged = token(secret="not-the-mesh-secret-0123456789abcdefghijkl")
    for port in ports:
        assert call(f"{port.http}/metrics", "GET", bearer(token()))[0] == 200, port.service
        for what, credential in (("expired", expired), ("signature", forged)):
            status, headers, body = call(f"{port.http}/metrics", "GET", bearer(credential))
            assert status == 401 and 'error="invalid_token"' in headers["WWW-Authenticate"], (port.service, what)
            assert what in error_message(body), (port.service, body)
        for path, streaming in [(p, s) for p, s in port.methods if p not in HEALTH]:
            code = rpc(port.grpc, path, streaming, grpc_auth(expired))
            assert code == grpc.StatusCode.UNAUTHENTICATED, (port.service, path)


# --- the audit -----------------------------------------------------------------------------------


def test_refusals_on_every_service_are_in_the_audit_log(ports: list[Port], mesh: Mesh) -> None:
    mark = uuid.uuid4().hex[:8]
    time.sleep(1.1)  # a fresh second: the floods above used up that second's audit budget
    for port in ports:
        late = token(sub=f"late-{mark}-{port.service}", exp=int(time.time()) - 120)
        assert call(f"{port.http}/metrics", "GET", bearer(late))[0] == 401
        denied = token(sub=f"denied-{mark}-{port.service}", roles=["predict"])
        assert call(f"{port.http}/metrics", "GET", bearer(denied))[0] == 403

    def found() -> dict[tuple[str, str], dict[str, Any]]:
        status, doc = http_json(f"{mesh.gateway_http}/v1/admin/audit?limit=500", key=TEST_API_KEY)
        assert status == 200, doc
        ours = {(e["service"], e["actor"]): e for e in doc["entries"] if mark in str(e["actor"])}
        wanted = {(s, f"{kind}-{mark}-{s}") for s in SERVICES for kind in ("late", "denied")}
        assert set(ours) == wanted, sorted(wanted - set(ours))
        return ours

    for (service, actor), entry in eventually(found, timeout=15).items():
        late = actor.startswith("late-")
        assert entry["action"] == ("auth.unauthenticated" if late else "auth.permission_denied"), entry
        assert (entry["result"], entry["target"], entry["source"]) == ("refused", "GET /metrics", "127.0.0.1")
        assert entry["details"]["reason"] == ("expired" if late else "forbidden"), (service, entry)
