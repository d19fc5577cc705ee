"""What every gateway adapter does around its handler, written once.

The loom.v1 and the KServe adapters, gRPC and HTTP alike: a SERVER span
continuing the caller's ``traceparent`` and naming the authenticated caller
and its tenant (``enduser.id``, ``loom.tenant``), every failure turned into the
transport's typed error (never a stack trace), the outcome counted; and for
HTTP, bodies read only up to the limit.

Until the gateway is ready (its pipeline specs loaded, its inbox and lane
subscribed) and again while it stops, :class:`NotReadyInterceptor` and
:func:`not_ready_middleware` answer every call but the health checks and
``/metrics`` with UNAVAILABLE "gateway not ready" (HTTP 503, ``Retry-After: 1``):
a retryable refusal, never the NOT_FOUND an empty pipeline registry would give.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from aiohttp import web
from aiohttp.typedefs import Middleware
from google.protobuf.message import DecodeError
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from services.common import auth
from services.common.errors import (
    InvalidArgument,
    LoomError,
    ResourceExhausted,
    Unavailable,
    as_loom_error,
    grpc_status,
    http_status,
)
from services.common.telemetry import extract
from services.gateway.admission import Lane, grpc_lane, http_lane, http_retry_later

_tracer = trace.get_tracer("loom.gateway")
log = logging.getLogger(__name__)

#: A gRPC method's work: the decoded request in, the response message out.
GrpcCall = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
#: Called once per call with (decoded request or None, code, seconds).
GrpcDone = Callable[[Any, str, float], None]
HttpHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: Called once per call with (request, code, seconds).
HttpDone = Callable[[web.Request, str, float], None]


def _tag_caller(span: trace.Span) -> None:
    """The authenticated caller on the SERVER span: who (OpenTelemetry's enduser.id) and its tenant."""
    principal = auth.current()
    if principal is not None:
        span.set_attribute("enduser.id", principal.name)
        span.set_attribute("loom.tenant", principal.tenant)


def grpc_unary(service: str, method: str, request_type: Any, call: GrpcCall, done: GrpcDone | None = None) -> Any:
    """A unary handler taking raw bytes, so a malformed message is INVALID_ARGUMENT with a message."""

    async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        carrier = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        started, code, req = time.perf_counter(), "OK", None
        with _tracer.start_as_current_span(
            f"{service}/{method}",
            context=extract(carrier),
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
        ) as span:
            _tag_caller(span)
            try:
                try:
                    req = request_type.FromString(raw)
                except DecodeError:
                    raise InvalidArgument(f"malformed {request_type.DESCRIPTOR.full_name}") from None
                return bytes((await call(req, context)).SerializeToString())
            except Exception as exc:
                err = as_loom_error(exc)
                code = str(err.code)
                span.set_attribute("rpc.grpc.status_code", grpc_status(err).value[0])
                if not isinstance(exc, LoomError):
                    span.record_exception(exc)
                    log.exception("%s/%s failed", service, method)
                await context.abort(grpc_status(err), err.message)
                raise  # abort raises; this keeps type checkers content
            finally:
                if done is not None:
                    done(req, code, time.perf_counter() - started)

    return grpc.unary_unary_rpc_method_handler(handle, request_deserializer=None, response_serializer=None)


def http_traced(
    handler: HttpHandler, *, render_error: Callable[[LoomError], web.Response], done: HttpDone | None = None
) -> HttpHandler:
    """A SERVER span around ``handler``; any error becomes ``render_error``'s response."""

    async def traced(request: web.Request) -> web.StreamResponse:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else request.path
        started, code = time.perf_counter(), "OK"
        with _tracer.start_as_current_span(
            f"{request.method} {route}",
            context=extract(dict(request.headers)),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": request.method, "url.path": request.path},
        ) as span:
            _tag_caller(span)
            try:
                response = await handler(request)
            except Exception as exc:
                err = as_loom_error(exc)
                code = str(err.code)
                if not isinstance(exc, LoomError):
                    span.record_exception(exc)
                    log.exception("%s %s failed", request.method, request.path)
                response = render_error(err)
            if done is not None:
                done(request, code, time.perf_counter() - started)
            span.set_attribute("http.response.status_code", response.status)
            return response

    return traced


def body_too_large(max_body_bytes: int, max_input_bytes: int, size: int | None = None) -> ResourceExhausted:
    got = f" of {size} bytes" if size is not None else ""
    return ResourceExhausted(
        f"request body{got} exceeds the limit of {max_body_bytes} bytes "
        f"(each file input may be at most {max_input_bytes} bytes)"
    )


async def read_body(request: web.Request, max_body_bytes: int, max_input_bytes: int) -> bytes:
    """The whole body, refused at once on its declared length: never read (or wait for) one we will not take."""
    if request.content_length is not None and request.content_length > max_body_bytes:
        raise body_too_large(max_body_bytes, max_input_bytes, request.content_length)
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise body_too_large(max_body_bytes, max_input_bytes) from None


# --- not ready yet -----------------------------------------------------------------------------------

NOT_READY = "gateway not ready"
#: Static documents, served while not ready too (they need no pipeline specs; their auth still applies).
DOCUMENTS = frozenset({"/openapi.yaml", "/asyncapi.yaml"})
#: Whether the gateway is ready now (the runtime's ready event).
Ready = Callable[[], bool]


def not_ready() -> Unavailable:
    return Unavailable(f"{NOT_READY}: starting or stopping; retry shortly")


class NotReadyInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """UNAVAILABLE for every method but the health checks until ``ready()``; outermost of the gateway's own."""

    def __init__(self, ready: Ready) -> None:
        self.ready = ready

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or self.ready() or grpc_lane(details.method) is Lane.FREE:
            return handler

        async def refuse(_: Any, context: grpc.aio.ServicerContext) -> bytes:
            err = not_ready()
            await context.abort(grpc_status(err), err.message, trailing_metadata=(("retry-after", "1"),))
            raise AssertionError("unreachable: abort raises")

        # Reads nothing of the request: a refusal costs no body.
        return grpc.stream_unary_rpc_method_handler(refuse, request_deserializer=None, response_serializer=None)


def not_ready_middleware(ready: Ready) -> Middleware:
    """HTTP 503 (JSON) for every route but the health checks, ``/metrics`` and the documents until ``ready()``."""

    @web.middleware
    async def guard(request: web.Request, handler: HttpHandler) -> web.StreamResponse:
        info = request.match_info
        resource = info.route.resource
        if ready() or info.http_exception is not None or resource is None:
            return await handler(request)
        if http_lane(request.method, resource.canonical) is Lane.FREE or request.path in DOCUMENTS:
            return await handler(request)
        err = not_ready()
        return http_retry_later(request, err, http_status(err), 1)

    return guard
