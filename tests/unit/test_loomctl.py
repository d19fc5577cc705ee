"""loomctl: the renderer, its options, and the client against a small HTTP server on loopback."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tools.loomctl import render
from tools.loomctl.__main__ import main

pytestmark = pytest.mark.unit

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def span(
    sid: str, parent: str | None, service: str, name: str, depth: int, start: float, dur: float, **kw: Any
) -> dict[str, Any]:
    return {
        "span_id": sid,
        "parent_id": parent,
        "name": name,
        "service": service,
        "kind": kw.get("kind", "INTERNAL"),
        "start_ms": start,
        "duration_ms": dur,
        "queue_wait_ms": kw.get("queue"),
        "depth": depth,
        "status": kw.get("status", "OK"),
        "attributes": {},
    }


TRACE: dict[str, Any] = {
    "trace_id": TRACE_ID,
    "request_id": "content-01",
    "pipeline": "content",
    "start_unix_ms": 1_767_225_600_000,  # 2026-01-01 00:00:00 UTC
    "duration_ms": 120.0,
    "services": ["gateway", "preprocess", "inference", "triton", "postprocess", "fusion"],
    "spans": [
        span("a1", None, "gateway", "POST /v1/pipelines/{pipeline}:predict", 0, 0.0, 120.0, kind="SERVER"),
        span("a2", "a1", "gateway", "publish loom.pre.text", 1, 1.0, 0.5, kind="PRODUCER"),
        span("a3", "a2", "preprocess", "loom.pre.text process", 2, 4.0, 10.0, kind="CONSUMER", queue=2.5),
        span("a4", "a3", "inference", "loom.infer.minilm process", 3, 40.0, 50.0, kind="CONSUMER", queue=25.0),
        span("a5", "a4", "triton", "minilm infer", 4, 45.0, 40.0, kind="SERVER", queue=3.0),
        span("a6", "a4", "postprocess", "loom.post.embed process", 4, 92.0, 8.0, status="ERROR"),
        span("a7", "a1", "fusion", "loom.fuse.2 collect", 1, 101.0, 15.0, kind="CONSUMER", queue=0.4),
    ],
}

ALERTS: list[dict[str, Any]] = [
    {
        "id": "r1",
        "name": "LoomDriftHigh",
        "severity": "P2",
        "state": "resolved",
        "labels": {"pipeline": "content", "feature": "topic"},
        "summary": "PSI 0.31 on topic",
        "value": 0.31,
        "started_unix_ms": 1_000_000,
        "resolved_unix_ms": 1_240_000,
    },
    {
        "id": "f1",
        "name": "LoomSLOBurn",
        "severity": "warning",
        "state": "firing",
        "labels": {"pipeline": "embed", "slo": "latency"},
        "summary": "burn 20x",
        "value": 20.0,
        "started_unix_ms": 1_270_000,
        "resolved_unix_ms": None,
    },
    {
        "id": "f2",
        "name": "LoomModelUnavailable",
        "severity": "P1",
        "state": "firing",
        "labels": {"model": "ocr", "version": "1"},
        "summary": "ocr v1 is not READY",
        "value": 0.0,
        "started_unix_ms": 1_000_000,
        "resolved_unix_ms": None,
    },
]
NOW_MS = 1_300_000.0


def span_lines(lines: list[str]) -> list[str]:
    start = next(i for i, line in enumerate(lines) if line.startswith("SPAN"))
    return lines[start + 1 :]


# --- renderer -----------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [100, 160])
def test_waterfall_lists_every_span_in_tree_order_within_the_width(width: int) -> None:
    lines = render.waterfall(TRACE, width)
    header = "\n".join(lines[:6])
    for part in (TRACE_ID, "content-01", "content", "120.00 ms", "7 spans", "1 failed", "2026-01-01 00:00:00.000 UTC"):
        assert part in header
    assert "gateway, preprocess, inference, triton, postprocess, fusion" in header
    rows = span_lines(lines)
    assert len(rows) == len(TRACE["spans"])
    for row, s in zip(rows, TRACE["spans"], strict=True):
        label = row.lstrip()
        assert label.startswith(s["service"] + "  " + s["name"][:8])  # long names are clipped, never dropped
        assert width < 160 or s["name"] in row
        assert len(row) - len(label) == 2 * s["depth"]  # indentation grows with depth
        assert len(row) <= width and row.endswith("|")
        bar = row[row.index("|") + 1 : -1]
        assert render.BAR in bar and set(bar) <= {" ", render.BAR, render.QUEUE}
    assert all(len(line) <= width for line in lines)
    assert "[ERROR]" in rows[5] and "[ERROR]" not in rows[4]


def test_waterfall_places_bars_by_time_and_draws_the_queue_wait_before_them() -> None:
    rows = span_lines(render.waterfall(TRACE, 120))
    bars = [row[row.index("|") + 1 : -1] for row in rows]
    root, _, pre, infer, _, _, fusion = bars
    assert root.strip(" ") == render.BAR * len(root)  # the root spans the whole trace
    assert pre.index(render.BAR) < infer.index(render.BAR) < fusion.index(render.BAR)
    queued = infer.strip(" ")
    assert queued.startswith(render.QUEUE) and render.QUEUE + render.BAR in queued
    assert queued.count(render.QUEUE) >= 0.2 * len(infer)  # 25 ms of 120
    assert "25.00" in rows[3] and render.QUEUE not in bars[1]  # no wait reported: nothing drawn, column blank
    assert rows[1].split("|")[0].rstrip().endswith("0.50")


def test_bar_clamps_and_always_draws_something() -> None:
    assert render.bar(0, 0, 0, 100, 10) == render.BAR + " " * 9
    assert render.bar(99.9, 0.01, 0, 100, 10) == " " * 9 + render.BAR
    assert render.bar(50, 10, 0.1, 100, 10) == " " * 4 + render.QUEUE + render.BAR + " " * 4
    assert render.bar(0, 5, 0, 0, 4) == render.BAR + " " * 3  # an empty trace does not divide by zero


def test_alerts_table_orders_firing_by_severity_with_relative_times() -> None:
    lines = render.alerts_table(ALERTS, NOW_MS)
    assert lines[0].split() == ["SEVERITY", "NAME", "STATE", "LABELS", "SUMMARY", "SINCE", "RESOLVED"]
    assert [line.split()[1] for line in lines[1:]] == ["LoomModelUnavailable", "LoomSLOBurn", "LoomDriftHigh"]
    assert "model=ocr,version=1" in lines[1] and "5m00s ago" in lines[1] and lines[1].endswith("-")
    assert "30s ago" in lines[2]
    assert "feature=topic,pipeline=content" in lines[3] and lines[3].endswith("1m00s ago")


def test_drift_table_sorts_worst_first_and_shows_missing_psi() -> None:
    features: list[dict[str, Any]] = [
        {"pipeline": "embed", "model": "minilm", "version": "1", "feature": "norm", "kind": "input", "psi": 0.01,
         "band": "stable", "baseline_samples": 500, "window_samples": 200},
        {"pipeline": "content", "model": "minilm", "version": "2", "feature": "topic", "kind": "output", "psi": 0.3127,
         "band": "alert", "baseline_samples": 500, "window_samples": 120},
        {"pipeline": "embed", "model": "minilm", "version": "2", "feature": "len", "kind": "input", "psi": None,
         "band": "capturing", "baseline_samples": 10, "window_samples": 0},
    ]  # fmt: skip
    lines = render.drift_table(features)
    assert lines[0].split()[:7] == ["PIPELINE", "MODEL", "VERSION", "FEATURE", "KIND", "PSI", "BAND"]
    assert lines[1].split() == ["content", "minilm", "2", "topic", "output", "0.313", "alert", "120/500"]
    assert lines[2].split()[5:7] == ["0.010", "stable"]
    assert lines[3].split()[5:7] == ["-", "capturing"]


def test_accuracy_table_and_pretty_json() -> None:
    rows = [{"pipeline": "content", "model": "minilm", "version": "1", "samples": 40, "accuracy": 0.875,
             "precision": 0.9, "recall": None, "reference_accuracy": 0.95, "drop_points": 7.5}]  # fmt: skip
    lines = render.accuracy_table(rows)
    assert lines[1].split() == ["content", "minilm", "1", "40", "87.5%", "90.0%", "-", "95.0%", "7.5"]
    doc = {"request_id": "r", "outputs": {"text": {"embedding": [0.1, 0.2, 0.3]}}, "topics": [{"label": "x"}]}
    text = render.pretty_json(doc)
    assert json.loads(text) == doc and '"embedding": [0.1, 0.2, 0.3]' in text


def test_ago() -> None:
    assert [render.ago(x) for x in (-5, 999, 42_000, 185_000, 7_620_000, 3 * 86_400_000 + 3_600_000)] == [
        "0s",
        "0s",
        "42s",
        "3m05s",
        "2h07m",
        "3d01h",
    ]


# --- options ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["trace"],
        ["feedback", "content", "r1"],
        ["feedback", "content", "r1", "--correct", "--wrong"],
        ["--timeout", "soon", "status"],
        ["--timeout", "0", "status"],
        ["trace", "abc", "--wait", "-1"],
        ["predict", "embed", "--timeout-ms", "-5", "--text", "hi"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "usage: loomctl" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--monitor", "localhost:8090", "alerts"], "--monitor must be an http:// or https:// URL"),
        (["predict", "embed"], "give at least one input"),
        (["predict", "embed", "oops"], "expected name=value"),
        (["predict", "embed", "--text", "a", "text=b"], "'text' given twice"),
        (["predict", "content", "--file", "image=/nonexistent/x.png"], "cannot read /nonexistent/x.png"),
    ],
)
def test_bad_values_exit_2_with_a_message(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("status", "predict", "models", "trace", "alerts", "feedback", "drift", "accuracy"):
        assert name in out


# --- the client against a server ----------------------------------------------------------------

Route = tuple[int, Any] | Callable[[], tuple[int, Any]]


@dataclass
class FakeServer:
    url: str
    routes: dict[tuple[str, str], Route]
    calls: list[tuple[str, str, Any]] = field(default_factory=list)


@pytest.fixture
def server() -> Iterator[FakeServer]:
    """One server playing both the gateway and the monitor (their routes do not overlap)."""
    routes: dict[tuple[str, str], Route] = {}
    calls: list[tuple[str, str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, method: str) -> None:
            size = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(size) if size else b""
            calls.append((method, self.path, json.loads(raw) if raw else None))
            route = routes.get((method, self.path.split("?")[0]))
            if route is None:
                status, body = 404, {"error": {"code": "NOT_FOUND", "message": f"no such thing: {self.path}"}}
            else:
                status, body = route() if callable(route) else route
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._answer("GET")

        def do_POST(self) -> None:
            self._answer("POST")

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield FakeServer(f"http://127.0.0.1:{httpd.server_address[1]}", routes, calls)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture(autouse=True)
def _columns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "120")
    monkeypatch.delenv("LOOM_GATEWAY_URL", raising=False)
    monkeypatch.delenv("LOOM_MONITOR_URL", raising=False)


def test_trace_prints_the_waterfall(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    server.routes[("GET", "/v1/traces/abc")] = (200, TRACE)
    assert main(["--monitor", server.url, "trace", "abc"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = span_lines(out)
    assert [r.split()[0] for r in rows] == [s["service"] for s in TRACE["spans"]]
    assert all(len(line) <= 120 for line in out)
    assert main(["trace", "abc", "--json", "--monitor", server.url]) == 0  # global options after the command too
    assert json.loads(capsys.readouterr().out) == TRACE


def test_trace_not_found_shows_the_api_message(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--monitor", server.url, "trace", "missing"]) == 1
    err = capsys.readouterr().err
    assert "HTTP 404 NOT_FOUND: no such thing: /v1/traces/missing" in err and "--wait" in err


def test_trace_wait_retries_until_it_appears(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    answers = iter([(404, {"error": {"code": "NOT_FOUND", "message": "not yet"}})] * 2)
    server.routes[("GET", "/v1/traces/late")] = lambda: next(answers, (200, TRACE))
    assert main(["--monitor", server.url, "trace", "late", "--wait", "5"]) == 0
    assert TRACE_ID in capsys.readouterr().out
    assert len([c for c in server.calls if c[1] == "/v1/traces/late"]) == 3


def test_alerts_active_and_all(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    server.routes[("GET", "/v1/alerts")] = (200, {"alerts": ALERTS})
    assert main(["--monitor", server.url, "alerts"]) == 0
    out = capsys.readouterr().out
    assert "LoomModelUnavailable" in out and "SEVERITY" in out
    assert main(["--monitor", server.url, "alerts", "--all"]) == 0
    assert [c[1] for c in server.calls] == ["/v1/alerts?state=active", "/v1/alerts?state=all"]
    server.routes[("GET", "/v1/alerts")] = (200, {"alerts": []})
    capsys.readouterr()
    assert main(["--monitor", server.url, "alerts"]) == 0
    assert capsys.readouterr().out.strip() == "no active alerts"


def test_feedback_posts_to_the_gateway(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    server.routes[("POST", "/v1/feedback")] = (202, {"accepted": True})
    assert main(["--gateway", server.url, "feedback", "content", "content-01", "--label", "sports"]) == 0
    assert main(["--gateway", server.url, "feedback", "content", "content-02", "--wrong"]) == 0
    assert "content/content-01: accepted" in capsys.readouterr().out
    bodies = [c[2] for c in server.calls]
    assert bodies == [
        {"pipeline": "content", "request_id": "content-01", "label": "sports"},
        {"pipeline": "content", "request_id": "content-02", "correct": False},
    ]


def test_predict_sends_json_with_base64_files(server: FakeServer, tmp_path, capsys) -> None:
    answer = {"request_id": "r-7", "trace_id": TRACE_ID, "topics": [{"label": "finance", "score": 0.9}]}
    server.routes[("POST", "/v1/pipelines/content:predict")] = (200, answer)
    image = tmp_path / "photo.png"
    image.write_bytes(b"\x89PNG fake")
    argv = ["--gateway", server.url, "predict", "content", "--text", "rates rose", "--file", f"image={image}"]
    assert main([*argv, "--timeout-ms", "2000", "--request-id", "r-7", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == answer
    assert server.calls[0][2] == {
        "inputs": {"text": "rates rose", "image": {"b64": "iVBORyBmYWtl", "content_type": "image/png"}},
        "timeout_ms": 2000,
        "request_id": "r-7",
    }
    assert main([*argv, "-q"]) == 0
    assert capsys.readouterr().out == "r-7 finance\n"


def test_predict_prints_a_summary_naming_each_version_and_route(server: FakeServer, capsys) -> None:
    answer = {
        "request_id": "r-8",
        "trace_id": TRACE_ID,
        "outputs": {"text": {"model": "minilm", "model_version": "2", "labels": [{"label": "sports", "score": 0.61}]}},
        "notes": {"text/inference.route": "canary"},
        "timings_ms": {"gateway_total": 12.34},
    }
    server.routes[("POST", "/v1/pipelines/embed:predict")] = (200, answer)
    assert main(["--gateway", server.url, "predict", "embed", "--text", "goal"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["request", "r-8", "trace", TRACE_ID]
    assert out[1] == "text     minilm v2 (canary)  labels sports 0.61" and out[2] == "took     12.3 ms"


def test_status_and_api_errors(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    pipeline = {"pipeline": "embed", "slo": {"latency_p95_ms": 500.0, "success": 0.999}, "requests": 42,
                "error_rate": 0.0, "throughput_rps": 1.5, "p50_ms": 12.0, "p95_ms": 30.5, "slo_met": True}  # fmt: skip
    dashboard = {"pipelines": [pipeline], "models": {"triton": {"up": True, "cpu_utilization": 0.25}}, "alerts": []}
    server.routes[("GET", "/readyz")] = (503, {"ready": False, "service": "gateway"})
    server.routes[("GET", "/v1/dashboard")] = (200, dashboard)
    assert main(["--gateway", server.url, "--monitor", server.url, "status"]) == 1
    out = capsys.readouterr().out
    assert "NOT READY (HTTP 503)" in out and "triton up, cpu 25.0%" in out and "0 active alerts" in out
    assert out.splitlines()[-1].split() == ["embed", "42", "1.50", "12.0", "30.5", "500.0", "0.0%", "99.9%", "met"]
    server.routes[("GET", "/readyz")] = (200, {"ready": True, "service": "gateway"})
    assert main(["--gateway", server.url, "--monitor", server.url, "status"]) == 0
    server.routes[("GET", "/v1/drift")] = (500, {"error": {"code": "INTERNAL", "message": "internal error"}})
    assert main(["--monitor", server.url, "drift"]) == 1
    assert "the monitor answered HTTP 500 INTERNAL: internal error" in capsys.readouterr().err


def test_unreachable_monitor_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a port nothing listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["--monitor", f"http://127.0.0.1:{port}", "--timeout", "2", "drift"]) == 1
    assert f"cannot reach the monitor at http://127.0.0.1:{port}: connection refused" in capsys.readouterr().err
