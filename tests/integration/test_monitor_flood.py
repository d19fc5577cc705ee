"""Floods: the monitor stays within its memory bound, counts what it drops or evicts, and the request path
does not wait for it.

The first test floods the session mesh's monitor with 100,000 telemetry events and, at the same time, with
OTLP spans beyond its trace limit. The second starts a monitor of its own with a tiny telemetry buffer, so
that the NATS client must drop events: the drop counter moves and LoomMonitorDropping fires.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
import urllib.request
from pathlib import Path

import nats
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from services.common.launch.mesh import Mesh
from services.common.pb.loom.v1 import envelope_pb2 as pb
from tests.integration.monitor_helpers import EVAL_S, alerts
from tests.support import TEST_API_KEY, bearer, eventually, http_json, metric, predict_http

pytestmark = pytest.mark.integration

EVENTS = 100_000
FLOOD_S = 10.0  # the 100,000 events are spread over about this long, so requests run during the flood
TRACES, SPANS_PER_TRACE = 3_000, 40  # 120,000 spans: beyond the monitor's 2,000 traces and 100,000 spans
LATENCY_SAMPLES = 50
MEMORY_LIMIT_MB = 512  # LOOM_MONITOR_MEMORY_LIMIT_MB's default, what the buffer limits are sized for


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def latencies_ms(mesh: Mesh, n: int) -> list[float]:
    out = []
    for i in range(n):
        started = time.perf_counter()
        status, body = predict_http(mesh.gateway_http, f"flood check {i}")
        assert status == 200, body
        out.append((time.perf_counter() - started) * 1000)
    return out


def event(i: int, pipeline: str) -> bytes:
    return pb.TelemetryEvent(
        service="flood",
        stage="gateway",
        pipeline=pipeline,
        model="m",
        model_version="1",
        request_id=f"{pipeline}-{i}",
        duration_ms=5.0,
        code="OK",
        timestamp_unix_ms=int(time.time() * 1000),
        outcome="x",
        stats={"a": float(i % 97)},
    ).SerializeToString()


async def flood(url: str, n: int, pipeline: str, spread_s: float, done: threading.Event) -> None:
    """Publish ``n`` telemetry events in chunks of 5,000 spread over ``spread_s`` (0: as fast as possible)."""
    nc = await nats.connect(url, pending_size=64 * 1024 * 1024)
    try:
        chunks = max(1, n // 5000)
        for c in range(chunks):
            started = time.monotonic()
            for i in range(c * 5000, min(n, (c + 1) * 5000)):
                await nc.publish(f"loom.tel.{pipeline}", event(i, pipeline))
            await nc.flush()
            await asyncio.sleep(max(0.0, spread_s / chunks - (time.monotonic() - started)))
    finally:
        await nc.close()
        done.set()


def span_batch(first: int, traces: int) -> bytes:
    """OTLP/HTTP protobuf: ``traces`` traces of SPANS_PER_TRACE spans each (a root and its children)."""
    now_ns = time.time_ns()
    spans = []
    for t in range(first, first + traces):
        trace_id = t.to_bytes(16, "big")
        for s in range(SPANS_PER_TRACE):
            spans.append(
                Span(
                    trace_id=trace_id,
                    span_id=(t * 100 + s + 1).to_bytes(8, "big"),
                    parent_span_id=b"" if s == 0 else (t * 100 + 1).to_bytes(8, "big"),
                    name="flood root" if s == 0 else f"flood child {s}",
                    kind=Span.SPAN_KIND_SERVER if s == 0 else Span.SPAN_KIND_INTERNAL,
                    start_time_unix_nano=now_ns + s * 1000,
                    end_time_unix_nano=now_ns + s * 1000 + 500_000,
                    attributes=[KeyValue(key="loom.request_id", value=AnyValue(string_value=f"span-flood-{t}"))],
                )
            )
    resource = Resource(attributes=[KeyValue(key="service.name", value=AnyValue(string_value="flood"))])
    request = ExportTraceServiceRequest(
        resource_spans=[ResourceSpans(resource=resource, scope_spans=[ScopeSpans(spans=spans)])]
    )
    return request.SerializeToString()


def span_flood(monitor_http: str, done: threading.Event, errors: list[str]) -> None:
    """POST TRACES traces to the monitor's OTLP/HTTP endpoint, 50 traces (2,000 spans) a request."""
    try:
        for first in range(1, TRACES + 1, 50):
            req = urllib.request.Request(
                f"{monitor_http}/v1/traces",
                data=span_batch(first, 50),
                headers={"content-type": "application/x-protobuf", **bearer(TEST_API_KEY)},
            )
            with urllib.request.urlopen(req, timeout=30) as resp:
                if resp.status != 200:
                    errors.append(f"POST /v1/traces: {resp.status}")
    except Exception as exc:  # reported by the test
        errors.append(repr(exc))
    finally:
        done.set()


def test_telemetry_and_span_flood_is_bounded_and_does_not_slow_requests(mesh: Mesh) -> None:
    mon = mesh.monitor_http
    pid = mesh.services["monitor-0"].pid
    assert pid is not None
    latencies_ms(mesh, 5)  # warm
    before_ms = latencies_ms(mesh, LATENCY_SAMPLES + 10)
    rss_before = rss_mb(pid)
    handled_before = metric(mon, "loom_monitor_events_total", service="flood")
    evicted_before = {b: metric(mon, "loom_monitor_evicted_total", buffer=b) for b in ("answers", "traces")}
    dropped_before = metric(mon, "loom_monitor_dropped_total", buffer="telemetry")

    events_done, spans_done = threading.Event(), threading.Event()
    span_errors: list[str] = []
    flooder = threading.Thread(
        target=lambda: asyncio.run(flood(mesh.nats_url, EVENTS, "flood", FLOOD_S, events_done)), daemon=True
    )
    spanner = threading.Thread(target=span_flood, args=(mon, spans_done, span_errors), daemon=True)
    started = time.monotonic()
    flooder.start()
    spanner.start()

    def handled() -> float:
        seen = metric(mon, "loom_monitor_events_total", service="flood") - handled_before
        return seen + metric(mon, "loom_monitor_dropped_total", buffer="telemetry") - dropped_before

    # Requests keep flowing while the monitor works through the flood (NATS holds what it has not read yet).
    during_ms: list[float] = []
    peak = rss_before
    while (not events_done.is_set() or not spans_done.is_set()) and time.monotonic() - started < 120:
        during_ms += latencies_ms(mesh, 3)
        peak = max(peak, rss_mb(pid))
    flooder.join(30)
    spanner.join(30)
    assert events_done.is_set() and spans_done.is_set(), "the flood did not finish"
    assert not span_errors, span_errors
    flood_s = time.monotonic() - started
    eventually(lambda: handled() >= EVENTS, timeout=60, interval=0.5)
    status, body = http_json(f"{mon}/readyz")
    assert status == 200 and body["ready"], body
    peak = max(peak, rss_mb(pid))

    def moved() -> dict[str, float]:
        # The answers store holds 50,000 and the trace store 2,000 traces: the oldest are evicted and counted.
        now = {b: metric(mon, "loom_monitor_evicted_total", buffer=b) - v for b, v in evicted_before.items()}
        lost = metric(mon, "loom_monitor_dropped_total", buffer="telemetry") - dropped_before
        assert now["answers"] + lost >= EVENTS - 50_000, (now, lost)
        assert now["traces"] >= TRACES - 2_000, now
        return now

    evicted = eventually(moved, timeout=EVAL_S + 10)
    kept = {b: metric(mon, "loom_monitor_buffer_items", buffer=b) for b in ("traces", "spans", "answers")}
    limits = {b: metric(mon, "loom_monitor_buffer_limit", buffer=b) for b in kept}
    assert all(0 < kept[b] <= limits[b] for b in kept), (kept, limits)
    seen = metric(mon, "loom_monitor_events_total", service="flood") - handled_before
    before_p50, during_p50 = statistics.median(before_ms), statistics.median(during_ms)
    print(
        f"\nflood: {EVENTS} events + {TRACES * SPANS_PER_TRACE} spans in {flood_s:.1f}s; monitor handled {seen:.0f} "
        f"events, evicted {evicted}, kept {kept} of {limits}; rss {rss_before:.0f} -> peak {peak:.0f} MiB; request p50 "
        f"{before_p50:.1f} ms before ({len(before_ms)}), {during_p50:.1f} ms during ({len(during_ms)}); "
        f"p95 {statistics.quantiles(before_ms, n=20)[-1]:.1f} / {statistics.quantiles(during_ms, n=20)[-1]:.1f} ms"
    )
    assert peak < MEMORY_LIMIT_MB
    # Latency: the request path never waits on telemetry; the flood only competes for the cores.
    assert len(during_ms) >= LATENCY_SAMPLES, len(during_ms)
    assert during_p50 <= 2 * before_p50 + 25, (before_p50, during_p50)


def test_a_full_telemetry_buffer_drops_counts_and_alerts(mesh: Mesh) -> None:
    """A monitor with a 10-event buffer cannot keep up with a burst: the client drops, the monitor counts and alerts."""
    n = 20_000
    overrides = {"LOOM_MONITOR_TELEMETRY_BUFFER": "10", "LOOM_MONITOR_ROLLOUT_ENABLED": "false"}
    _, ports = mesh.start_replica("monitor", "monitor-tiny", overrides=overrides)
    tiny = f"http://127.0.0.1:{ports['http']}"
    try:
        assert metric(tiny, "loom_monitor_dropped_total", buffer="telemetry") == 0
        done = threading.Event()
        asyncio.run(flood(mesh.nats_url, n, "burst", 0.0, done))

        def counted() -> tuple[float, float]:
            seen = metric(tiny, "loom_monitor_events_total", service="flood", pipeline="burst")
            lost = metric(tiny, "loom_monitor_dropped_total", buffer="telemetry")
            assert lost > 0 and seen + lost >= n, (seen, lost)
            return seen, lost

        seen, lost = eventually(counted, timeout=30, interval=0.5)
        found = eventually(
            lambda: alerts(tiny, "LoomMonitorDropping", buffer="telemetry"), timeout=EVAL_S + 10, interval=0.2
        )
        assert found[0]["severity"] == "warning" and found[0]["value"] > 0, found
        status, body = http_json(f"{tiny}/readyz")
        assert status == 200 and body["ready"], body
    finally:
        mesh.stop_replica("monitor-tiny")
    print(f"\nburst of {n} events into a 10-event buffer: handled {seen:.0f}, dropped and counted {lost:.0f}")
