"""Who may call what on the gateway: the one role table, and the middleware and interceptor that enforce it.

Every HTTP route and gRPC method needs credentials except the health checks
(``/healthz``, ``/readyz``, ``grpc.health.v1.Health``) and ``/metrics``, which
Prometheus scrapes (the gateway's port is an internal one). A route or method
missing from the table is admin-only, so whatever is added later is protected
until someone decides otherwise. Unrouted paths need a caller with any role,
who then gets the 404 or 405: nobody learns the routes without credentials.

A refusal is UNAUTHENTICATED (401, ``WWW-Authenticate: Bearer``) or
PERMISSION_DENIED (403). Each one is counted in ``loom_auth_failures_total``
and appended to the audit log (:class:`FailureAudit`), as many as the rate
limits allow, so a flood of bad calls cannot flood the audit stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from aiohttp import web
from aiohttp.typedefs import Middleware

from services.common import auth, metrics
from services.common.audit import AuditLog
from services.common.auth import API_KEY_HEADER, AUTHORIZATION, Authenticator, AuthError, Forbidden, Principal, Role
from services.common.errors import Code, LoomError, grpc_status, http_body, http_status
from services.gateway.edges import HttpHandler

log = logging.getLogger(__name__)

#: What a route needs: the roles that may call it (admin always may), or OPEN (no credentials).
Access = frozenset[Role] | None
OPEN: Access = None
PREDICT = frozenset({Role.PREDICT})
READ = frozenset({Role.VIEWER})
#: Reads that a data-plane client needs as much as an operator (model metadata, readiness).
CALLER = frozenset({Role.PREDICT, Role.VIEWER})
ADMIN = frozenset({Role.ADMIN})
ANY_ROLE = frozenset(Role)

# --- the table ------------------------------------------------------------------------------------

HTTP: dict[tuple[str, str], Access] = {
    ("GET", "/healthz"): OPEN,
    ("GET", "/readyz"): OPEN,
    ("GET", "/metrics"): OPEN,
    ("GET", "/openapi.yaml"): CALLER,
    ("POST", "/v1/pipelines/{pipeline}:predict"): PREDICT,
    ("GET", "/v1/pipelines"): READ,
    ("GET", "/v1/pipelines/{pipeline}"): READ,
    ("POST", "/v1/feedback"): PREDICT,
    ("GET", "/v1/admin/models"): READ,
    ("GET", "/v1/admin/models/{model}"): READ,
    ("GET", "/v1/admin/models/{model}/rollout"): READ,
    ("GET", "/v1/admin/audit"): READ,
    ("GET", "/v2"): CALLER,
    ("GET", "/v2/health/live"): CALLER,
    ("GET", "/v2/health/ready"): CALLER,
    ("GET", "/v2/models/{model}"): CALLER,
    ("GET", "/v2/models/{model}/versions/{version}"): CALLER,
    ("GET", "/v2/models/{model}/ready"): CALLER,
    ("GET", "/v2/models/{model}/versions/{version}/ready"): CALLER,
    ("POST", "/v2/models/{model}/infer"): PREDICT,
    ("POST", "/v2/models/{model}/versions/{version}/infer"): PREDICT,
    ("POST", "/v2/repository/index"): CALLER,
}

_KSERVE = "/inference.GRPCInferenceService/"
GRPC: dict[str, Access] = {
    "/grpc.health.v1.Health/Check": OPEN,
    "/grpc.health.v1.Health/Watch": OPEN,
    "/loom.v1.Gateway/Predict": PREDICT,
    "/loom.v1.Admin/ListModels": READ,
    "/loom.v1.Admin/GetModel": READ,
    "/loom.v1.Admin/GetRollout": READ,
    "/loom.v1.Admin/ListAudit": READ,
    **{_KSERVE + m: CALLER for m in ("ServerLive", "ServerReady", "ServerMetadata", "ModelReady", "ModelMetadata")},
    _KSERVE + "RepositoryIndex": CALLER,
    _KSERVE + "ModelInfer": PREDICT,
}


def http_access(method: str, route: str) -> Access:
    """What ``method`` on the route ``route`` (its canonical path, e.g. ``/v2/models/{model}``) needs."""
    return HTTP.get(("GET" if method == "HEAD" else method, route), ADMIN)


def grpc_access(method: str) -> Access:
    """What a gRPC method (``/package.Service/Method``) needs."""
    return GRPC.get(method, ADMIN)


# --- refusals, counted and audited ----------------------------------------------------------------


def source_of(peer: str) -> str:
    """The address part of a peer: ``ipv4:10.0.0.7:5312`` and ``10.0.0.7`` are one source."""
    kind, sep, rest = peer.partition(":")
    if not sep or kind not in ("ipv4", "ipv6"):
        return peer
    host = rest.rsplit(":", 1)[0]
    return host.strip("[]")


class FailureAudit:
    """Writes refusals to the audit log: at most ``per_source`` a second from one source, ``per_second`` in all.

    Counting windows are whole seconds. The audit write runs in the background,
    so a refusal never waits for JetStream; the rest are counted only.
    """

    def __init__(
        self, audit: AuditLog, *, per_source: int, per_second: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.audit = audit
        self.per_source = per_source
        self.per_second = per_second
        self.clock = clock
        self._window = -1
        self._total = 0
        self._counts: dict[str, int] = {}  # this window's sources: at most per_second of them
        self._tasks: set[asyncio.Task[None]] = set()

    def allow(self, source: str) -> bool:
        window = int(self.clock())
        if window != self._window:
            self._window, self._total, self._counts = window, 0, {}
        seen = self._counts.get(source, 0)
        if self._total >= self.per_second or seen >= self.per_source:
            return False
        self._counts[source] = seen + 1
        self._total += 1
        return True

    def __call__(self, err: AuthError, what: str, peer: str) -> None:
        metrics.AUTH_FAILURES.labels(err.reason).inc()
        if not self.allow(source_of(peer)):
            metrics.AUTH_AUDIT_SUPPRESSED.inc()
            return
        task = asyncio.get_running_loop().create_task(self._append(err, what, peer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _append(self, err: AuthError, what: str, peer: str) -> None:
        action = "auth.permission_denied" if isinstance(err, Forbidden) else "auth.unauthenticated"
        details = {"reason": err.reason, "message": err.message, **err.hints}
        try:
            await self.audit.append(action, actor=err.who, target=what, result="refused", details=details, source=peer)
        except Exception as exc:  # the stream is not there yet, or NATS is down: the metric still counts it
            log.warning("audit entry %s for %s from %s could not be written: %s", action, what, peer, exc)


class Gate:
    """Authenticates a call and checks its roles; the adapters hand every refusal to ``failures``."""

    def __init__(self, authenticator: Authenticator, failures: FailureAudit) -> None:
        self.authenticator = authenticator
        self.failures = failures

    async def check(self, access: frozenset[Role], what: str, authorization: str, api_key: str) -> Principal:
        """The caller, if it may call ``what``; :class:`AuthError` otherwise (not yet audited)."""
        principal = await self.authenticator.authenticate(authorization, api_key)
        if not principal.may(access):
            has = ", ".join(sorted(principal.roles)) or "none"
            needs = " or ".join(sorted({*access, Role.ADMIN}))
            raise Forbidden(
                f"{principal.name!r} (roles: {has}) may not call {what}: it needs the role {needs}",
                reason="forbidden",
                who=principal.name,
                hints={"tenant": principal.tenant},
            )
        return principal


# --- HTTP -----------------------------------------------------------------------------------------


def _refusal(request: web.Request, err: LoomError) -> web.Response:
    kserve = request.path == "/v2" or request.path.startswith("/v2/")
    body: Any = {"error": err.message} if kserve else http_body(err)  # KServe's error shape under /v2
    headers = {}
    if err.code == Code.UNAUTHENTICATED:  # RFC 6750: say which scheme, and whether a token was bad
        bad = isinstance(err, AuthError) and err.reason != "missing"
        headers["WWW-Authenticate"] = 'Bearer realm="loom"' + (', error="invalid_token"' if bad else "")
    return web.json_response(body, status=http_status(err), headers=headers)


def http_middleware(gate: Gate) -> Middleware:
    @web.middleware
    async def authenticate(request: web.Request, handler: HttpHandler) -> web.StreamResponse:
        info = request.match_info
        resource = info.route.resource
        access: Access
        if info.http_exception is not None or resource is None:
            access, what = ANY_ROLE, f"{request.method} {request.path[:200]}"
        else:
            access, what = http_access(request.method, resource.canonical), f"{request.method} {resource.canonical}"
        if access is None:  # OPEN
            return await handler(request)
        headers = request.headers
        try:  # before the body is read: a refused caller never gets to send megabytes
            principal = await gate.check(access, what, headers.get(AUTHORIZATION, ""), headers.get(API_KEY_HEADER, ""))
        except AuthError as err:
            gate.failures(err, what, request.remote or "")
            return _refusal(request, err)
        token = auth.bind(principal)
        try:
            return await handler(request)
        finally:
            auth.unbind(token)

    return authenticate


# --- gRPC -----------------------------------------------------------------------------------------


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Puts :class:`Gate` in front of every gRPC method the table does not open.

    Credentials are checked on the call's metadata, before its message is read:
    a refused call gets a request-streaming handler that aborts without reading
    anything, so a caller without credentials cannot make the gateway take in
    a message of up to ``max_body_bytes``.
    """

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        access = grpc_access(details.method)
        if handler is None or access is None:  # OPEN; unknown methods answer UNIMPLEMENTED, revealing nothing
            return handler
        meta = {k: v for k, v in details.invocation_metadata or () if isinstance(v, str)}
        try:
            principal = await self.gate.check(
                access, details.method, meta.get(AUTHORIZATION, ""), meta.get(API_KEY_HEADER, "")
            )
        except AuthError as err:
            return self._refusal(err, details.method)
        return _bound(handler, principal)

    def _refusal(self, err: AuthError, method: str) -> grpc.RpcMethodHandler:
        async def refuse(_: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
            self.gate.failures(err, method, context.peer() or "")
            await context.abort(grpc_status(err), err.message)
            raise AssertionError("unreachable: abort raises")

        return grpc.stream_unary_rpc_method_handler(refuse, request_deserializer=None, response_serializer=None)


def _bound(handler: Any, principal: Principal) -> Any:
    """``handler`` with ``principal`` bound while it runs, for its span and its audit entries."""
    for kind in ("unary_unary", "stream_unary"):
        inner = getattr(handler, kind)
        if inner is not None:

            async def call(request: Any, context: grpc.aio.ServicerContext, inner: Any = inner) -> Any:
                token = auth.bind(principal)
                try:
                    return await inner(request, context)
                finally:
                    auth.unbind(token)

            return handler._replace(**{kind: call})
    kind = "unary_stream" if handler.unary_stream is not None else "stream_stream"
    inner = getattr(handler, kind)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        auth.bind(principal)  # each call runs in a task of its own: nothing else sees it
        result = inner(request, context)
        if hasattr(result, "__aiter__"):
            async for item in result:
                yield item
        else:
            await result

    return handler._replace(**{kind: stream})
