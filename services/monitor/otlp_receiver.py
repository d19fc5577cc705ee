"""OTLP trace receivers: the gRPC TraceService and the OTLP/HTTP ``POST /v1/traces`` handler.

Both decode with :mod:`services.monitor.otlp` and add to one :class:`TraceStore`. Triton exports
OTLP/HTTP with a JSON body; the Python SDK's default exporter speaks gRPC.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from services.common.errors import InvalidArgument, LoomError, ResourceExhausted, http_body, http_status
from services.monitor.otlp import SpanDict, spans_from_json, spans_from_proto
from services.monitor.traces import TraceStore

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024 * 1024
PROTOBUF = "application/x-protobuf"
JSON = "application/json"
_GZIP_MAGIC = b"\x1f\x8b"

Clock = Callable[[], int]
OnSpans = Callable[[list[SpanDict]], None]


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def ingest(
    store: TraceStore, spans: list[SpanDict], clock: Clock, on_spans: OnSpans | None
) -> ExportTraceServiceResponse:
    """Store ``spans``; spans the store had no room for are reported back as OTLP partial success."""
    dropped_before = store.dropped_spans
    store.add(spans, clock())
    if on_spans is not None:
        on_spans(spans)
    reply = ExportTraceServiceResponse()
    rejected = store.dropped_spans - dropped_before
    if rejected:
        reply.partial_success.rejected_spans = rejected
        reply.partial_success.error_message = f"trace span limit ({store.max_spans_per_trace}) reached"
    return reply


#: The full gRPC method name of OTLP's trace export.
EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
_SERVICE, _METHOD = EXPORT_METHOD.rsplit("/", 1)


class TraceReceiver:
    """OTLP/gRPC ``TraceService`` for a ``grpc.aio`` server.

    ``Export`` is registered with a raw-bytes deserializer and parses the request itself: a malformed
    body is the caller's mistake (INVALID_ARGUMENT, saying why), where grpc's own deserializer would
    answer UNKNOWN ("Unexpected DecodeError").
    """

    def __init__(self, store: TraceStore, on_spans: OnSpans | None = None, clock: Clock = wall_ms) -> None:
        self.store = store
        self.on_spans = on_spans
        self.clock = clock

    async def Export(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        try:
            spans = spans_from_proto(ExportTraceServiceRequest.FromString(request))
        except (DecodeError, ValueError, RecursionError) as exc:
            # DecodeError is not a ValueError; protobuf's parser raises RecursionError on absurd nesting.
            message = (
                f"malformed OTLP ExportTraceServiceRequest: {exc}" if not isinstance(exc, ValueError) else str(exc)
            )
            log.debug("rejected an OTLP/gRPC export: %s", message)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
        return ingest(self.store, spans, self.clock, self.on_spans).SerializeToString()

    def add_to_server(self, server: grpc.aio.Server) -> None:
        handler = grpc.unary_unary_rpc_method_handler(self.Export, request_deserializer=None, response_serializer=None)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(_SERVICE.lstrip("/"), {_METHOD: handler}),)
        )


def make_http_handler(
    store: TraceStore,
    on_spans: OnSpans | None = None,
    clock: Clock = wall_ms,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The aiohttp handler for OTLP/HTTP ``POST /v1/traces`` (protobuf or JSON, optionally gzip)."""

    async def otlp_http(request: web.Request) -> web.Response:
        try:
            if request.content_type not in (PROTOBUF, JSON):
                return _error(InvalidArgument(f"unsupported content type {request.content_type!r}"), 415)
            body = _decode(
                await _read(request, max_body_bytes), request.headers.get("Content-Encoding"), max_body_bytes
            )
            if request.content_type == PROTOBUF:
                spans = spans_from_proto(ExportTraceServiceRequest.FromString(body))
            else:
                spans = spans_from_json(json.loads(body))
        except _UnsupportedEncoding as exc:
            return _error(InvalidArgument(str(exc)), 415)
        except LoomError as exc:
            return _error(exc)
        # json.JSONDecodeError is a ValueError; absurdly deep JSON raises RecursionError.
        except (DecodeError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            return _error(InvalidArgument(f"malformed OTLP body: {exc}"))
        reply = ingest(store, spans, clock, on_spans)
        if request.content_type == PROTOBUF:
            return web.Response(body=reply.SerializeToString(), content_type=PROTOBUF)
        return web.json_response(json_format.MessageToDict(reply))

    return otlp_http


class _UnsupportedEncoding(Exception):
    pass


def _error(err: LoomError, status: int | None = None) -> web.Response:
    log.debug("rejected an OTLP/HTTP export: %s", err.message)
    return web.json_response(http_body(err), status=status or http_status(err))


def _too_large(limit: int) -> ResourceExhausted:
    return ResourceExhausted(f"OTLP body larger than {limit} bytes")


async def _read(request: web.Request, limit: int) -> bytes:
    # Read the stream ourselves: request.read() is bounded by the app's client_max_size, not by ours.
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    # aiohttp inflates gzip request bodies as it streams them (auto_decompress), so this also bounds the
    # inflated size.
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
    except web.RequestPayloadError as exc:
        raise InvalidArgument(f"unreadable body: {exc.args[0] if exc.args else exc}") from None
    return b"".join(chunks)


def _decode(body: bytes, encoding: str | None, limit: int) -> bytes:
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding != "gzip":
        raise _UnsupportedEncoding(f"unsupported content encoding {encoding!r}")
    if not body.startswith(_GZIP_MAGIC):
        # aiohttp's server has already inflated it (auto_decompress, its default). Neither a protobuf
        # message nor JSON can start with these two bytes, so the check is unambiguous.
        return body
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        # Bounded, so a small gzip bomb cannot inflate past the limit.
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidArgument(f"malformed gzip body: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise _too_large(limit)
    if not inflater.eof:
        raise InvalidArgument("truncated gzip body")
    return out
