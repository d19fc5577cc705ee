"""The monitor's dashboard page, loaded in headless Chromium against a fixture API.

A tiny aiohttp server on loopback serves services/monitor/static and answers
GET /v1/dashboard and GET /v1/traces/{id} from tests/dashboard_fixture.py.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.browser import Chromium
from tests.dashboard_fixture import REQUEST_ID, TRACE_ID, alert, build_dashboard, build_trace
from tests.loopback import serve_http

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
STATIC = REPO / "services" / "monitor" / "static"


def artifacts_dir() -> Path:
    path = Path(os.environ.get("LOOM_TEST_ARTIFACTS", REPO / ".artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class FakeMonitor:
    """What the fake API answers; tests change it while the page is open."""

    url: str = ""
    doc: dict[str, Any] = field(default_factory=build_dashboard)
    traces: dict[str, dict[str, Any]] = field(default_factory=dict)
    down: bool = False
    dashboard_hits: int = 0


def make_app(monitor: FakeMonitor) -> web.Application:
    async def index(_: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html")

    async def dashboard(_: web.Request) -> web.Response:
        monitor.dashboard_hits += 1
        if monitor.down:
            return web.json_response({"error": {"code": "UNAVAILABLE", "message": "monitor is restarting"}}, status=503)
        return web.json_response(monitor.doc)

    async def trace(request: web.Request) -> web.Response:
        key = request.match_info["id"]
        for t in monitor.traces.values():
            if key in (t["trace_id"], t["request_id"]):
                return web.json_response(t)
        return web.json_response({"error": {"code": "NOT_FOUND", "message": f"no trace {key}"}}, status=404)

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/v1/dashboard", dashboard)
    app.router.add_get("/v1/traces/{id}", trace)
    app.router.add_static("/static/", STATIC)
    return app


@pytest.fixture
async def monitor() -> AsyncIterator[FakeMonitor]:
    fake = FakeMonitor()
    fake.traces[TRACE_ID] = build_trace()
    async with serve_http(make_app(fake)) as port:
        fake.url = f"http://127.0.0.1:{port}/"
        yield fake


@pytest.fixture
async def browser() -> AsyncIterator[Chromium]:
    async with Chromium() as b:
        yield b


async def values(browser: Chromium, scope: str) -> dict[str, str]:
    """Text of every [data-value] under the first element matching ``scope``, by name (first wins)."""
    found: dict[str, str] = await browser.evaluate(
        f"""(() => {{
            const root = document.querySelector({scope!r});
            if (!root) return null;
            const out = {{}};
            for (const el of root.querySelectorAll("[data-value]"))
                if (!(el.dataset.value in out)) out[el.dataset.value] = el.textContent.trim();
            return out;
        }})()"""
    )
    return found


async def open_dashboard(browser: Chromium, monitor: FakeMonitor) -> None:
    await browser.navigate(monitor.url)
    await browser.wait_for("document.body.dataset.ready === '1'", timeout=15)


async def test_every_panel_shows_the_fixture(browser: Chromium, monitor: FakeMonitor) -> None:
    await open_dashboard(browser, monitor)
    panels = await browser.evaluate("[...document.querySelectorAll('section[data-panel]')].map(s => s.dataset.panel)")
    assert panels == ["alerts", "pipelines", "stages", "models", "drift", "accuracy", "traces"]
    live = await browser.evaluate("document.getElementById('live-text').textContent")
    assert live.startswith("live · updated ") and len(live.rsplit(" ", 1)[1]) == 8  # HH:MM:SS
    assert await values(browser, "#summary") == {
        "pipeline_count": "2",
        "total_rps": "48.8",
        "models_ready": "3",
        "active_alerts": "2",
    }

    # pipelines: a card each, with the numbers and three charts of 30 points
    embed = await values(browser, '[data-panel="pipelines"] [data-pipeline="embed"]')
    assert embed["rps"] == "42.5" and embed["p50_ms"] == "8.40" and embed["p95_ms"] == "21.7"
    assert embed["p99_ms"] == "35.2" and embed["error_rate"] == "0.10" and embed["requests"] == "12,750"
    assert embed["slo_met"] == "SLO met" and embed["burn_availability_short"] == "1.0"
    content = await values(browser, '[data-panel="pipelines"] [data-pipeline="content"]')
    assert content["p99_ms"] == "2410" and content["error_rate"] == "3.12" and content["slo_met"] == "SLO breached"
    assert (content["burn_availability_short"], content["burn_availability_long"]) == ("31.2", "15.6")
    charts = await browser.evaluate(
        """[...document.querySelectorAll('[data-panel="pipelines"] [data-pipeline="content"] svg.chart')].map(svg => ({
            chart: svg.dataset.chart,
            series: [...svg.querySelectorAll('path.series')].map(p => p.dataset.series),
            points: [...svg.querySelectorAll('path.series')].map(p => p.getAttribute('d').match(/[ML]/g).length),
            xs: [...svg.querySelectorAll('path.series')].flatMap(p => p.getAttribute('d').split(/[ML]/)
                  .filter(Boolean).map(pair => Number(pair.split(' ')[0]))),
        }))"""
    )
    assert [(c["chart"], c["series"]) for c in charts] == [
        ("throughput", ["rps"]),
        ("latency", ["p50", "p95", "p99"]),
        ("error_rate", ["error_rate"]),
    ]
    for chart in charts:
        assert all(n == 30 for n in chart["points"]), chart
        assert min(chart["xs"]) < max(chart["xs"]) and all(x == x for x in chart["xs"]), chart  # real, spread, no NaN

    # stages: bars per pipeline, p50 / p95 per stage
    ocr = await values(browser, '[data-panel="stages"] [data-pipeline="content"] [data-stage="loom.infer.ocr"]')
    assert ocr == {"p50_ms": "96.0", "p95_ms": "410", "errors": "31 err"}
    bar_widths = await browser.evaluate(
        """[...document.querySelectorAll('[data-panel="stages"] [data-pipeline="embed"] .stage-row')].map(g =>
            [g.dataset.stage, Number(g.querySelector('.bar.p50').getAttribute('width')),
             Number(g.querySelector('.bar.p95').getAttribute('width'))])"""
    )
    assert [b[0] for b in bar_widths] == ["http", "loom.pre.text", "loom.infer.minilm", "loom.post.embed"]
    assert all(0 < p50 < p95 for _, p50, p95 in bar_widths)

    # models: the 90/10 split, rollout progress and Triton
    v1 = await values(browser, '[data-panel="models"] tr[data-model="minilm"][data-version="1"]')
    v2 = await values(browser, '[data-panel="models"] tr[data-model="minilm"][data-version="2"]')
    assert (v1["share"], v2["share"]) == ("90.0", "10.0")
    assert v2["rollout_percent"] == "10" and "rollout_percent" not in v1
    assert (v2["p95_ms"], v2["queue_us"], v2["compute_us"]) == ("16.9", "295", "4,650")
    assert await browser.evaluate(
        """[...document.querySelectorAll('[data-model="vad"] [data-value="ready"]')].map(e => e.dataset.raw)"""
    ) == ["false"]
    triton = await values(browser, '[data-panel="models"] .triton')
    assert triton == {
        "triton_up": "up",
        "cpu_utilization": "37.2",
        "gpu_utilization": "61.5",
        "gpu_memory_used_bytes": "3.25",
    }

    # drift: PSI, band pill and a sparkline with both band lines
    drift = await browser.evaluate(
        """[...document.querySelectorAll('[data-panel="drift"] tr.drift-row')].map(r => [r.dataset.feature,
            r.querySelector('[data-value="psi"]').textContent, r.querySelector('[data-band]').dataset.band,
            r.querySelectorAll('path.series').length, r.querySelectorAll('line.band-line').length])"""
    )
    assert drift == [
        ["top_score", "0.284", "alert", 1, 2],
        ["token_count", "0.137", "watch", 1, 2],
        ["text_length", "0.043", "stable", 1, 2],
        ["image_height", "—", "capturing", 0, 2],
    ]

    # accuracy: numbers per version and one line per version over time
    acc2 = await values(browser, '[data-panel="accuracy"] tr.acc-row[data-version="2"]')
    assert acc2 == {
        "samples": "131",
        "accuracy": "84.7",
        "precision": "83.0",
        "recall": "81.2",
        "reference_accuracy": "93.0",
        "drop_points": "8.3",
    }
    assert await browser.evaluate(
        "[...document.querySelectorAll('[data-panel=\"accuracy\"] svg.chart path.series')].map(p => p.dataset.series)"
    ) == ["v1", "v2"]

    # alerts: P2 before warning, with labels and summary as text
    alerts = await browser.evaluate(
        """[...document.querySelectorAll('[data-panel="alerts"] [data-alert-id]')].map(a => [a.dataset.severity,
            a.dataset.name, a.querySelector('.sev').textContent, a.querySelector('.alert-summary').textContent])"""
    )
    assert [a[:3] for a in alerts] == [["P2", "LoomDriftHigh", "P2"], ["warning", "LoomSLOBurn", "warning"]]
    assert "31.2x" in alerts[1][3]
    assert (await values(browser, '[data-panel="alerts"] [data-name="LoomDriftHigh"]'))["since_s"] == "7m 00s"

    # traces: the list, then the waterfall of the clicked one
    rows = await browser.evaluate(
        """[...document.querySelectorAll('[data-panel="traces"] tr.trace-row')].map(r => [r.dataset.requestId,
            r.querySelector('[data-value="duration_ms"]').textContent])"""
    )
    assert rows == [[REQUEST_ID, "182"], ["req-51be0d44", "19.6"], ["req-c0ffee12", "3012"]]
    await browser.click(f'tr.trace-row[data-trace-id="{TRACE_ID}"]')
    await browser.wait_for("document.querySelectorAll('#waterfall .wf-row[data-span-id]').length === 13")
    spans = await browser.evaluate(
        """[...document.querySelectorAll('#waterfall .wf-row[data-span-id]')].map(r => ({
            depth: Number(r.dataset.depth), service: r.dataset.service,
            left: parseFloat(r.querySelector('.wf-bar').style.left),
            width: parseFloat(r.querySelector('.wf-bar').style.width),
            queue: r.querySelector('.wf-queue') ? Number(r.querySelector('.wf-queue').dataset.raw) : null,
            indent: parseFloat(r.querySelector('.wf-name').style.paddingLeft), title: r.title,
        }))"""
    )
    assert {s["service"] for s in spans} == {"gateway", "preprocess", "inference", "triton", "postprocess", "fusion"}
    assert spans[0]["left"] == 0 and spans[0]["width"] == pytest.approx(100)
    ocr_rec = spans[10]
    assert ocr_rec["depth"] == 4 and ocr_rec["indent"] > spans[0]["indent"]
    assert ocr_rec["left"] == pytest.approx(106.8 / 182.4 * 100, abs=0.01) and ocr_rec["queue"] == 1.1
    assert "note = <b>not html</b>" in ocr_rec["title"]  # attributes are text, not markup
    assert await browser.evaluate("document.querySelectorAll('#waterfall b').length") == 0
    assert await browser.evaluate("document.querySelector('tr.trace-row.selected').dataset.traceId") == TRACE_ID

    assert browser.console_errors() == []
    await browser.evaluate("window.scrollTo(0, 0)")  # the sticky top bar belongs at the top of the picture
    shot = await browser.screenshot(artifacts_dir() / "dashboard.png")
    assert shot.stat().st_size > 50_000


async def test_page_follows_the_api_without_reloading(browser: Chromium, monitor: FakeMonitor) -> None:
    await open_dashboard(browser, monitor)
    await browser.evaluate("window.__sameDocument = true")
    await browser.click(f'tr.trace-row[data-trace-id="{TRACE_ID}"]')
    await browser.wait_for("document.querySelectorAll('#waterfall .wf-row[data-span-id]').length === 13")

    doc = copy.deepcopy(monitor.doc)
    now = int(time.time() * 1000)
    doc["generated_unix_ms"] = now
    hostile = '<img src=x onerror="window.__owned = 1">'
    doc["alerts"].append(
        alert("LoomHighLatency", "P1", {"pipeline": "content"}, f"content p95 is 3.4 s {hostile}", 3.4, now - 30_000)
    )
    doc["pipelines"][0]["throughput_rps"] = 57.25
    doc["models"]["versions"][1]["rollout"] = {"stage": "canary", "percent": 50.0}
    doc["models"]["versions"][0]["share"], doc["models"]["versions"][1]["share"] = 0.5, 0.5
    monitor.doc = doc

    await browser.wait_for("document.querySelector('[data-alert-id^=\"LoomHighLatency\"]') !== null", timeout=10)
    assert await browser.evaluate("window.__sameDocument") is True
    first = await browser.evaluate(
        "[...document.querySelectorAll('[data-panel=\"alerts\"] [data-alert-id]')].map(a => a.dataset.severity)"
    )
    assert first == ["P1", "P2", "warning"]
    summary = await browser.evaluate("document.querySelector('[data-name=LoomHighLatency] .alert-summary').textContent")
    assert summary.endswith(hostile)
    assert await browser.evaluate("document.querySelectorAll('[data-panel=\"alerts\"] img').length") == 0
    assert await browser.evaluate("window.__owned") is None
    assert (await values(browser, "#summary"))["active_alerts"] == "3"
    assert (await values(browser, '[data-pipeline="embed"]'))["rps"] == "57.3"
    v2 = await values(browser, 'tr[data-model="minilm"][data-version="2"]')
    assert (v2["share"], v2["rollout_percent"]) == ("50.0", "50")
    # the open waterfall survives the refresh
    assert await browser.evaluate("document.querySelectorAll('#waterfall .wf-row[data-span-id]').length") == 13
    assert browser.console_errors() == []


async def test_unreachable_api_is_reported_and_recovers(browser: Chromium, monitor: FakeMonitor) -> None:
    await open_dashboard(browser, monitor)
    monitor.down = True
    await browser.wait_for("document.getElementById('live').dataset.state === 'error'", timeout=10)
    banner = await browser.evaluate("document.getElementById('api-error').textContent")
    assert "Monitor API unreachable" in banner and "HTTP 503: monitor is restarting" in banner
    assert await browser.evaluate("document.getElementById('api-error').hidden") is False
    assert (await values(browser, '[data-pipeline="embed"]'))["rps"] == "42.5"  # last data stays visible
    monitor.down = False
    await browser.wait_for("document.getElementById('live').dataset.state === 'live'", timeout=10)
    assert await browser.evaluate("document.getElementById('api-error').hidden") is True


async def test_empty_mesh_says_what_is_missing(browser: Chromium, monitor: FakeMonitor) -> None:
    monitor.doc = {
        "generated_unix_ms": int(time.time() * 1000),
        "pipelines": [],
        "stages": [],
        "models": {"triton": {"up": False, "cpu_utilization": None, "gpu_utilization": None,
                              "gpu_memory_used_bytes": None, "scraped_unix_ms": None}, "versions": []},
        "drift": [],
        "accuracy": [],
        "alerts": [],
        "traces": [],
    }  # fmt: skip
    await open_dashboard(browser, monitor)
    text = await browser.evaluate(
        "Object.fromEntries([...document.querySelectorAll('section[data-panel]')].map(s => [s.dataset.panel,"
        " s.querySelector('.panel-body').textContent]))"
    )
    assert "no traffic yet" in text["pipelines"] and "no traffic yet" in text["stages"]
    assert "no feedback yet" in text["accuracy"] and "no active alerts" in text["alerts"]
    assert "no traces yet" in text["traces"] and "no drift data yet" in text["drift"]
    assert "no models reported yet" in text["models"] and "down" in text["models"]
    assert browser.console_errors() == []


ACCURACY_SERIES = '[data-panel="accuracy"] svg.chart[data-chart="accuracy"] .series'


async def test_a_series_with_one_point_is_drawn_as_a_dot(browser: Chromium, monitor: FakeMonitor) -> None:
    """The first 10 s of feedback give one point per version: it is drawn (a dot), not "no feedback yet"."""
    doc = copy.deepcopy(monitor.doc)
    now = int(time.time() * 1000)
    v1, v2 = doc["accuracy"]
    v1["series"] = [{"t": now - now % 10_000, "accuracy": 0.4, "precision": 0.5, "recall": 0.4, "samples": 50}]
    v2["series"] = []  # feedback too old for the series, still in the window: nothing to draw for it
    drift = next(d for d in doc["drift"] if d["feature"] == "top_score")
    drift["history"] = drift["history"][-1:]
    monitor.doc = doc
    await open_dashboard(browser, monitor)

    drawn = await browser.evaluate(
        f"[...document.querySelectorAll({ACCURACY_SERIES!r})].map(e => [e.tagName, e.dataset.series,"
        " e.getAttribute('fill'), getComputedStyle(e).fill !== 'none'])"
    )
    assert drawn == [["circle", "v1", "#2f6fdb", True]]  # one dot in v1's colour, filled (visible)
    text = await browser.evaluate("document.querySelector('[data-panel=\"accuracy\"] .panel-body').textContent")
    assert "no feedback yet" not in text and "no judged answers over time yet" not in text
    # 40 % accuracy sits at the 40 % height of the y axis, not at an edge
    box = await browser.evaluate(
        f"(() => {{ const c = document.querySelector({ACCURACY_SERIES!r}); return [+c.getAttribute('cy'),"
        " c.ownerSVGElement.viewBox.baseVal.height]; })()"
    )
    assert 8 < box[0] < box[1] - 20
    spark = await browser.evaluate(
        '[...document.querySelectorAll(\'[data-panel="drift"] tr.drift-row[data-feature="top_score"] .series\')]'
        ".map(e => e.tagName)"
    )
    assert spark == ["circle"]
    assert browser.console_errors() == []


async def test_feedback_without_a_series_point_says_so_in_the_chart(browser: Chromium, monitor: FakeMonitor) -> None:
    doc = copy.deepcopy(monitor.doc)
    for row in doc["accuracy"]:
        row["series"] = []
    monitor.doc = doc
    await open_dashboard(browser, monitor)
    assert await browser.evaluate(f"document.querySelectorAll({ACCURACY_SERIES!r}).length") == 0
    text = await browser.evaluate("document.querySelector('[data-panel=\"accuracy\"] .panel-body').textContent")
    assert "no judged answers over time yet" in text and "no feedback yet" not in text
    assert "84.7" in text  # the window's figures are still shown
