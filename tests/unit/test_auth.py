"""Authentication and authorisation: keys, JWTs (HS256, RS256, JWKS), the role table, the failure audit."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

import grpc
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import SecretStr, ValidationError
from tritonclient.grpc import service_pb2

from services.common import auth, metrics
from services.common.auth import (
    Authenticator,
    AuthError,
    AuthSettings,
    Forbidden,
    JwtVerifier,
    KeyRecord,
    KeyStore,
    KeysUnavailable,
    Principal,
    Refused,
    Role,
    generate_api_key,
    hash_key,
)
from services.common.errors import Code, grpc_status, http_status
from services.common.launch.dev_key import dev_api_key
from services.common.lifecycle import Runtime
from services.common.pb.loom.v1 import admin_pb2, gateway_pb2
from services.gateway import access
from services.gateway.access import ADMIN, CALLER, OPEN, PREDICT, READ, FailureAudit, Gate, http_middleware
from services.gateway.service import Gateway
from services.gateway.settings import GatewaySettings

pytestmark = pytest.mark.unit

SECRET = "a-shared-secret-that-is-long-enough-for-hs256!"
ONE_HOUR = 3600


def token(claims: dict[str, Any], key: Any = SECRET, alg: str = "HS256", **headers: Any) -> str:
    base = {"sub": "ana", "exp": int(time.time()) + ONE_HOUR}
    return jwt.encode({**base, **claims}, key, algorithm=alg, headers=headers or None)


def refused(coro: Any) -> AuthError:
    with pytest.raises(AuthError) as err:
        asyncio.run(coro)
    return err.value


# --- keys ----------------------------------------------------------------------------------------


def test_keys_are_random_and_stored_only_as_their_sha256() -> None:
    a, b = generate_api_key(), generate_api_key()
    assert a != b and a.startswith("loom_") and len(a) > 40 and "." not in a
    assert hash_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    rec = KeyRecord(id="ci", sha256=hash_key(a), roles=frozenset({Role.PREDICT}), tenant="acme")
    store = KeyStore([rec])
    assert store.lookup(a) == rec and store.lookup(b) is None and store.lookup(hash_key(a)) is None
    assert rec.principal() == Principal("ci", "acme", frozenset({Role.PREDICT}), "api-key")


def test_a_keys_file_is_checked_whole(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    good = {"id": "ci", "sha256": hash_key("k" * 32), "roles": ["predict", "viewer"]}
    path.write_text(json.dumps([good]))
    (rec,) = KeyStore.load(path)
    assert rec.roles == {Role.PREDICT, Role.VIEWER} and rec.tenant == "default"
    cases = [
        ("{not json", "is not JSON"),
        ('{"id": "x"}', "must hold a JSON list"),
        (json.dumps([{**good, "roles": ["root"]}]), "entry 0: roles"),
        (json.dumps([{**good, "roles": []}]), "entry 0: roles"),
        (json.dumps([{**good, "sha256": "ABC"}]), "entry 0: sha256"),
        (json.dumps([{**good, "key": "plaintext"}]), "entry 0: key"),
    ]
    for text, needle in cases:
        path.write_text(text)
        with pytest.raises(ValueError, match=needle):
            KeyStore.load(path)
    with pytest.raises(ValueError, match="cannot read"):
        KeyStore.load(tmp_path / "missing.json")
    rec = KeyRecord.model_validate(good)
    with pytest.raises(ValueError, match="appears twice"):
        KeyStore([rec, rec.model_copy(update={"sha256": hash_key("other")})])
    with pytest.raises(ValueError, match="same sha256"):
        KeyStore([rec, rec.model_copy(update={"id": "other"})])


def test_credentials_come_from_bearer_or_x_api_key() -> None:
    key = generate_api_key()
    rec = KeyRecord(id="ci", sha256=hash_key(key), roles=frozenset({Role.VIEWER}))
    authn = Authenticator(KeyStore([rec]))
    assert asyncio.run(authn.authenticate(f"Bearer {key}")).name == "ci"
    assert asyncio.run(authn.authenticate(f"bearer   {key} ")).name == "ci"
    assert asyncio.run(authn.authenticate("", key)).name == "ci"
    assert refused(authn.authenticate()).reason == "missing"
    assert refused(authn.authenticate(f"Basic {key}")).reason == "malformed"
    unknown = refused(authn.authenticate("Bearer loom_nope"))
    assert unknown.reason == "unknown_key" and unknown.who == "unknown"
    assert unknown.hints == {"key_sha256_prefix": hash_key("loom_nope")[:12]} and "loom_nope" not in unknown.message
    assert refused(authn.authenticate(f"Bearer {token({})}")).reason == "invalid_token"  # no JWT configured
    assert isinstance(unknown, Refused) and http_status(unknown) == 401 and unknown.code == Code.UNAUTHENTICATED


def test_the_dev_key_is_an_admin_of_tenant_dev(tmp_path: Path) -> None:
    key = generate_api_key()
    authn = Authenticator.from_settings(AuthSettings(dev_api_key=SecretStr(key)))
    assert asyncio.run(authn.authenticate(f"Bearer {key}")) == Principal(
        "dev", "dev", frozenset({Role.ADMIN}), "api-key"
    )
    assert not Authenticator.from_settings(AuthSettings()).configured
    with pytest.raises(ValidationError, match="at least 16"):
        AuthSettings(dev_api_key=SecretStr("short"))
    with pytest.raises(ValidationError, match="at least 32 bytes"):
        AuthSettings(auth_jwt_secret=SecretStr("short"))
    os.environ["LOOM_DEV_API_KEY"] = key  # the documented variable names
    os.environ["LOOM_AUTH_JWT_AUDIENCE"] = "loom"
    try:
        settings = GatewaySettings()
        assert settings.dev_api_key.get_secret_value() == key and settings.auth_jwt_audience == "loom"
        assert key not in repr(settings)
    finally:
        del os.environ["LOOM_DEV_API_KEY"], os.environ["LOOM_AUTH_JWT_AUDIENCE"]


# --- JWT -----------------------------------------------------------------------------------------


def test_hs256_tokens() -> None:
    verifier = JwtVerifier(secret=SECRET, audience="loom", issuer="https://idp")
    ok = {"aud": "loom", "iss": "https://idp", "tenant": "acme"}
    who = asyncio.run(verifier.verify(token({**ok, "roles": ["viewer", "predict", "root"]})))
    assert who == Principal("ana", "acme", frozenset({Role.VIEWER, Role.PREDICT}), "jwt")
    assert asyncio.run(verifier.verify(token({**ok, "roles": "admin"}))).roles == {Role.ADMIN}
    assert asyncio.run(verifier.verify(token({"aud": "loom", "iss": "https://idp"}))).tenant == "default"

    expired = refused(verifier.verify(token({**ok, "exp": int(time.time()) - 60})))
    assert (expired.reason, expired.who) == ("expired", "ana")  # the signature held: the subject is genuine
    forged = refused(verifier.verify(token({**ok, "sub": "mallory"}, key="another-secret-of-at-least-32-bytes!!")))
    assert (forged.reason, forged.who, forged.hints) == ("bad_signature", "unknown", {"claimed_sub": "mallory"})
    assert refused(verifier.verify(token({**ok, "aud": "other"}))).reason == "wrong_audience"
    assert refused(verifier.verify(token({**ok, "iss": "https://evil"}))).reason == "wrong_issuer"
    no_exp = jwt.encode({"sub": "ana", **ok}, SECRET, algorithm="HS256")
    assert refused(verifier.verify(no_exp)).reason == "invalid_token"
    unsigned = jwt.encode({"sub": "ana", "exp": int(time.time()) + 60, **ok}, cast(Any, None), algorithm="none")
    assert refused(verifier.verify(unsigned)).reason == "invalid_token"
    assert refused(verifier.verify("a.b.c")).reason == "malformed"
    assert refused(verifier.verify(token({**ok, "tenant": "two words"}))).reason == "invalid_token"
    # Without a configured audience, a token's "aud" is not ours to judge.
    assert asyncio.run(JwtVerifier(secret=SECRET).verify(token({"aud": "anything"}))).name == "ana"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem(key: rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def test_rs256_with_a_pem_public_key(rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = JwtVerifier(public_key=pem(rsa_key))
    assert asyncio.run(verifier.verify(token({"roles": ["predict"]}, rsa_key, "RS256"))).roles == {Role.PREDICT}
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert refused(verifier.verify(token({}, other, "RS256"))).reason == "bad_signature"
    # Algorithm confusion: an HS256 token "signed" with the public key as a secret is refused.
    confused = jwt.api_jws.PyJWS()
    confused._algorithms["HS256"].prepare_key = lambda key: key  # type: ignore[method-assign]  # an attacker's PyJWT
    forged = confused.encode(
        json.dumps({"sub": "x", "exp": int(time.time()) + 60}).encode(), pem(rsa_key).encode(), algorithm="HS256"
    )
    assert refused(verifier.verify(forged)).reason == "invalid_token"


@pytest.fixture
def jwks(rsa_key: rsa.RSAPrivateKey) -> Iterator[dict[str, Any]]:
    """A JWKS endpoint on loopback; ``state["up"] = False`` makes it answer 503."""
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    state: dict[str, Any] = {"up": True, "keys": {"keys": [{**public, "kid": "k1", "use": "sig", "alg": "RS256"}]}}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            data = json.dumps(state["keys"]).encode()
            self.send_response(200 if state["up"] else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{httpd.server_address[1]}/.well-known/jwks.json"
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def test_rs256_with_jwks(rsa_key: rsa.RSAPrivateKey, jwks: dict[str, Any]) -> None:
    verifier = JwtVerifier(jwks_url=jwks["url"], audience="loom")
    good = token({"aud": "loom", "roles": ["viewer"], "tenant": "acme"}, rsa_key, "RS256", kid="k1")
    assert asyncio.run(verifier.verify(good)) == Principal("ana", "acme", frozenset({Role.VIEWER}), "jwt")
    unknown_kid = token({"aud": "loom"}, rsa_key, "RS256", kid="k9")
    assert refused(verifier.verify(unknown_kid)).reason == "bad_signature"
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert refused(verifier.verify(token({"aud": "loom"}, other, "RS256", kid="k1"))).reason == "bad_signature"
    jwks["up"] = False
    down = refused(JwtVerifier(jwks_url=jwks["url"]).verify(good))  # a fresh client: nothing cached
    assert isinstance(down, KeysUnavailable) and down.reason == "keys_unavailable" and http_status(down) == 503


# --- roles and the table ---------------------------------------------------------------------------


def test_admin_may_do_everything_the_others_what_they_hold() -> None:
    def who(*roles: Role) -> Principal:
        return Principal("p", "t", frozenset(roles), "jwt")

    assert who(Role.ADMIN).may(READ) and who(Role.ADMIN).may(PREDICT) and who(Role.ADMIN).may(ADMIN)
    assert who(Role.VIEWER).may(READ) and who(Role.VIEWER).may(CALLER) and not who(Role.VIEWER).may(PREDICT)
    assert who(Role.PREDICT).may(PREDICT) and not who(Role.PREDICT).may(READ) and not who(Role.PREDICT).may(ADMIN)
    assert not who().may(CALLER)


def served_routes() -> set[tuple[str, str]]:
    app = web.Application()
    settings = GatewaySettings()
    gateway = Gateway(settings)
    gateway.bind(Runtime.create("gateway", settings))
    gateway.add_http(app)
    routes = {(r.method, r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}  # type: ignore[union-attr]
    return routes | {("GET", "/metrics"), ("GET", "/healthz"), ("GET", "/readyz")}  # added by the lifecycle


def test_the_http_table_names_only_real_routes_and_everything_unnamed_is_admin_only() -> None:
    served = served_routes()
    assert set(access.HTTP) <= served, set(access.HTTP) - served  # no stale entries
    needs = {route: access.http_access(*route) for route in served}
    assert {r for r, a in needs.items() if a is OPEN} == {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics")}
    admin_only = {r for r, a in needs.items() if a == ADMIN}
    assert ("PUT", "/v1/pipelines/{pipeline}") in admin_only
    assert {p for m, p in admin_only if p.startswith("/v1/admin")} == {
        p for m, p in served if p.startswith("/v1/admin") and m != "GET"
    }
    assert needs[("POST", "/v1/pipelines/{pipeline}:predict")] == PREDICT == needs[("POST", "/v1/feedback")]
    assert needs[("POST", "/v2/models/{model}/infer")] == PREDICT
    assert needs[("GET", "/v1/admin/audit")] == READ == needs[("GET", "/v1/pipelines")]
    assert needs[("GET", "/v2/models/{model}/ready")] == CALLER
    assert access.http_access("HEAD", "/v1/pipelines") == READ  # HEAD is a GET
    assert access.http_access("POST", "/v1/something-new") == ADMIN


def test_the_grpc_table_covers_the_three_services() -> None:
    methods = {
        f"/{desc.full_name}/{m.name}"
        for desc in (
            gateway_pb2.DESCRIPTOR.services_by_name["Gateway"],
            admin_pb2.DESCRIPTOR.services_by_name["Admin"],
            service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
        )
        for m in desc.methods
    }
    assert set(access.GRPC) - methods == {"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"}
    assert all(access.grpc_access(m) is not OPEN for m in methods)
    assert access.grpc_access("/loom.v1.Gateway/Predict") == PREDICT
    assert access.grpc_access("/loom.v1.Admin/ListAudit") == READ
    assert access.grpc_access("/loom.v1.Admin/SetTraffic") == ADMIN
    assert access.grpc_access("/inference.GRPCInferenceService/ModelInfer") == PREDICT
    assert access.grpc_access("/inference.GRPCInferenceService/ModelMetadata") == CALLER
    assert access.grpc_access("/inference.GRPCInferenceService/RepositoryModelLoad") == ADMIN


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

    app = web.Application(middlewares=[http_middleware(gate)])
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


def test_forbidden_is_permission_denied() -> None:
    err = Forbidden("no", reason="forbidden", who="ci")
    assert err.code == Code.PERMISSION_DENIED and http_status(err) == 403
    assert grpc_status(err) == grpc.StatusCode.PERMISSION_DENIED


# --- make run's key --------------------------------------------------------------------------------


def test_make_run_keeps_its_key_in_a_private_file(tmp_path: Path) -> None:
    first = dev_api_key(tmp_path, {})
    path = tmp_path / ".loom" / "dev-api-key"
    assert first.path == path and path.read_text().strip() == first.key and first.key.startswith("loom_")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o644)
    again = dev_api_key(tmp_path, {})
    assert again.key == first.key and stat.S_IMODE(path.stat().st_mode) == 0o600  # reused, and made private
    given = dev_api_key(tmp_path, {"LOOM_DEV_API_KEY": " from-the-environment-0123 "})
    assert (given.key, given.origin, given.path) == ("from-the-environment-0123", "LOOM_DEV_API_KEY", None)
    assert given.shell() == "$LOOM_DEV_API_KEY" and again.shell() == f"$(cat {path})"


# --- the gRPC interceptor --------------------------------------------------------------------------


async def test_the_interceptor_refuses_before_reading_and_binds_the_principal() -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_health.v1.health import aio as health_aio

    from services.gateway.access import AuthInterceptor
    from services.gateway.edges import grpc_unary

    predict_key = generate_api_key()
    store = KeyStore([KeyRecord(id="ci", sha256=hash_key(predict_key), roles=frozenset({Role.PREDICT}), tenant="t")])
    fake = FakeAudit()
    gate = Gate(Authenticator(store), FailureAudit(cast(Any, fake), per_source=10, per_second=10))
    seen: list[Principal | None] = []

    async def predict(req: gateway_pb2.PredictRequest, _: Any) -> gateway_pb2.PredictResponse:
        seen.append(auth.current())
        return gateway_pb2.PredictResponse(request_id=req.pipeline)

    server = grpc.aio.server(interceptors=[AuthInterceptor(gate)])
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
