"""Authentication: keys, JWTs (HS256, RS256, JWKS), roles and the gateway's table.

The middleware, the interceptor and the failure audit every service shares are
tested in tests/unit/test_access.py.
"""

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
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import SecretStr, ValidationError
from tritonclient.grpc import service_pb2

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
from services.gateway.access import ADMIN, CALLER, OPEN, PREDICT, READ
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
    assert {r for r, a in needs.items() if a is OPEN} == {("GET", "/healthz"), ("GET", "/readyz")}
    assert needs[("GET", "/metrics")] == READ  # a viewer's key scrapes it (LOOM_AUTH_OPEN_METRICS opens it)
    admin_only = {r for r, a in needs.items() if a == ADMIN}
    assert ("PUT", "/v1/pipelines/{pipeline}") in admin_only
    dead_letters = {p for _, p in served if p.startswith("/v1/admin/dlq")}  # inputs of callers: admin reads them
    assert {p for m, p in admin_only if p.startswith("/v1/admin")} == {
        p for m, p in served if p.startswith("/v1/admin") and m != "GET"
    } | dead_letters
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
    assert set(access.GRPC) <= methods  # no stale entries
    assert all(access.grpc_access(m) is not OPEN for m in methods)
    assert access.grpc_access("/grpc.health.v1.Health/Check") is OPEN  # added by the runtime
    assert access.grpc_access("/loom.v1.Gateway/Predict") == PREDICT
    assert access.grpc_access("/loom.v1.Admin/ListAudit") == READ
    assert access.grpc_access("/loom.v1.Admin/SetTraffic") == ADMIN
    assert access.grpc_access("/inference.GRPCInferenceService/ModelInfer") == PREDICT
    assert access.grpc_access("/inference.GRPCInferenceService/ModelMetadata") == CALLER
    assert access.grpc_access("/inference.GRPCInferenceService/RepositoryModelLoad") == ADMIN


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
