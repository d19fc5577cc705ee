"""Who is calling, and what they may do: API keys, JWT bearer tokens, principals and roles.

A caller proves who it is with ``Authorization: Bearer <API key or JWT>`` or
``x-api-key: <API key>`` (HTTP headers or gRPC metadata, the same names).

- **API keys** are high-entropy random strings (:func:`generate_api_key`). Only
  their sha256 is stored (:class:`KeyRecord`, a JSON keys file), so a leaked
  keys file holds no usable key; a lookup hashes what the caller sent.
- **JWTs** (PyJWT) are HS256 with a shared secret, or RS256 with a PEM public
  key or the keys of a JWKS URL. ``exp`` and ``sub`` are required; issuer and
  audience are checked when configured. Roles come from the ``roles`` claim
  (a list, or a space-separated string), the tenant from ``tenant``.

A verified caller is a :class:`Principal`: a name (the key's id or the JWT's
subject), a tenant and :class:`Role` s. ``admin`` may do everything; what the
other roles allow is each service's access table (``services/common/access.py``
enforces them; ``services/gateway/access.py`` and ``services/monitor/api.py``
hold the tables). Every service authenticates with the same settings
(:class:`AuthSettings`), so one key or JWT works across the mesh.
Failures are typed (:class:`Refused` is UNAUTHENTICATED, :class:`Forbidden`
PERMISSION_DENIED) and carry a short ``reason`` for metrics and the audit log.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import jwt
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from services.common.errors import LoomError, PermissionDenied, Unauthenticated, Unavailable
from services.common.tls import TlsSettings

#: What the audit log names a caller it could not identify.
UNKNOWN = "unknown"
DEV_KEY_ID = "dev"
DEV_TENANT = "dev"
DEFAULT_TENANT = "default"
AUTHORIZATION = "authorization"
API_KEY_HEADER = "x-api-key"
TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
#: A shorter secret makes HS256 tokens guessable offline (RFC 7518 3.2: at least the hash size).
MIN_SECRET_BYTES = 32
MIN_KEY_CHARS = 16


class Role(StrEnum):
    PREDICT = "predict"
    VIEWER = "viewer"
    ADMIN = "admin"


_ROLE_NAMES = frozenset(r.value for r in Role)


@dataclass(frozen=True)
class Principal:
    """A verified caller."""

    name: str
    tenant: str
    roles: frozenset[Role]
    #: How it proved itself: "api-key" or "jwt".
    kind: str

    def may(self, allowed: Iterable[Role]) -> bool:
        """Whether one of its roles is in ``allowed``; ``admin`` may do everything."""
        return Role.ADMIN in self.roles or not self.roles.isdisjoint(allowed)


# --- failures ------------------------------------------------------------------------------------


class AuthError(LoomError):
    """A refusal with what the failure audit needs: a short ``reason`` and who, as far as known."""

    def __init__(self, message: str, *, reason: str, who: str = UNKNOWN, hints: Mapping[str, str] | None = None):
        super().__init__(message)
        self.reason = reason
        self.who = who
        self.hints = dict(hints or {})


class Refused(AuthError, Unauthenticated):
    """No credentials, or ones that prove nothing: UNAUTHENTICATED (HTTP 401)."""


class Forbidden(AuthError, PermissionDenied):
    """A known caller without the role: PERMISSION_DENIED (HTTP 403)."""


class KeysUnavailable(AuthError, Unavailable):
    """The JWKS endpoint did not answer: the token cannot be checked now (UNAVAILABLE, worth a retry)."""


# --- the principal of the request being handled -------------------------------------------------

_CURRENT: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("loom_principal", default=None)


def current() -> Principal | None:
    """The principal of the call being handled in this task (set by the access middleware or interceptor)."""
    return _CURRENT.get()


#: Where the call being handled comes from: the peer's address (HTTP ``request.remote``, gRPC ``context.peer()``).
_SOURCE: contextvars.ContextVar[str] = contextvars.ContextVar("loom_source", default="")


def source() -> str:
    """The peer address of the call being handled in this task ("" outside a call); audit entries carry it."""
    return _SOURCE.get()


Bound = tuple[contextvars.Token[Principal | None], contextvars.Token[str]]


def bind(principal: Principal | None, peer: str = "") -> Bound:
    """Bind the caller and where it calls from to this task; :func:`unbind` with what this returns."""
    return _CURRENT.set(principal), _SOURCE.set(peer)


def unbind(token: Bound) -> None:
    principal, peer = token
    _SOURCE.reset(peer)
    _CURRENT.reset(principal)


# --- API keys ------------------------------------------------------------------------------------


def generate_api_key() -> str:
    """A new API key: 256 random bits, URL-safe, no dots (so it never looks like a JWT)."""
    return "loom_" + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """What a keys file stores for ``key``: its sha256, hex."""
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRecord(BaseModel):
    """One entry of the keys file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=128, pattern=r"^\S+$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    roles: frozenset[Role] = Field(min_length=1)
    tenant: str = Field(DEFAULT_TENANT, pattern=TENANT_PATTERN)

    def principal(self) -> Principal:
        return Principal(self.id, self.tenant, self.roles, "api-key")


class KeyStore:
    """API keys by their sha256."""

    def __init__(self, records: Iterable[KeyRecord] = ()) -> None:
        self._by_hash: dict[str, KeyRecord] = {}
        ids: set[str] = set()
        for rec in records:
            if rec.id in ids:
                raise ValueError(f"API key id {rec.id!r} appears twice")
            if rec.sha256 in self._by_hash:
                raise ValueError(f"API keys {self._by_hash[rec.sha256].id!r} and {rec.id!r} have the same sha256")
            ids.add(rec.id)
            self._by_hash[rec.sha256] = rec

    def __len__(self) -> int:
        return len(self._by_hash)

    @staticmethod
    def load(path: Path) -> list[KeyRecord]:
        """The records of a keys file: a JSON list of ``{"id", "sha256", "roles", "tenant"}``."""
        try:
            doc = json.loads(path.read_text())
        except OSError as exc:
            raise ValueError(f"cannot read the API keys file {path}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise ValueError(f"the API keys file {path} is not JSON: {exc}") from None
        if not isinstance(doc, list):
            raise ValueError(f"the API keys file {path} must hold a JSON list of key records")
        records = []
        for i, item in enumerate(doc):
            try:
                records.append(KeyRecord.model_validate(item))
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                raise ValueError(f"the API keys file {path}: entry {i}: {where}: {first['msg']}") from None
        return records

    def lookup(self, key: str) -> KeyRecord | None:
        # A dict lookup by the hash: timing can tell an attacker about hashes, never about keys.
        return self._by_hash.get(hash_key(key))


# --- JWT -----------------------------------------------------------------------------------------


@dataclass
class JwtVerifier:
    """Checks bearer JWTs against a shared secret (HS256) and/or RSA public keys (RS256: PEM or JWKS)."""

    secret: str = ""
    public_key: str = ""
    jwks_url: str = ""
    issuer: str = ""
    audience: str = ""
    leeway_s: float = 10.0
    _jwks: jwt.PyJWKClient | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.jwks_url:
            self._jwks = jwt.PyJWKClient(self.jwks_url, cache_keys=True, lifespan=300, timeout=5)

    @property
    def configured(self) -> bool:
        return bool(self.secret or self.public_key or self.jwks_url)

    async def _key(self, token: str, alg: str) -> Any:
        """The key for ``alg``; the algorithm is never chosen by the token alone (no alg confusion)."""
        if alg == "HS256" and self.secret:
            return self.secret
        if alg == "RS256" and self._jwks is not None and (not self.public_key or "kid" in _header(token)):
            try:  # urllib underneath, with its own cache: off the event loop
                return (await asyncio.to_thread(self._jwks.get_signing_key_from_jwt, token)).key
            except jwt.PyJWKClientConnectionError as exc:
                raise KeysUnavailable(
                    f"the JWT signing keys cannot be fetched now: {exc}", reason="keys_unavailable"
                ) from None
            except (jwt.PyJWKClientError, jwt.PyJWKError) as exc:
                raise Refused(f"the token's signing key is not known: {exc}", reason="bad_signature") from None
        if alg == "RS256" and self.public_key:
            return self.public_key
        raise Refused(f"tokens signed with {alg!r} are not accepted here", reason="invalid_token")

    async def verify(self, token: str) -> Principal:
        alg = str(_header(token).get("alg", ""))
        key = await self._key(token, alg)
        required = ["exp", "sub", *(["iss"] if self.issuer else []), *(["aud"] if self.audience else [])]
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self.audience or None,
                issuer=self.issuer or None,
                leeway=self.leeway_s,
                # Without a configured audience, "aud" is not ours to judge.
                options={"require": required, "verify_aud": bool(self.audience)},
            )
        except jwt.ExpiredSignatureError:
            # PyJWT checks the signature before the claims: the subject of an expired token is genuine.
            raise Refused("the token has expired", reason="expired", who=_claimed_subject(token)) from None
        except jwt.InvalidSignatureError:
            hints = {"claimed_sub": _claimed_subject(token)}
            raise Refused("the token's signature is not valid", reason="bad_signature", hints=hints) from None
        except jwt.InvalidAudienceError:
            raise Refused("the token is for another audience", reason="wrong_audience") from None
        except jwt.InvalidIssuerError:
            raise Refused("the token is from another issuer", reason="wrong_issuer") from None
        except jwt.InvalidTokenError as exc:
            raise Refused(f"the token is not valid: {exc}", reason="invalid_token") from None
        return _principal(claims)


def _header(token: str) -> dict[str, Any]:
    try:
        return dict(jwt.get_unverified_header(token))
    except jwt.InvalidTokenError:
        raise Refused("the bearer token is malformed", reason="malformed") from None


def _claimed_subject(token: str) -> str:
    """The ``sub`` a token claims, unverified, bounded: for the audit log only."""
    try:
        sub = jwt.decode(token, options={"verify_signature": False}).get("sub")
    except jwt.InvalidTokenError:
        return UNKNOWN
    return sub[:128] if isinstance(sub, str) and sub else UNKNOWN


def _principal(claims: Mapping[str, Any]) -> Principal:
    sub, tenant, raw = claims.get("sub"), claims.get("tenant", DEFAULT_TENANT), claims.get("roles", [])
    if not isinstance(sub, str) or not sub or len(sub) > 256:
        raise Refused("the token's 'sub' must be a non-empty string", reason="invalid_token")
    if not isinstance(tenant, str) or not re.match(TENANT_PATTERN, tenant):
        raise Refused(f"the token's 'tenant' must match {TENANT_PATTERN}", reason="invalid_token", who=sub)
    names = raw.split() if isinstance(raw, str) else raw if isinstance(raw, list) else []
    roles = frozenset(Role(n) for n in names if n in _ROLE_NAMES)
    return Principal(sub, tenant, roles, "jwt")


# --- credentials into a principal ----------------------------------------------------------------


def credentials(authorization: str, api_key: str) -> str:
    """The credential a caller sent: ``Authorization: Bearer X`` first, else ``x-api-key: X``."""
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Refused("the Authorization header must be 'Bearer <API key or JWT>'", reason="malformed")
        return value.strip()
    if api_key.strip():
        return api_key.strip()
    raise Refused(
        "credentials required: send 'Authorization: Bearer <API key or JWT>' or 'x-api-key: <API key>'",
        reason="missing",
    )


class Authenticator:
    """Credentials in, a :class:`Principal` out, or :class:`Refused` saying why not."""

    def __init__(self, keys: KeyStore, jwt_verifier: JwtVerifier | None = None) -> None:
        self.keys = keys
        self.jwt = jwt_verifier if jwt_verifier is not None and jwt_verifier.configured else None

    @property
    def configured(self) -> bool:
        """Whether any credential can pass at all."""
        return len(self.keys) > 0 or self.jwt is not None

    @classmethod
    def from_settings(cls, settings: AuthSettings) -> Authenticator:
        """The keys file, the dev key and the JWT settings; a bad file or key fails the start."""
        records = KeyStore.load(Path(settings.auth_keys_file)) if settings.auth_keys_file else []
        dev = settings.dev_api_key.get_secret_value().strip()
        if dev:
            records.append(
                KeyRecord(id=DEV_KEY_ID, sha256=hash_key(dev), roles=frozenset({Role.ADMIN}), tenant=DEV_TENANT)
            )
        pem = Path(settings.auth_jwt_public_key_file).read_text() if settings.auth_jwt_public_key_file else ""
        verifier = JwtVerifier(
            secret=settings.auth_jwt_secret.get_secret_value(),
            public_key=pem,
            jwks_url=settings.auth_jwt_jwks_url,
            issuer=settings.auth_jwt_issuer,
            audience=settings.auth_jwt_audience,
            leeway_s=settings.auth_jwt_leeway_s,
        )
        return cls(KeyStore(records), verifier)

    async def authenticate(self, authorization: str = "", api_key: str = "") -> Principal:
        token = credentials(authorization, api_key)
        record = self.keys.lookup(token)
        if record is not None:
            return record.principal()
        if token.count(".") == 2:  # header.payload.signature
            if self.jwt is None:
                raise Refused("bearer JWTs are not accepted here (no JWT key is configured)", reason="invalid_token")
            return await self.jwt.verify(token)
        # The hash's first characters let an operator match repeated attempts without the key.
        raise Refused("unknown API key", reason="unknown_key", hints={"key_sha256_prefix": hash_key(token)[:12]})


# --- settings ------------------------------------------------------------------------------------


class AuthSettings(TlsSettings):
    """Authentication settings (``LOOM_AUTH_*``, ``LOOM_DEV_API_KEY``), with TLS's (``LOOM_TLS_*``).

    Every service's settings include them: each one checks credentials on its own ports.
    """

    auth_keys_file: str = Field(
        "",
        description='JSON list of API keys [{"id", "sha256", "roles", "tenant"}]; sha256 is the hex digest of the '
        "key (the key itself is never stored). Read at start.",
    )
    dev_api_key: SecretStr = Field(
        SecretStr(""),
        validation_alias="LOOM_DEV_API_KEY",
        description='An admin API key of tenant "dev" (its id is "dev"); make run sets it. Empty: none.',
    )
    auth_jwt_secret: SecretStr = Field(
        SecretStr(""), description="HS256 shared secret for bearer JWTs (at least 32 bytes). Empty: no HS256."
    )
    auth_jwt_public_key_file: str = Field(
        "", description="PEM file of the RSA public key for RS256 bearer JWTs. Empty: none."
    )
    auth_jwt_jwks_url: str = Field(
        "", description="JWKS URL whose keys verify RS256 bearer JWTs (by kid; cached 5 min). Empty: none."
    )
    auth_jwt_issuer: str = Field("", description="Required 'iss' of bearer JWTs. Empty: not checked.")
    auth_jwt_audience: str = Field("", description="Required 'aud' of bearer JWTs. Empty: not checked.")
    auth_jwt_leeway_s: float = Field(10.0, description="Clock skew allowed when checking 'exp' and 'nbf'.")
    auth_audit_per_source: int = Field(
        5,
        description="Refused calls audited per second per source address; the rest are only counted "
        "(loom_auth_failures_total counts all).",
    )
    auth_audit_per_second: int = Field(50, description="Refused calls audited per second from all sources together.")
    auth_open_metrics: bool = Field(
        False,
        description="Serve /metrics without credentials. Off: a scraper needs the role viewer (Prometheus: "
        "authorization.credentials_file); turn on only where the HTTP port is reachable by the scraper alone.",
    )

    @field_validator("auth_jwt_secret")
    @classmethod
    def _long_secret(cls, secret: SecretStr) -> SecretStr:
        value = secret.get_secret_value()
        if value and len(value.encode()) < MIN_SECRET_BYTES:
            raise ValueError(f"LOOM_AUTH_JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes")
        return secret

    @field_validator("dev_api_key")
    @classmethod
    def _long_key(cls, key: SecretStr) -> SecretStr:
        value = key.get_secret_value().strip()
        if value and len(value) < MIN_KEY_CHARS:
            raise ValueError(f"LOOM_DEV_API_KEY must be at least {MIN_KEY_CHARS} characters (try loomctl keys new)")
        return key
