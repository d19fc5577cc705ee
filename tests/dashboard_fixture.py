"""Realistic documents for the monitor's dashboard API, shared by the page tests.

``build_dashboard`` returns a ``GET /v1/dashboard`` body (two pipelines, stages, a
model rolling out v2 at 10 %, drift in every band, accuracy, alerts, traces) and
``build_trace`` the ``GET /v1/traces/{id}`` body of the first trace. Values are
deterministic so tests can assert them; only the timestamps follow ``now_ms``.
"""

from __future__ import annotations

import math
import time
from typing import Any

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
REQUEST_ID = "req-7f3a9c2e"
SERVICES = ["gateway", "preprocess", "inference", "triton", "postprocess", "fusion"]
BUCKET_MS = 10_000
POINTS = 30


def _wave(i: int, base: float, swing: float, period: float = 9.0, digits: int = 3) -> float:
    return round(base + swing * math.sin(i / period * 2 * math.pi), digits)


def _series(now_ms: int, rps: float, p50: float, p95: float, p99: float, err: float) -> list[dict[str, Any]]:
    start = now_ms - (POINTS - 1) * BUCKET_MS
    return [
        {
            "t": start + i * BUCKET_MS,
            "rps": _wave(i, rps, rps * 0.2),
            "p50_ms": _wave(i, p50, p50 * 0.1, 7),
            "p95_ms": _wave(i, p95, p95 * 0.15, 7),
            "p99_ms": _wave(i, p99, p99 * 0.2, 7),
            "error_rate": _wave(i, err, err * 0.5, 11, digits=6),
        }
        for i in range(POINTS)
    ]


def _pipeline(name: str, now_ms: int, **kw: Any) -> dict[str, Any]:
    return {
        "pipeline": name,
        "slo": {"latency_p95_ms": kw["slo_p95"], "success": 0.999},
        "window_s": 300,
        "requests": kw["requests"],
        "errors": kw["errors"],
        "error_rate": kw["error_rate"],
        "throughput_rps": kw["rps"],
        "p50_ms": kw["p50"],
        "p95_ms": kw["p95"],
        "p99_ms": kw["p99"],
        "burn_rate": kw["burn"],
        "slo_met": kw["slo_met"],
        "series": _series(now_ms, kw["rps"], kw["p50"], kw["p95"], kw["p99"], kw["error_rate"]),
    }


def _stage(
    pipeline: str, service: str, stage: str, count: int, p50: float, p95: float, errors: int = 0
) -> dict[str, Any]:
    return {
        "pipeline": pipeline,
        "service": service,
        "stage": stage,
        "count": count,
        "errors": errors,
        "mean_ms": round(p50 * 1.15, 3),
        "p50_ms": p50,
        "p95_ms": p95,
        "p99_ms": round(p95 * 1.4, 3),
    }


def _history(now_ms: int, level: float, n: int = 20) -> list[dict[str, Any]]:
    start = now_ms - (n - 1) * 60_000
    return [{"t": start + i * 60_000, "psi": round(level * (0.4 + 0.6 * i / (n - 1)), 4)} for i in range(n)]


def _drift(feature: str, kind: str, psi: float | None, band: str, now_ms: int, version: str = "1") -> dict[str, Any]:
    return {
        "pipeline": "embed",
        "model": "minilm",
        "version": version,
        "feature": feature,
        "kind": kind,
        "psi": psi,
        "band": band,
        "baseline_samples": 0 if psi is None else 5000,
        "window_samples": 740 if psi is not None else 120,
        "history": [] if psi is None else _history(now_ms, psi),
    }


def _accuracy(version: str, samples: int, acc: float, prec: float, rec: float, now_ms: int) -> dict[str, Any]:
    reference = 0.93
    start = now_ms - (POINTS - 1) * 60_000
    return {
        "pipeline": "embed",
        "model": "minilm",
        "version": version,
        "samples": samples,
        "accuracy": acc,
        "precision": prec,
        "recall": rec,
        "reference_accuracy": reference,
        "drop_points": round((reference - acc) * 100, 2),
        "series": [
            {
                "t": start + i * 60_000,
                "accuracy": round(reference - (reference - acc) * i / (POINTS - 1), 4),
                "samples": 40,
            }
            for i in range(POINTS)
        ],
    }


def alert(
    name: str, severity: str, labels: dict[str, str], summary: str, value: float, started_ms: int
) -> dict[str, Any]:
    """One active alert as the monitor reports it."""
    return {
        "id": name + ":" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())),
        "name": name,
        "severity": severity,
        "state": "firing",
        "labels": labels,
        "summary": summary,
        "value": value,
        "started_unix_ms": started_ms,
        "resolved_unix_ms": None,
    }


def _trace_summary(
    trace_id: str, request_id: str, pipeline: str, services: list[str], spans: int, ms: float, start: int, status: str
) -> dict[str, Any]:
    return {
        "trace_id": trace_id,
        "request_id": request_id,
        "pipeline": pipeline,
        "root": f"POST /v1/pipelines/{pipeline}",
        "services": services,
        "span_count": spans,
        "duration_ms": ms,
        "start_unix_ms": start,
        "status": status,
    }


def build_dashboard(now_ms: int | None = None) -> dict[str, Any]:
    """A full ``GET /v1/dashboard`` document around ``now_ms`` (default: now)."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    pipelines = [
        _pipeline(
            "embed",
            now,
            rps=42.5,
            p50=8.4,
            p95=21.7,
            p99=35.2,
            requests=12750,
            errors=13,
            error_rate=0.00102,
            slo_p95=250.0,
            slo_met=True,
            burn={"availability": {"short": 1.02, "long": 0.8}, "latency": {"short": 0.0, "long": 0.1}},
        ),
        _pipeline(
            "content",
            now,
            rps=6.3,
            p50=182.0,
            p95=948.0,
            p99=2410.0,
            requests=1890,
            errors=59,
            error_rate=0.03122,
            slo_p95=1500.0,
            slo_met=False,
            burn={"availability": {"short": 31.2, "long": 15.6}, "latency": {"short": 2.4, "long": 1.1}},
        ),
    ]
    stages = [
        _stage("embed", "gateway", "http", 12750, 8.4, 21.7),
        _stage("embed", "preprocess", "loom.pre.text", 12750, 0.9, 2.1),
        _stage("embed", "inference", "loom.infer.minilm", 12750, 5.2, 14.8),
        _stage("embed", "postprocess", "loom.post.embed", 12748, 0.6, 1.4, errors=2),
        _stage("content", "gateway", "http", 1890, 182.0, 948.0, errors=59),
        _stage("content", "preprocess", "loom.pre.image", 1210, 24.5, 61.0),
        _stage("content", "inference", "loom.infer.ocr", 1210, 96.0, 410.0, errors=31),
        _stage("content", "inference", "loom.infer.vad", 640, 11.2, 30.5),
        _stage("content", "fusion", "loom.fuse", 1890, 1.3, 4.8),
    ]
    versions = [
        _version("minilm", "1", True, 11475, 0.9, 5.1, 14.2, 310.0, 4200.0, None),
        _version("minilm", "2", True, 1275, 0.1, 5.6, 16.9, 295.0, 4650.0, {"stage": "canary", "percent": 10.0}),
        _version("ocr", "1", True, 1210, 1.0, 96.0, 410.0, 8800.0, 71000.0, None),
        _version("vad", "1", False, 640, 1.0, 11.2, 30.5, 120.0, 9400.0, None),
    ]
    drift = [
        _drift("text_length", "input", 0.043, "stable", now),
        _drift("token_count", "input", 0.137, "watch", now),
        _drift("top_score", "output", 0.284, "alert", now, version="2"),
        _drift("image_height", "input", None, "capturing", now),
    ]
    accuracy = [
        _accuracy("1", 1180, 0.918, 0.905, 0.889, now),
        _accuracy("2", 131, 0.847, 0.83, 0.812, now),
    ]
    alerts = [
        alert(
            "LoomDriftHigh",
            "P2",
            {"pipeline": "embed", "model": "minilm", "version": "2", "feature": "top_score"},
            "PSI of top_score on minilm v2 is 0.284 (> 0.2)",
            0.284,
            now - 7 * 60_000,
        ),
        alert(
            "LoomSLOBurn",
            "warning",
            {"pipeline": "content", "slo": "availability"},
            "content burns its availability budget 31.2x (5 m) and 15.6x (1 h)",
            31.2,
            now - 95_000,
        ),
    ]
    traces = [
        _trace_summary(TRACE_ID, REQUEST_ID, "content", SERVICES, 13, 182.4, now - 4_000, "OK"),
        _trace_summary(
            "0af7651916cd43dd8448eb211c80319c",
            "req-51be0d44",
            "embed",
            ["gateway", "preprocess", "inference", "triton", "postprocess"],
            8,
            19.6,
            now - 6_500,
            "OK",
        ),
        _trace_summary(
            "b7ad6b7169203331b7ad6b7169203331",
            "req-c0ffee12",
            "content",
            ["gateway", "preprocess", "inference", "triton"],
            6,
            3012.0,
            now - 11_000,
            "ERROR",
        ),
    ]
    return {
        "generated_unix_ms": now,
        "pipelines": pipelines,
        "stages": stages,
        "models": {
            "triton": {
                "up": True,
                "cpu_utilization": 0.372,
                "gpu_utilization": 0.615,
                "gpu_memory_used_bytes": 3.25 * 2**30,
                "scraped_unix_ms": now - 3_000,
            },
            "versions": versions,
        },
        "drift": drift,
        "accuracy": accuracy,
        "alerts": alerts,
        "traces": traces,
    }


def _version(
    model: str,
    version: str,
    ready: bool | None,
    requests: int,
    share: float,
    p50: float,
    p95: float,
    queue_us: float,
    compute_us: float,
    rollout: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "model": model,
        "version": version,
        "ready": ready,
        "requests": requests,
        "share": share,
        "p50_ms": p50,
        "p95_ms": p95,
        "queue_us_per_request": queue_us,
        "compute_us_per_request": compute_us,
        "rollout": rollout,
    }


# (span_id, parent_id, name, service, kind, start_ms, duration_ms, queue_wait_ms, depth, status, attributes)
_SPANS: list[tuple[str, str | None, str, str, str, float, float, float | None, int, str, dict[str, Any]]] = [
    ("a000000000000001", None, "POST /v1/pipelines/content", "gateway", "SERVER", 0.0, 182.4, None, 0, "OK",
     {"loom.request_id": REQUEST_ID, "loom.pipeline": "content", "http.status_code": 200}),
    ("a000000000000002", "a000000000000001", "publish loom.pre.text", "gateway", "PRODUCER", 0.8, 0.4, None, 1, "OK",
     {"messaging.destination": "loom.pre.text"}),
    ("a000000000000003", "a000000000000002", "loom.pre.text", "preprocess", "CONSUMER", 1.6, 4.1, 0.5, 2, "OK",
     {"loom.tokens": 48}),
    ("a000000000000004", "a000000000000003", "loom.infer.minilm", "inference", "CONSUMER", 6.4, 31.8, 2.1, 3, "OK",
     {"loom.model": "minilm", "loom.version": "2", "loom.batch_size": 4}),
    ("a000000000000005", "a000000000000004", "minilm", "triton", "SERVER", 9.2, 27.6, 1.3, 4, "OK",
     {"triton.model": "minilm", "triton.compute_us": 24100}),
    ("a000000000000006", "a000000000000004", "loom.post.embed", "postprocess", "CONSUMER", 39.0, 3.6, 0.4, 4, "OK",
     {"loom.labels": 3}),
    ("a000000000000007", "a000000000000001", "publish loom.pre.image", "gateway", "PRODUCER", 1.0, 0.5, None, 1, "OK",
     {"messaging.destination": "loom.pre.image"}),
    ("a000000000000008", "a000000000000007", "loom.pre.image", "preprocess", "CONSUMER", 2.2, 27.5, 0.9, 2, "OK",
     {"image.width": 1280, "image.height": 720}),
    ("a000000000000009", "a000000000000008", "loom.infer.ocr", "inference", "CONSUMER", 31.0, 118.0, 12.4, 3, "OK",
     {"loom.model": "ocr", "loom.version": "1"}),
    ("a00000000000000a", "a000000000000009", "ocr_det", "triton", "SERVER", 44.5, 61.0, 3.2, 4, "OK",
     {"triton.model": "ocr_det"}),
    ("a00000000000000b", "a000000000000009", "ocr_rec", "triton", "SERVER", 106.8, 40.7, 1.1, 4, "OK",
     {"triton.model": "ocr_rec", "note": "<b>not html</b>"}),
    ("a00000000000000c", "a000000000000001", "loom.fuse", "fusion", "CONSUMER", 151.0, 29.8, 0.7, 1, "OK",
     {"fusion.parts": 2, "fusion.strategy": "weighted"}),
    ("a00000000000000d", "a00000000000000c", "publish reply", "fusion", "PRODUCER", 180.1, 0.6, None, 2, "OK", {}),
]  # fmt: skip


def build_trace(now_ms: int | None = None) -> dict[str, Any]:
    """The ``GET /v1/traces/{id}`` body of the dashboard's first trace (13 spans, six services)."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    spans = [
        {
            "span_id": sid,
            "parent_id": parent,
            "name": name,
            "service": service,
            "kind": kind,
            "start_ms": start,
            "duration_ms": duration,
            "queue_wait_ms": queue,
            "depth": depth,
            "status": status,
            "attributes": attrs,
        }
        for sid, parent, name, service, kind, start, duration, queue, depth, status, attrs in _SPANS
    ]
    return {
        "trace_id": TRACE_ID,
        "request_id": REQUEST_ID,
        "pipeline": "content",
        "start_unix_ms": now - 4_000,
        "duration_ms": 182.4,
        "services": SERVICES,
        "spans": spans,
    }
