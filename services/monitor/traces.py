"""A bounded in-memory store of recent traces, and their Trace / TraceSummary views.

Spans arrive from any service in any order (and Triton's separately, over OTLP/HTTP), so a trace is
assembled as its spans come in and rebuilt into a tree when read.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

REQUEST_ID_ATTR = "loom.request_id"
PIPELINE_ATTR = "loom.pipeline"

_NS_PER_MS = 1_000_000


@dataclass
class _Trace:
    spans: dict[str, dict[str, Any]] = field(default_factory=dict)
    request_ids: set[str] = field(default_factory=set)
    updated_ms: int = 0


class TraceStore:
    """Recent traces, least recently updated evicted first, with a request-id index."""

    def __init__(self, max_traces: int = 2000, max_spans_per_trace: int = 512, max_spans: int = 100_000) -> None:
        if min(max_traces, max_spans_per_trace, max_spans) < 1:
            raise ValueError("trace store limits must be positive")
        self.max_traces = max_traces
        self.max_spans_per_trace = max_spans_per_trace
        self.max_spans = max_spans
        self.evicted_traces = 0
        self.dropped_spans = 0
        self.duplicate_spans = 0
        self._traces: OrderedDict[str, _Trace] = OrderedDict()
        self._by_request: dict[str, str] = {}
        self._span_count = 0

    @property
    def span_count(self) -> int:
        return self._span_count

    def __len__(self) -> int:
        return len(self._traces)

    def add(self, spans: list[dict[str, Any]], now_ms: int) -> int:
        """Store ``spans`` (internal span dicts); returns how many were kept."""
        kept = 0
        for span in spans:
            trace_id = span["trace_id"]
            trace = self._traces.get(trace_id)
            if trace is None:
                trace = self._traces[trace_id] = _Trace()
            if span["span_id"] in trace.spans:
                self.duplicate_spans += 1
                continue
            if len(trace.spans) >= self.max_spans_per_trace:
                self.dropped_spans += 1
                continue
            trace.spans[span["span_id"]] = span
            self._span_count += 1
            kept += 1
            request_id = (span.get("attributes") or {}).get(REQUEST_ID_ATTR)
            if isinstance(request_id, str) and request_id:
                self._by_request[request_id] = trace_id
                trace.request_ids.add(request_id)
            trace.updated_ms = now_ms
            self._traces.move_to_end(trace_id)
        self._evict()
        return kept

    def get(self, id: str) -> dict[str, Any] | None:
        """The Trace view by trace id or by the caller's request id."""
        trace_id = id if id in self._traces else self._by_request.get(id, id.lower())
        trace = self._traces.get(trace_id)
        if trace is None or not trace.spans:
            return None
        return _trace_view(trace_id, trace)

    def recent(self, limit: int = 20) -> list[dict[str, Any]]:
        """TraceSummary views, most recently updated first."""
        out: list[dict[str, Any]] = []
        for trace_id in reversed(self._traces):
            if len(out) >= limit:
                break
            trace = self._traces[trace_id]
            if trace.spans:
                out.append(_summary(trace_id, trace, _tree(trace.spans)))
        return out

    def _evict(self) -> None:
        while self._traces and (len(self._traces) > self.max_traces or self._span_count > self.max_spans):
            trace_id, trace = self._traces.popitem(last=False)
            self._span_count -= len(trace.spans)
            self.evicted_traces += 1
            for request_id in trace.request_ids:
                # A later trace may have taken the request id over; leave its entry alone.
                if self._by_request.get(request_id) == trace_id:
                    del self._by_request[request_id]


def _tree(spans: dict[str, dict[str, Any]]) -> list[tuple[dict[str, Any], int]]:
    """(span, depth) depth-first, siblings by start time; unknown parents make roots."""

    def order(s: dict[str, Any]) -> tuple[int, str]:
        return (s["start_ns"], s["span_id"])

    children: dict[str, list[dict[str, Any]]] = {}
    roots: list[dict[str, Any]] = []
    for span in spans.values():
        parent = span.get("parent_id")
        if parent and parent in spans and parent != span["span_id"]:
            children.setdefault(parent, []).append(span)
        else:
            roots.append(span)
    out: list[tuple[dict[str, Any], int]] = []
    seen: set[str] = set()

    def walk(starts: list[dict[str, Any]]) -> None:
        stack = [(s, 0) for s in sorted(starts, key=order, reverse=True)]
        while stack:
            span, depth = stack.pop()
            if span["span_id"] in seen:
                continue
            seen.add(span["span_id"])
            out.append((span, depth))
            kids = sorted(children.get(span["span_id"], ()), key=order, reverse=True)
            stack.extend((kid, depth + 1) for kid in kids)

    walk(roots)
    if len(seen) < len(spans):
        # Parent links that form a cycle reach no root; show those spans rather than lose them.
        walk([s for s in spans.values() if s["span_id"] not in seen])
    return out


def _ms(ns: int) -> float:
    return round(ns / _NS_PER_MS, 3)


def _first_attr(ordered: list[tuple[dict[str, Any], int]], key: str) -> Any:
    for span, _ in ordered:
        value = (span.get("attributes") or {}).get(key)
        if value is not None:
            return value
    return None


def _summary(trace_id: str, trace: _Trace, ordered: list[tuple[dict[str, Any], int]]) -> dict[str, Any]:
    start_ns = min(s["start_ns"] for s in trace.spans.values())
    end_ns = max(max(s["end_ns"], s["start_ns"]) for s in trace.spans.values())
    services = list(dict.fromkeys(span["service"] for span, _ in ordered))
    error = any(s["status"] == "ERROR" for s in trace.spans.values())
    return {
        "trace_id": trace_id,
        "request_id": _first_attr(ordered, REQUEST_ID_ATTR),
        "pipeline": _first_attr(ordered, PIPELINE_ATTR),
        "root": ordered[0][0]["name"],
        "services": services,
        "span_count": len(trace.spans),
        "duration_ms": _ms(end_ns - start_ns),
        "start_unix_ms": start_ns // _NS_PER_MS,
        "status": "ERROR" if error else "OK",
    }


def _queue_wait_ms(span: dict[str, Any], spans: dict[str, dict[str, Any]]) -> float | None:
    """Time a message sat in NATS: from the PRODUCER span's end to its CONSUMER child's start."""
    parent = spans.get(span.get("parent_id") or "")
    if span["kind"] != "CONSUMER" or parent is None or parent["kind"] != "PRODUCER":
        return None
    return _ms(max(0, span["start_ns"] - parent["end_ns"]))


def _trace_view(trace_id: str, trace: _Trace) -> dict[str, Any]:
    ordered = _tree(trace.spans)
    view = _summary(trace_id, trace, ordered)
    start_ns = min(s["start_ns"] for s in trace.spans.values())
    view["spans"] = [
        {
            "span_id": span["span_id"],
            "parent_id": span.get("parent_id"),
            "name": span["name"],
            "service": span["service"],
            "replica": span.get("replica"),
            "kind": span["kind"],
            "start_ms": _ms(span["start_ns"] - start_ns),
            "duration_ms": _ms(max(0, span["end_ns"] - span["start_ns"])),
            "queue_wait_ms": _queue_wait_ms(span, trace.spans),
            "depth": depth,
            "status": span["status"],
            "attributes": dict(span.get("attributes") or {}),
        }
        for span, depth in ordered
    ]
    return view
