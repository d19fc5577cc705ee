"""Authentication on the real gateway: roles on every HTTP route and gRPC method, JWTs, and the audit of refusals.

The routes come from the OpenAPI document and the methods from the service
descriptors, so a route or method added later is covered without a change here.
Calls with a role that does not allow them are refused before any handler
runs, so sending them to admin routes changes nothing. Calls without
credentials, on every port of every service: test_auth_everywhere.py.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import jwt
import pytest
import yaml
from tritonclient.grpc import service_pb2

from services.common.auth import Role
from services.common.launch.mesh import Mesh
from services.common.pb.loom.v1 import admin_pb2, gateway_pb2
from services.gateway import access
from services.gateway.http_api import OPENAPI
from tests.support import (
    TEST_API_KEY,
    TEST_JWT_AUDIENCE,
    TEST_JWT_SECRET,
    TEST_PREDICT_KEY,
    TEST_TENANT,
    TEST_VIEWER_KEY,
    eventually,
    grpc_auth,
    http_json,
    predict_grpc,
    predict_http,
    read_spans,
)

pytestmark = pytest.mark.integration

#: Real values for the path parameters of the documented routes.
PATH_VALUES = {"{pipeline}": "embed", "{model}": "minilm", "{version}": "1", "{seq}": "1", "{request_id}": "r-1"}
SERVICES = (
    gateway_pb2.DESCRIPTOR.services_by_name["Gateway"],
    admin_pb2.DESCRIPTOR.services_by_name["Admin"],
    service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
)


def documented_routes() -> list[tuple[str, str]]:
    doc = yaml.safe_load(OPENAPI.read_text())
    return [(m.upper(), path) for path, ops in doc["paths"].items() for m in ops if m != "parameters"]


def url_of(mesh: Mesh, path: str) -> str:
    for name, value in PATH_VALUES.items():
        path = path.replace(name, value)
    return mesh.gateway_http + path


def call(mesh: Mesh, method: str, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], Any]:
    """One call with exactly ``headers`` (no key of its own); (status, response headers, body)."""
    data = b"{}" if method in ("POST", "PUT") else None
    req = urllib.request.Request(
        url_of(mesh, path), data=data, method=method, headers={"content-type": "application/json", **headers}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read() or b"null")


def methods() -> Iterator[tuple[str, bool]]:
    """Every gRPC method of the gateway's three services: (path, streaming)."""
    for service in SERVICES:
        for m in service.methods:
            yield f"/{service.full_name}/{m.name}", m.client_streaming or m.server_streaming


def rpc_code(mesh: Mesh, path: str, streaming: bool, metadata: tuple[tuple[str, str], ...] = ()) -> grpc.StatusCode:
    with grpc.insecure_channel(mesh.gateway_grpc) as channel:
        try:
            if streaming:
                for _ in channel.stream_stream(path)(iter([b""]), timeout=15, metadata=metadata):
                    pass
            else:
                channel.unary_unary(path)(b"", timeout=15, metadata=metadata)
        except grpc.RpcError as err:
            return err.code()
    return grpc.StatusCode.OK


def token(secret: str = TEST_JWT_SECRET, **claims: Any) -> str:
    """An HS256 JWT for the test mesh: a predict role for 10 minutes unless ``claims`` say otherwise."""
    base = {"sub": "jwt-user", "exp": int(time.time()) + 600, "aud": TEST_JWT_AUDIENCE, "roles": ["predict"]}
    return jwt.encode({**base, **claims}, secret, algorithm="HS256")


def bearer(credential: str) -> dict[str, str]:
    return {"authorization": f"Bearer {credential}"}


# --- roles ---------------------------------------------------------------------------------------


def test_a_role_reaches_what_it_may_and_nothing_else(mesh: Mesh) -> None:
    for method, path in documented_routes():
        need = access.http_access(method, path)
        if need is None or Role.PREDICT in need:
            continue  # open, or something the predict key may really do
        status, _, body = call(mesh, method, path, bearer(TEST_PREDICT_KEY))
        assert status == 403, (method, path, status, body)
        detail = body["error"] if path.startswith("/v2") else body["error"]["message"]
        assert "'test-predict' (roles: predict)" in detail, (method, path, body)
    for path, streaming in methods():
        need = access.grpc_access(path)
        if need is not None and Role.PREDICT not in need:
            code = rpc_code(mesh, path, streaming, grpc_auth(TEST_PREDICT_KEY))
            assert code == grpc.StatusCode.PERMISSION_DENIED, path

    status, body = predict_http(mesh.gateway_http, "a predict key predicts", key=TEST_PREDICT_KEY)
    assert status == 200, body
    assert predict_grpc(mesh.gateway_grpc, "over gRPC too", key=TEST_PREDICT_KEY).outputs["text"].text.embedding
    assert http_json(f"{mesh.gateway_http}/v1/admin/models", key=TEST_VIEWER_KEY)[0] == 200
    assert http_json(f"{mesh.gateway_http}/v1/pipelines", headers={"x-api-key": TEST_VIEWER_KEY}, key=None)[0] == 200
    assert predict_http(mesh.gateway_http, "a viewer may not", key=TEST_VIEWER_KEY)[0] == 403
    assert http_json(f"{mesh.gateway_http}/v1/admin/audit?limit=1", key=TEST_API_KEY)[0] == 200

    # The caller and its tenant are on the request's SERVER span.
    def server_span() -> dict[str, Any]:
        spans = [s for s in read_spans(mesh.workdir / "traces") if s["trace_id"] == body["trace_id"]]
        servers = [s for s in spans if s["service"] == "gateway" and s["kind"] == "SERVER"]
        assert len(servers) == 1, spans  # spans reach the file in batches: retried until it is there
        return servers[0]

    span = eventually(server_span, timeout=15)
    assert span["attributes"]["enduser.id"] == "test-predict"
    assert span["attributes"]["loom.tenant"] == TEST_TENANT


# --- JWTs ----------------------------------------------------------------------------------------


def test_jwts_valid_expired_forged_and_for_someone_else(mesh: Mesh) -> None:
    status, body = predict_http(mesh.gateway_http, "a JWT predicts", key=token(tenant="globex"))
    assert status == 200, body
    reply = predict_grpc(mesh.gateway_grpc, "a JWT over gRPC", key=token())
    assert reply.outputs["text"].text.embedding
    refusals = {
        "expired": token(exp=int(time.time()) - 120),
        "forged": token(secret="not-the-gateways-secret-0123456789abcdef"),
        "audience": token(aud="someone-else"),
        "viewer": token(roles=["viewer"]),
    }
    for what, credential in refusals.items():
        status, body = predict_http(mesh.gateway_http, "refused", key=credential)
        assert status == (403 if what == "viewer" else 401), (what, body)
    with pytest.raises(grpc.RpcError) as err:
        predict_grpc(mesh.gateway_grpc, "refused", key=refusals["expired"])
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "expired" in (err.value.details() or "")


# --- the audit -----------------------------------------------------------------------------------


def test_refusals_are_in_the_audit_log(mesh: Mesh) -> None:
    mark = uuid.uuid4().hex[:8]
    time.sleep(1.1)  # a fresh second: the floods above used up that second's audit budget
    assert predict_http(mesh.gateway_http, "x", key=token(sub=f"late-{mark}", exp=int(time.time()) - 120))[0] == 401
    forged = token(sub=f"forger-{mark}", secret="not-the-gateways-secret-0123456789abcdef")
    assert predict_http(mesh.gateway_http, "x", key=forged)[0] == 401
    with grpc.insecure_channel(mesh.gateway_grpc) as channel, pytest.raises(grpc.RpcError):
        channel.unary_unary("/loom.v1.Admin/SetTraffic")(b"", timeout=10, metadata=grpc_auth(TEST_PREDICT_KEY))

    def found() -> dict[str, dict[str, Any]]:
        status, doc = http_json(f"{mesh.gateway_http}/v1/admin/audit?limit=200")
        assert status == 200, doc
        entries = [e for e in doc["entries"] if str(e["action"]).startswith("auth.")]
        late = [e for e in entries if e["actor"] == f"late-{mark}"]
        forger = [e for e in entries if e["details"].get("claimed_sub") == f"forger-{mark}"]
        denied = [e for e in entries if e["action"] == "auth.permission_denied" and e["actor"] == "test-predict"]
        assert late and forger and denied, entries[-5:]
        return {"late": late[-1], "forger": forger[-1], "denied": denied[-1]}

    got = eventually(found, timeout=10)
    late, forger, denied = got["late"], got["forger"], got["denied"]
    assert (late["action"], late["result"], late["details"]["reason"]) == ("auth.unauthenticated", "refused", "expired")
    assert late["target"] == "POST /v1/pipelines/{pipeline}:predict" and late["source"] == "127.0.0.1"
    assert late["time"] and late["service"] == "gateway"
    assert (forger["actor"], forger["details"]["reason"]) == ("unknown", "bad_signature")
    assert denied["target"] == "/loom.v1.Admin/SetTraffic" and denied["details"]["reason"] == "forbidden"
    assert denied["details"]["tenant"] == TEST_TENANT and denied["source"].startswith("ipv4:127.0.0.1:")
