"""Who may call what, on every service: access tables, and the middleware and interceptor that enforce them.

Each service names what its HTTP routes and gRPC methods need in an
:class:`AccessTable` (the gateway's is ``services/gateway/access.py``, the
monitor's ``services/monitor/api.py``); the shared runtime
(``services/common/lifecycle.py``) puts :func:`http_middleware` and
:class:`AuthInterceptor` in front of every port, outermost, with the same
credentials everywhere (:class:`services.common.auth.AuthSettings`).

Only the health checks answer without credentials: ``/healthz``, ``/readyz``
and ``grpc.health.v1.Health``. ``/metrics`` needs the role viewer, like any
other read, unless ``LOOM_AUTH_OPEN_METRICS`` opens it. A route or method
missing from a table is admin-only, so whatever is added later is protected
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
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
from aiohttp import web
from aiohttp.typedefs import Middleware

from services.common import auth, metrics
from services.common.audit import AuditLog
from services.common.auth import (
    API_KEY_HEADER,
    AUTHORIZATION,
    Authenticator,
    AuthError,
    AuthSettings,
    Forbidden,
    Principal,
    Role,
)
from services.common.errors import Code, LoomError, grpc_status, http_body, http_status

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

#: The runtime's own routes and methods, on every service.
HEALTH_HTTP: dict[tuple[str, str], Access] = {("GET", "/healthz"): OPEN, ("GET", "/readyz"): OPEN}
HEALTH_GRPC: dict[str, Access] = {"/grpc.health.v1.Health/Check": OPEN, "/grpc.health.v1.Health/Watch": OPEN}
METRICS = ("GET", "/metrics")

HttpHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class AccessTable:
    """What one service's HTTP routes (method, canonical route) and gRPC methods (``/pkg.Service/Method``) need."""

    http: Mapping[tuple[str, str], Access] = field(default_factory=dict)
    grpc: Mapping[str, Access] = field(default_factory=dict)
    #: Path prefixes whose refusals take KServe's ``{"error": "<message>"}`` shape (the gateway's ``/v2``).
    plain_errors: tuple[str, ...] = ()

    def http_access(self, method: str, route: str) -> Access:
        """What ``method`` on ``route`` (its canonical path, e.g. ``/v2/models/{model}``) needs."""
        return self.http.get(("GET" if method == "HEAD" else method, route), ADMIN)

    def grpc_access(self, method: str) -> Access:
        return self.grpc.get(method, ADMIN)

    def served(self, *, open_metrics: bool = False) -> AccessTable:
        """This table plus the runtime's routes: health open, ``/metrics`` for viewers (or open)."""
        http = {**self.http, **HEALTH_HTTP, METRICS: OPEN if open_metrics else READ}
        return replace(self, http=http, grpc={**self.grpc, **HEALTH_GRPC})

    def plain(self, path: str) -> bool:
        return any(path == p or path.startswith(p + "/") for p in self.plain_errors)


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

    @classmethod
    def from_settings(cls, settings: AuthSettings, audit: AuditLog) -> Gate:
        """The keys file, dev key and JWT keys of ``settings``; a bad keys file fails the start here."""
        authenticator = Authenticator.from_settings(settings)
        if not authenticator.configured:
            log.warning(
                "no credentials are configured (LOOM_AUTH_KEYS_FILE, LOOM_DEV_API_KEY, LOOM_AUTH_JWT_*): "
                "every call except the health checks will be refused"
            )
        failures = FailureAudit(
            audit, per_source=settings.auth_audit_per_source, per_second=settings.auth_audit_per_second
        )
        return cls(authenticator, failures)

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


def _refusal(request: web.Request, err: LoomError, table: AccessTable) -> web.Response:
    body: Any = {"error": err.message} if table.plain(request.path) else http_body(err)
    headers = {}
    if err.code == Code.UNAUTHENTICATED:  # RFC 6750: say which scheme, and whether a token was bad
        bad = isinstance(err, AuthError) and err.reason != "missing"
        headers["WWW-Authenticate"] = 'Bearer realm="loom"' + (', error="invalid_token"' if bad else "")
    return web.json_response(body, status=http_status(err), headers=headers)


def http_middleware(gate: Gate, table: AccessTable) -> Middleware:
    """Checks every request against ``table`` before its handler (and before its body is read)."""

    @web.middleware
    async def authenticate(request: web.Request, handler: HttpHandler) -> web.StreamResponse:
        info = request.match_info
        resource = info.route.resource
        access: Access
        if info.http_exception is not None or resource is None:
            access, what = ANY_ROLE, f"{request.method} {request.path[:200]}"
        else:
            route = resource.canonical
            access, what = table.http_access(request.method, route), f"{request.method} {route}"
        if access is None:  # OPEN
            return await handler(request)
        headers = request.headers
        try:  # before the body is read: a refused caller never gets to send megabytes
            principal = await gate.check(access, what, headers.get(AUTHORIZATION, ""), headers.get(API_KEY_HEADER, ""))
        except AuthError as err:
            gate.failures(err, what, request.remote or "")
            return _refusal(request, err, table)
        token = auth.bind(principal, request.remote or "")
        try:
            return await handler(request)
        finally:
            auth.unbind(token)

    return authenticate


# --- gRPC -----------------------------------------------------------------------------------------


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Puts :class:`Gate` in front of every gRPC method ``table`` does not open.

    Credentials are checked on the call's metadata, before its message is read:
    a refused call gets a request-streaming handler that aborts without reading
    anything, so a caller without credentials cannot make a service take in a
    message of up to its receive limit.
    """

    def __init__(self, gate: Gate, table: AccessTable) -> None:
        self.gate = gate
        self.table = table

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        access = self.table.grpc_access(details.method)
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
                token = auth.bind(principal, source_of(context.peer() or ""))
                try:
                    return await inner(request, context)
                finally:
                    auth.unbind(token)

            return handler._replace(**{kind: call})
    kind = "unary_stream" if handler.unary_stream is not None else "stream_stream"
    inner = getattr(handler, kind)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        auth.bind(principal, source_of(context.peer() or ""))  # each call runs in a task of its own
        result = inner(request, context)
        if hasattr(result, "__aiter__"):
            async for item in result:
                yield item
        else:
            await result

    return handler._replace(**{kind: stream})
