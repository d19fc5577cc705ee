"""What people see of the monitor on the live mesh: the dashboard in Chromium and ``loomctl trace``.

Each test seeds the traffic, feedback and alerts it asserts on, so it passes run alone or in any order.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from services.common.launch.mesh import Mesh
from tests.integration.monitor_helpers import EVAL_S, alerts, send
from tests.media import sentence, text_image
from tests.support import TEST_VIEWER_KEY, eventually, http_json, predict_http, predict_inputs

pytestmark = pytest.mark.integration

SERVICES = ("gateway", "preprocess", "inference", "postprocess", "fusion", "monitor")
ARTIFACTS = Path(os.environ.get("LOOM_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / ".artifacts"))


def content_accuracy(mon: str) -> dict[str, Any]:
    _, body = http_json(f"{mon}/v1/accuracy")
    rows = [r for r in body["accuracy"] if r["pipeline"] == "content"]
    assert len(rows) == 1, rows
    return rows[0]  # type: ignore[no-any-return]


def seed_content_accuracy_drop(mesh: Mesh) -> dict[str, Any]:
    """50 right answers (the reference), then 50 wrong ones: the content pipeline's accuracy drops and alerts."""
    rng = random.Random(11)
    texts = [f"{sentence(rng, 9)} (dashboard {i})" for i in range(100)]

    def one(text: str) -> str:
        status, body = predict_inputs(mesh.gateway_http, "content", {"text": text})
        assert status == 200, body
        return str(body["request_id"])

    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(one, texts))

    def feedback(request_id: str, correct: bool) -> None:
        body = {"pipeline": "content", "request_id": request_id, "correct": correct}
        status, reply = http_json(f"{mesh.gateway_http}/v1/feedback", body)
        assert status == 202, reply

    for rid in ids[:50]:
        feedback(rid, True)

    def reference() -> dict[str, Any]:
        row = content_accuracy(mesh.monitor_http)
        assert row["samples"] == 50 and row["accuracy"] == 1.0, row
        return row

    eventually(reference, timeout=EVAL_S + 10)
    for rid in ids[50:]:
        feedback(rid, False)

    def dropped() -> dict[str, Any]:
        row = content_accuracy(mesh.monitor_http)
        # What left the window (the 50 right answers) is the reference.
        assert row["accuracy"] == 0.0 and row["reference_accuracy"] == 1.0, row
        assert alerts(mesh.monitor_http, "LoomAccuracyDrop", pipeline="content"), row
        return row

    return eventually(dropped, timeout=EVAL_S + 10)  # type: ignore[no-any-return]


async def test_dashboard_in_chromium_shows_the_live_mesh(mesh: Mesh) -> None:
    from tests.browser import Chromium

    mon = mesh.monitor_http
    accuracy_row = seed_content_accuracy_drop(mesh)
    status, body = predict_inputs(mesh.gateway_http, "content", {"image": text_image("Quarterly report")})
    assert status == 200, body
    send(mesh, [f"dashboard traffic {i}" for i in range(30)])  # embed traffic inside the 60 s rps window
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    async with Chromium() as browser:
        # The page loads without credentials and asks for a key; its fetches then carry a viewer's key.
        await browser.navigate(f"{mon}/")
        await browser.wait_for("document.getElementById('key-form') !== null", timeout=15)
        assert await browser.evaluate("document.body.dataset.ready") is None
        await browser.evaluate(
            f"document.getElementById('api-key').value = {TEST_VIEWER_KEY!r};"
            "document.getElementById('key-form').requestSubmit()"
        )
        await browser.wait_for("document.body.dataset.ready === '1'", timeout=15)

        def raws(selector: str) -> str:
            return f"[...document.querySelectorAll({selector!r})].map(e => e.dataset.raw)"

        # Pipelines: the embed card shows the traffic just sent, with drawn charts.
        embed = "[data-panel=pipelines] [data-pipeline=embed]"
        rps = [float(v) for v in await browser.evaluate(raws(f"{embed} [data-value=rps]"))]
        p95 = [float(v) for v in await browser.evaluate(raws(f"{embed} [data-value=p95_ms]"))]
        assert len(rps) == 1 and rps[0] > 0 and p95 and p95[0] > 0, (rps, p95)
        paths = await browser.evaluate(
            f"[...document.querySelectorAll('{embed} svg.chart path.series')].map(p => p.getAttribute('d').length)"
        )
        assert len(paths) >= 3 and all(n > 10 for n in paths), paths
        stage_rows = await browser.evaluate("document.querySelectorAll('[data-panel=stages] .stage-row').length")
        assert stage_rows >= 3

        # Models: minilm and ocr, minilm's version carries a traffic share.
        models = await browser.evaluate(
            "[...document.querySelectorAll('[data-panel=models] tr[data-model]')].map(r => r.dataset.model)"
        )
        assert {"minilm", "ocr"} <= set(models), models
        shares = await browser.evaluate(
            raws("[data-panel=models] tr.version-row[data-model=minilm] [data-value=share]")
        )
        assert shares and max(float(v) for v in shares if v) > 0, shares

        # Drift: the content pipeline's text features are listed, each row with its band.
        rows = await browser.evaluate(
            "[...document.querySelectorAll('[data-panel=drift] tr.drift-row')].map(r => [r.dataset.pipeline,"
            " r.dataset.feature, (r.querySelector('[data-band]') || {dataset: {}}).dataset.band])"
        )
        bands = {(p, f): b for p, f, b in rows}
        assert ("content", "text_chars") in bands, rows
        assert all(b in {"capturing", "stable", "watch", "alert"} for b in bands.values()), rows

        # Accuracy: the content pipeline's 50 labelled answers, its drop, and a drawn series over time.
        group = "[data-panel=accuracy] .acc-group[data-pipeline=content]"
        acc = await browser.evaluate(raws(f"{group} [data-value=accuracy]"))
        ref = await browser.evaluate(raws(f"{group} [data-value=reference_accuracy]"))
        assert [float(v) for v in acc] == [accuracy_row["accuracy"]] and [float(v) for v in ref] == [1.0], (acc, ref)
        drawn = await browser.evaluate(
            f"document.querySelectorAll('{group} svg.chart[data-chart=accuracy] .series').length"
        )
        assert drawn >= 1, "the accuracy chart draws no series"

        # Alerts: the accuracy drop just caused is listed.
        names = await browser.evaluate(
            "[...document.querySelectorAll('[data-panel=alerts] [data-alert-id]')].map(a => a.dataset.name)"
        )
        assert "LoomAccuracyDrop" in names, names

        # Live: a new request shows up in the traces panel without a reload.
        await browser.evaluate("window.__loomMarker = 1")
        status, body = predict_http(mesh.gateway_http, "a fresh request for the dashboard")
        assert status == 200
        row = f"[data-panel=traces] tr.trace-row[data-request-id='{body['request_id']}']"
        await browser.wait_for(f"document.querySelector({row!r}) !== null", timeout=15)
        assert await browser.evaluate("window.__loomMarker") == 1
        await browser.click(row)
        await browser.wait_for("document.querySelectorAll('.wf-row').length >= 5", timeout=10)
        services = await browser.evaluate(
            "[...new Set([...document.querySelectorAll('.wf-row')].map(r => r.dataset.service))]"
        )
        assert {"gateway", "inference", "fusion"} <= set(services), services
        shot = await browser.screenshot(ARTIFACTS / "dashboard-live.png")
        assert shot.stat().st_size > 50_000
        # The one refused fetch before the key was entered is all Chromium may complain about.
        errors = [e for e in browser.console_errors() if "status of 401" not in e]
        assert not errors and len(browser.console_errors()) <= 1, browser.console_errors()
    print(f"\ndashboard: embed rps {rps[0]}, p95 {p95[0]} ms, minilm share {shares}, drift rows {len(rows)}")


def span_rows(stdout: str) -> list[dict[str, Any]]:
    """The span rows of ``loomctl trace``'s waterfall: service, name, start, duration, queue wait (None: blank)."""
    lines = stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("SPAN "))
    header = lines[at]
    ends = [header.index(col) + len(col) for col in ("START ms", "DUR ms", "QUEUE ms")]
    out = []
    for line in lines[at + 1 :]:
        if not line.strip():
            continue
        words = line[: ends[0]].split()
        queue = line[ends[1] : ends[2]].strip()
        out.append(
            {
                "service": words[0],
                "name": " ".join(words[1:-1]),
                "start": float(words[-1]),
                "duration": float(line[ends[0] : ends[1]]),
                "queue": float(queue) if queue else None,
                "bar": line[ends[2] :].strip(),
            }
        )
    return out


def test_loomctl_trace_shows_all_six_services_in_order(mesh: Mesh) -> None:
    status, body = predict_inputs(
        mesh.gateway_http, "content", {"text": "The team won the final", "image": text_image("Invoice total")}
    )
    assert status == 200, body
    request_id = body["request_id"]

    def traced() -> dict[str, Any]:
        status, trace = http_json(f"{mesh.monitor_http}/v1/traces/{request_id}")
        assert status == 200, trace
        assert set(SERVICES) <= set(trace["services"]), trace["services"]
        return trace  # type: ignore[no-any-return]

    trace = eventually(traced, timeout=20, interval=0.5)
    assert trace["trace_id"] == body["trace_id"]

    loomctl = Path(sys.executable).parent / "loomctl"  # the installed entry point
    assert loomctl.exists(), loomctl
    out = subprocess.run(
        [str(loomctl), "--monitor", mesh.monitor_http, "trace", request_id],
        capture_output=True,
        text=True,
        timeout=30,
        # The monitor's reads need a viewer; a wide terminal keeps the span names whole.
        env={**os.environ, "LOOM_API_KEY": TEST_VIEWER_KEY, "COLUMNS": "220"},
    )
    assert out.returncode == 0, out.stderr
    rows = span_rows(out.stdout)
    assert len(rows) >= len(trace["spans"]), out.stdout
    assert rows[0]["service"] == "gateway", out.stdout
    # Every service in the rows themselves (not only in the header), the chain's services in order.
    first: dict[str, int] = {}
    for i, row in enumerate(rows):
        first.setdefault(row["service"], i)
    assert set(SERVICES) <= set(first), (sorted(first), out.stdout)
    chain = [first[s] for s in ("gateway", "preprocess", "inference", "postprocess", "fusion")]
    assert chain == sorted(chain), (chain, out.stdout)

    def start(prefix: str) -> float:
        starts: list[float] = [r["start"] for r in rows if r["name"].startswith(prefix)]
        assert starts, (prefix, out.stdout)
        return min(starts)

    # The image chain, then the text chain, each stage starting after the one before it.
    image = [start(p) for p in ("process loom.pre.image", "process loom.infer.ocr", "process loom.post.ocr")]
    text = [start(p) for p in ("process loom.pre.text", "process loom.infer.minilm", "process loom.post.")]
    # Fusion takes each part as it comes (the text part first): some join follows each chain's last stage.
    fuse = [r["start"] for r in rows if r["name"].startswith("process loom.fuse")]
    assert image == sorted(image) and max(fuse) >= image[-1], (image, fuse, out.stdout)
    assert text == sorted(text) and max(fuse) >= text[-1], (text, fuse, out.stdout)
    # Durations are numbers (some real work), and a consumer row shows how long it waited in a queue.
    assert all(r["duration"] >= 0 for r in rows) and max(r["duration"] for r in rows) > 0
    waits = [r["queue"] for r in rows if r["name"].startswith("process ") and r["queue"] is not None]
    assert waits and all(w >= 0 for w in waits), out.stdout
    assert all(r["bar"].startswith("|") and r["bar"].endswith("|") for r in rows)
    print(
        f"\nloomctl trace: {len(rows)} rows, first rows {first}, image chain {image}, text chain {text}, "
        f"fuse {fuse} ms, queue waits {waits[:6]} ms"
    )
