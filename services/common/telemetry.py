"""Tracing and logging set-up, and W3C trace-context propagation helpers.

Spans go over OTLP/gRPC to ``OTEL_EXPORTER_OTLP_ENDPOINT`` when it is set (the
standard variable, so a real collector needs nothing else), otherwise to the
Loom monitor at ``LOOM_OTLP_ENDPOINT`` (empty: no OTLP), and/or to a JSON-lines
file when ``LOOM_TRACES_FILE`` is set.

PII never leaves a process through either: every exporter is wrapped in
:class:`MaskingSpanExporter` (span attributes, event and link attributes and
the status message go through :func:`services.common.pii.mask`), and the log
handler masks each formatted record (:class:`services.common.pii.MaskingFilter`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Link, Status
from opentelemetry.util.types import Attributes

from services.common.pii import MaskingFilter, mask

TRACEPARENT = "traceparent"


class JsonLinesSpanExporter(SpanExporter):
    """Appends one compact JSON object per finished span to a file."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [json.dumps(span_to_dict(s), separators=(",", ":")) for s in spans]
        with self._lock, open(self._path, "a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def _mask_attributes(attributes: Attributes) -> tuple[Attributes, bool]:
    """(masked attributes, whether any changed); strings and sequences of strings are masked."""
    if not attributes:
        return attributes, False
    out: dict[str, Any] = {}
    changed = False
    for key, value in attributes.items():
        if isinstance(value, str):
            new: Any = mask(value)
        elif isinstance(value, tuple | list) and any(isinstance(v, str) for v in value):
            new = tuple(mask(v) if isinstance(v, str) else v for v in value)
        else:
            new = value
        changed = changed or new != value
        out[key] = new
    return out, changed


def mask_span(span: ReadableSpan) -> ReadableSpan:
    """``span`` with PII masked in its attributes, events, links and status; ``span`` itself when it has none."""
    attributes, changed = _mask_attributes(span.attributes)
    events = []
    for event in span.events:
        event_attributes, event_changed = _mask_attributes(event.attributes)
        changed = changed or event_changed
        events.append(Event(event.name, event_attributes, event.timestamp) if event_changed else event)
    links = []
    for link in span.links:
        link_attributes, link_changed = _mask_attributes(link.attributes)
        changed = changed or link_changed
        links.append(Link(link.context, link_attributes) if link_changed else link)
    status = span.status
    if status.description and mask(status.description) != status.description:
        status, changed = Status(status.status_code, mask(status.description)), True
    if not changed:
        return span
    return ReadableSpan(
        name=span.name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=attributes,
        events=events,
        links=links,
        kind=span.kind,
        status=status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


class MaskingSpanExporter(SpanExporter):
    """Masks PII in each span (:func:`mask_span`) before handing it to ``inner``."""

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self.inner.export([mask_span(s) for s in spans])

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


def span_to_dict(span: ReadableSpan) -> dict[str, Any]:
    ctx = span.get_span_context()
    assert ctx is not None
    parent = span.parent
    return {
        "name": span.name,
        "trace_id": format(ctx.trace_id, "032x"),
        "span_id": format(ctx.span_id, "016x"),
        "parent_id": format(parent.span_id, "016x") if parent else None,
        "kind": span.kind.name,
        "service": span.resource.attributes.get("service.name"),
        "replica": span.resource.attributes.get("service.instance.id"),
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
    }


def setup_tracing(
    service: str,
    *,
    traces_file: str = "",
    replica_id: str = "",
    otlp_endpoint: str = "",
    otlp_credentials: Any = None,
) -> TracerProvider:
    """Install a global tracer provider for ``service`` and return it.

    ``otlp_credentials`` (``grpc.ChannelCredentials``) verify an ``https://`` ``otlp_endpoint``. The
    exporter sends ``OTEL_EXPORTER_OTLP_HEADERS`` (the standard variable) with every export: that is
    where a service's credential for the monitor's span ingest goes.
    """
    attrs: dict[str, Any] = {"service.name": service, "service.namespace": "loom"}
    attrs["service.instance.id"] = replica_id or f"{service}-{os.getpid()}"
    provider = TracerProvider(resource=Resource.create(attrs))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(MaskingSpanExporter(OTLPSpanExporter())))
    elif otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(
            endpoint=otlp_endpoint,
            insecure=otlp_endpoint.startswith("http://"),
            credentials=otlp_credentials,
            timeout=5,
        )
        provider.add_span_processor(BatchSpanProcessor(MaskingSpanExporter(exporter), schedule_delay_millis=500))
    if traces_file:
        file_exporter = MaskingSpanExporter(JsonLinesSpanExporter(traces_file))
        provider.add_span_processor(BatchSpanProcessor(file_exporter, schedule_delay_millis=200))
    trace.set_tracer_provider(provider)
    return provider


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Write the current span's ``traceparent`` into ``headers``."""
    propagate.inject(headers)
    return headers


def extract(headers: Mapping[str, str] | None) -> otel_context.Context:
    return propagate.extract(dict(headers or {}))


def current_trace_id() -> str:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


class _TraceIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.trace_id = current_trace_id() or "-"
        return True


def setup_logging(service: str, level: str, replica_id: str = "") -> None:
    """One stderr handler on the root logger: trace id on every line, PII masked in every record."""
    handler = logging.StreamHandler()
    handler.addFilter(_TraceIdFilter())
    handler.addFilter(MaskingFilter())
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s %(levelname)s {replica_id or service} %(name)s trace=%(trace_id)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
