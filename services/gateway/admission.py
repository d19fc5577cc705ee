"""Admission control: the gateway refuses work it cannot take now, at once, rather than queue it.

Two checks stand in front of every data-plane call (whatever the ``predict`` role may call:
predict, submit, results, KServe infer and model metadata, feedback), after authentication:

- **in flight**: at most ``LOOM_GATEWAY_MAX_INFLIGHT`` calls at once. One more is refused,
  never queued: a queue in front of a saturated mesh turns every answer into a late one and
  grows memory, while a refusal lets the caller back off or go elsewhere.
- **per tenant**: the authenticated principal's tenant gets ``LOOM_GATEWAY_TENANT_RATE`` calls
  (``limits`` notation, e.g. ``200/second``), or its own rate from ``LOOM_GATEWAY_TENANT_RATES``;
  a sliding window counter (the ``limits`` library, in memory: O(1) per tenant and per call).

A refusal is RESOURCE_EXHAUSTED: HTTP 429 with ``Retry-After`` (whole seconds), the gateway's
usual error body; gRPC RESOURCE_EXHAUSTED with trailing metadata ``retry-after`` and
``grpc-retry-pushback-ms`` (a gRPC client whose retry policy lists RESOURCE_EXHAUSTED waits
that long). Refusals count in ``loom_admission_rejected_total{reason, tenant}``; the calls in
flight are ``loom_inflight{service="gateway"}``.

Health checks (``/healthz``, ``/readyz``, gRPC health, KServe's live/ready probes) and
``/metrics`` are never limited. Control-plane calls (admin and viewer routes) get a small pool
of their own (``LOOM_GATEWAY_ADMIN_MAX_INFLIGHT``) and no rate: an operator must still get in
while the data plane is saturated, and a runaway admin script must not take the gateway over.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from enum import StrEnum
from functools import lru_cache
from typing import Any

import grpc
from aiohttp import web
from aiohttp.typedefs import Middleware
from limits import RateLimitItem, parse_many
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from services.common import auth, metrics
from services.common.access import Access, HttpHandler
from services.common.auth import UNKNOWN, Role
from services.common.errors import LoomError, ResourceExhausted, http_body
from services.gateway.access import grpc_access, http_access
from services.gateway.settings import GatewaySettings

HTTP_TOO_MANY_REQUESTS = 429
#: What a caller refused for lack of room is told to wait: nothing frees at a known time.
INFLIGHT_RETRY_S = 1.0

_KSERVE = "/inference.GRPCInferenceService/"
#: Never limited besides what the role table opens: /metrics (Prometheus must see an overload) and
#: KServe's probes (callers' routes in the role table, but health checks).
FREE_HTTP = frozenset(
    {
        "/metrics",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{model}/ready",
        "/v2/models/{model}/versions/{version}/ready",
    }
)
FREE_GRPC = frozenset({_KSERVE + "ServerLive", _KSERVE + "ServerReady", _KSERVE + "ModelReady"})


class Lane(StrEnum):
    FREE = "free"  # health checks, /metrics: never limited
    DATA = "data"  # in-flight pool and tenant rates
    CONTROL = "control"  # admin and viewer calls: a small pool of their own


def lane_for(need: Access) -> Lane:
    """Derived from the role table, so a route added there later is limited like its peers."""
    if need is None:
        return Lane.FREE
    return Lane.DATA if Role.PREDICT in need else Lane.CONTROL


@lru_cache(maxsize=512)
def http_lane(method: str, route: str) -> Lane:
    """The lane of ``method`` on a route (its canonical path)."""
    return Lane.FREE if route in FREE_HTTP else lane_for(http_access(method, route))


@lru_cache(maxsize=512)
def grpc_lane(method: str) -> Lane:
    """The lane of a gRPC method (``/package.Service/Method``)."""
    return Lane.FREE if method in FREE_GRPC else lane_for(grpc_access(method))


def retry_after(seconds: float) -> int:
    """``Retry-After`` in whole seconds, at least 1: 0 would invite an immediate retry storm."""
    return max(1, math.ceil(seconds))


class Overloaded(ResourceExhausted):
    """A call refused by admission control: RESOURCE_EXHAUSTED, with when to try again."""

    def __init__(self, message: str, *, reason: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s

    @property
    def retry_after(self) -> int:
        return retry_after(self.retry_after_s)

    @property
    def pushback_ms(self) -> int:
        return max(1, math.ceil(self.retry_after_s * 1000))

    def trailers(self) -> tuple[tuple[str, str], ...]:
        return (("retry-after", str(self.retry_after)), ("grpc-retry-pushback-ms", str(self.pushback_ms)))


def parse_rate(rate: str) -> list[RateLimitItem]:
    """``limits`` notation (``200/second``, ``10 per minute; 1000/hour``); empty: no limit."""
    return parse_many(rate) if rate.strip() else []


class TenantRates:
    """Per-tenant rate limits: one sliding window counter per tenant and limit, in this process's memory."""

    def __init__(self, default: str, overrides: Mapping[str, str] | None = None) -> None:
        self.default = parse_rate(default)
        self.overrides = {tenant: parse_rate(rate) for tenant, rate in (overrides or {}).items()}
        # The async memory storage never waits on anything: a check costs microseconds.
        self.limiter = SlidingWindowCounterRateLimiter(MemoryStorage())

    def limits_for(self, tenant: str) -> list[RateLimitItem]:
        return self.overrides.get(tenant, self.default)

    async def take(self, tenant: str) -> float | None:
        """One call off ``tenant``'s allowance: None if there was room, else the seconds until there may be."""
        items = self.limits_for(tenant)
        for item in items:  # test all first: a refused call spends none of the tenant's other limits
            if not await self.limiter.test(item, tenant):
                return await self._wait(item, tenant)
        for item in items:
            if not await self.limiter.hit(item, tenant):
                return await self._wait(item, tenant)
        return None

    async def _wait(self, item: RateLimitItem, tenant: str) -> float:
        stats = await self.limiter.get_window_stats(item, tenant)
        return max(stats.reset_time - time.time(), 0.0)


class Pool:
    """A hard cap on calls in flight: a slot is taken or refused at once, never waited for."""

    def __init__(self, limit: int, *, gauge: Any = None) -> None:
        self.limit = limit
        self.inflight = 0
        self.gauge = gauge

    @property
    def full(self) -> bool:
        return self.inflight >= self.limit

    def take(self) -> bool:
        if self.full:
            return False
        self.inflight += 1
        if self.gauge is not None:
            self.gauge.inc()
        return True

    def give(self) -> None:
        self.inflight -= 1
        if self.gauge is not None:
            self.gauge.dec()


class Admission:
    """The gateway's admission decisions; the middleware and the interceptor below only adapt them."""

    def __init__(self, *, max_inflight: int, admin_max_inflight: int, rates: TenantRates) -> None:
        self.rates = rates
        self.pools = {
            Lane.DATA: Pool(max_inflight, gauge=metrics.INFLIGHT.labels("gateway")),
            Lane.CONTROL: Pool(admin_max_inflight),
        }

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> Admission:
        rates = TenantRates(settings.tenant_rate, settings.tenant_rates)
        return cls(
            max_inflight=settings.request_max_inflight, admin_max_inflight=settings.admin_max_inflight, rates=rates
        )

    def full(self, lane: Lane) -> bool:
        return self.pools[lane].full

    async def enter(self, lane: Lane, tenant: str) -> Pool:
        """A slot of ``lane``'s pool for one call of ``tenant`` (give it back); :class:`Overloaded` if none."""
        pool = self.pools[lane]
        if pool.full:  # first: a call refused for lack of room spends none of the tenant's rate
            raise self.refusal(lane, "inflight", tenant)
        if lane is Lane.DATA:
            wait = await self.rates.take(tenant)
            if wait is not None:
                raise self.refusal(lane, "rate", tenant, wait)
        if not pool.take():
            raise self.refusal(lane, "inflight", tenant)
        return pool

    def refusal(self, lane: Lane, reason: str, tenant: str, wait: float = INFLIGHT_RETRY_S) -> Overloaded:
        """The refusal, counted."""
        if reason == "rate":
            limit = "; ".join(str(item) for item in self.rates.limits_for(tenant))
            message = f"tenant {tenant!r} is over its rate limit ({limit})"
        else:
            reason = "inflight" if lane is Lane.DATA else "admin_inflight"
            what = "requests" if lane is Lane.DATA else "admin calls"
            message = f"the gateway is at its limit of {self.pools[lane].limit} {what} in flight"
        metrics.ADMISSION_REJECTED.labels(reason, tenant).inc()
        return Overloaded(f"{message}; retry after {retry_after(wait)} s", reason=reason, retry_after_s=wait)


def _tenant() -> str:
    principal = auth.current()  # bound by the authentication middleware or interceptor, outside ours
    return principal.tenant if principal is not None else UNKNOWN


# --- HTTP -----------------------------------------------------------------------------------------


def http_retry_later(request: web.Request, err: LoomError, status: int, retry_after_s: int) -> web.Response:
    """``err`` as JSON with ``Retry-After``: Loom's error body, or KServe's shape under ``/v2``."""
    kserve = request.path == "/v2" or request.path.startswith("/v2/")
    body: Any = {"error": err.message} if kserve else http_body(err)
    return web.json_response(body, status=status, headers={"Retry-After": str(retry_after_s)})


def http_refusal(request: web.Request, err: Overloaded) -> web.Response:
    return http_retry_later(request, err, HTTP_TOO_MANY_REQUESTS, err.retry_after)


def http_middleware(admission: Admission) -> Middleware:
    """Goes after authentication's middleware (which binds the principal), before any body is read."""

    @web.middleware
    async def admit(request: web.Request, handler: HttpHandler) -> web.StreamResponse:
        info = request.match_info
        resource = info.route.resource
        if info.http_exception is not None or resource is None:  # 404/405: nothing to protect
            return await handler(request)
        lane = http_lane(request.method, resource.canonical)
        if lane is Lane.FREE:
            return await handler(request)
        try:
            pool = await admission.enter(lane, _tenant())
        except Overloaded as err:
            return http_refusal(request, err)
        try:
            return await handler(request)
        finally:
            pool.give()

    return admit


# --- gRPC -----------------------------------------------------------------------------------------


class AdmissionInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Admission for gRPC; listed after :class:`~services.gateway.access.AuthInterceptor`.

    Authentication's wrapper then runs around ours, so the tenant is bound when a
    call runs. When the pool is already full as the call arrives, the refusal
    reads nothing (a request-streaming handler that aborts at once, as
    authentication's refusals do); otherwise the slot is taken when the call runs
    and given back when it ends. Response-streaming methods pass unlimited: the
    gateway's data plane has none.
    """

    def __init__(self, admission: Admission) -> None:
        self.admission = admission

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        lane = grpc_lane(details.method)
        if handler is None or lane is Lane.FREE:
            return handler
        if self.admission.full(lane):
            return self._refusal(lane)
        return self._admitted(handler, lane)

    def _refusal(self, lane: Lane) -> grpc.RpcMethodHandler:
        async def refuse(_: Any, context: grpc.aio.ServicerContext) -> bytes:
            await _abort(context, self.admission.refusal(lane, "inflight", _tenant()))
            raise AssertionError("unreachable: abort raises")

        return grpc.stream_unary_rpc_method_handler(refuse, request_deserializer=None, response_serializer=None)

    def _admitted(self, handler: Any, lane: Lane) -> Any:
        kind = "unary_unary" if handler.unary_unary is not None else "stream_unary"
        inner = getattr(handler, kind)
        if inner is None:
            return handler

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                pool = await self.admission.enter(lane, _tenant())
            except Overloaded as err:
                await _abort(context, err)
                raise AssertionError("unreachable: abort raises") from None
            try:
                return await inner(request, context)
            finally:
                pool.give()

        return handler._replace(**{kind: call})


async def _abort(context: grpc.aio.ServicerContext, err: Overloaded) -> None:
    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, err.message, trailing_metadata=err.trailers())
