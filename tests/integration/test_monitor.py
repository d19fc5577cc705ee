"""The monitor on the real mesh: drift, accuracy from feedback, alerts, Triton outage, traces.

The session mesh runs the monitor with a 1 s evaluation interval, 500-value
drift windows and a 50-answer accuracy window (tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import nats
import pytest

from services.common.launch.mesh import Mesh
from services.common.pb.loom.v1 import monitor_pb2
from tests.media import sentence
from tests.support import eventually, http_json, predict_http

pytestmark = pytest.mark.integration

EVAL_S = 1.0


def send(mesh: Mesh, texts: list[str], pipeline: str = "embed", workers: int = 8) -> list[dict[str, Any]]:
    def one(text: str) -> dict[str, Any]:
        status, body = predict_http(mesh.gateway_http, text, pipeline=pipeline, timeout_ms=20000)
        assert status == 200, body
        return body  # type: ignore[no-any-return]

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, texts))


def drift(mesh: Mesh, pipeline: str) -> dict[str, dict[str, Any]]:
    status, body = http_json(f"{mesh.monitor_http}/v1/drift")
    assert status == 200
    return {d["feature"]: d for d in body["features"] if d["pipeline"] == pipeline}


def alerts(mesh: Mesh, name: str, state: str = "active") -> list[dict[str, Any]]:
    status, body = http_json(f"{mesh.monitor_http}/v1/alerts?state={state}")
    assert status == 200
    return [a for a in body["alerts"] if a["name"] == name]


class AlertListener:
    """Collects loom.alert.* messages on a thread of its own."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.seen: list[monitor_pb2.Alert] = []
        self._loop = asyncio.new_event_loop()
        self._ready = asyncio.Event()

    def __enter__(self) -> AlertListener:
        import threading

        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._subscribe(), self._loop).result(10)
        return self

    async def _subscribe(self) -> None:
        self._nc = await nats.connect(self.url)

        async def on_alert(msg: Any) -> None:
            self.seen.append(monitor_pb2.Alert.FromString(msg.data))

        await self._nc.subscribe("loom.alert.*", cb=on_alert)
        await self._nc.flush()

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._nc.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def states(self, name: str) -> list[str]:
        return [a.state for a in self.seen if a.name == name]


def test_drift_alerts_on_shifted_inputs_and_resolves(mesh: Mesh) -> None:
    rng = random.Random(4)
    status, _ = http_json(f"{mesh.monitor_http}/v1/drift/baseline", {"action": "capture", "pipeline": "embed"})
    assert status == 202
    with AlertListener(mesh.nats_url) as listener:
        # 500 requests become the baseline, 500 more like them fill the window.
        send(mesh, [sentence(rng, rng.randint(6, 14)) for _ in range(1000)])

        def stable() -> dict[str, dict[str, Any]]:
            features = drift(mesh, "embed")
            assert {"text_chars", "text_tokens", "top_score"} <= set(features), features
            for f in features.values():
                assert f["band"] == "stable" and f["psi"] is not None and f["psi"] < 0.1, f
                assert f["baseline_samples"] == 500 and f["window_samples"] == 500, f
            return features

        baseline = eventually(stable, timeout=10)
        assert baseline["text_chars"]["kind"] == "input" and baseline["top_score"]["kind"] == "output"
        assert baseline["text_chars"]["model"] == "minilm" and baseline["text_chars"]["version"]
        assert not [a for a in alerts(mesh, "LoomDriftHigh") if a["labels"]["pipeline"] == "embed"]

        # Much longer texts: the length features drift far beyond 0.2.
        send(mesh, [sentence(rng, rng.randint(40, 70)) for _ in range(500)])
        done = time.monotonic()

        def alerted() -> list[dict[str, Any]]:
            found = [a for a in alerts(mesh, "LoomDriftHigh") if a["labels"]["pipeline"] == "embed"]
            assert {a["labels"]["feature"] for a in found} >= {"text_chars", "text_tokens"}, found
            return found

        fired = eventually(alerted, timeout=EVAL_S + 3, interval=0.1)
        assert time.monotonic() - done <= EVAL_S + 3
        assert all(a["severity"] == "P2" and a["value"] > 0.2 for a in fired)
        assert drift(mesh, "embed")["text_chars"]["band"] == "alert"
        status, metrics = _metrics(mesh)
        assert 'loom_drift_psi{feature="text_chars",model="minilm",pipeline="embed"' in metrics
        eventually(lambda: "firing" in listener.states("LoomDriftHigh"), timeout=5)

        # Back to normal inputs: the window refills and the alert resolves.
        send(mesh, [sentence(rng, rng.randint(6, 14)) for _ in range(500)])

        def resolved() -> bool:
            assert not [a for a in alerts(mesh, "LoomDriftHigh") if a["labels"]["pipeline"] == "embed"]
            return True

        eventually(resolved, timeout=EVAL_S + 5)
        after = drift(mesh, "embed")
        assert after["text_chars"]["psi"] < 0.2
        shifted = {a["labels"]["feature"]: a["value"] for a in fired}
        print(
            "\ndrift PSI (embed): "
            + ", ".join(
                f"{f} {baseline[f]['psi']:.3f} -> {shifted.get(f, float('nan')):.3f} -> {after[f]['psi']:.3f}"
                for f in ("text_chars", "text_tokens", "top_score")
            )
        )
        history = [a for a in alerts(mesh, "LoomDriftHigh", state="all") if a["state"] == "resolved"]
        assert history and all(a["resolved_unix_ms"] >= a["started_unix_ms"] for a in history)
        eventually(lambda: "resolved" in listener.states("LoomDriftHigh"), timeout=5)


def _metrics(mesh: Mesh) -> tuple[int, str]:
    import urllib.request

    from tests.support import TEST_VIEWER_KEY, bearer

    req = urllib.request.Request(f"{mesh.monitor_http}/metrics", headers=bearer(TEST_VIEWER_KEY))
    with urllib.request.urlopen(req, timeout=5) as resp:
        return resp.status, resp.read().decode()


def test_accuracy_from_feedback_drops_and_alerts(mesh: Mesh) -> None:
    rng = random.Random(7)
    answers = send(mesh, [f"{sentence(rng, 10)} #{i}" for i in range(130)])
    labels = sorted({a["outputs"]["text"]["labels"][0]["label"] for a in answers} | {"none-of-these"})

    def feedback(answer: dict[str, Any], right: bool) -> None:
        top = answer["outputs"]["text"]["labels"][0]["label"]
        label = top if right else next(x for x in labels if x != top)
        body = {"pipeline": "embed", "request_id": answer["request_id"], "label": label}
        status, reply = http_json(f"{mesh.gateway_http}/v1/feedback", body)
        assert status == 202 and reply["accepted"], reply

    for answer in answers[:100]:  # the truth agrees with every answer
        feedback(answer, True)

    def accuracy() -> dict[str, Any]:
        _, body = http_json(f"{mesh.monitor_http}/v1/accuracy")
        rows = [r for r in body["accuracy"] if r["pipeline"] == "embed"]
        assert len(rows) == 1, rows
        return rows[0]

    def high() -> dict[str, Any]:
        row = accuracy()
        assert row["samples"] == 50 and row["accuracy"] == 1.0 and row["reference_accuracy"] == 1.0, row
        return row

    row = eventually(high, timeout=10)
    assert row["model"] == "minilm" and row["precision"] == 1.0 and row["recall"] == 1.0
    assert not alerts(mesh, "LoomAccuracyDrop")

    for answer in answers[100:]:  # a burst of contradicting truth
        feedback(answer, False)

    def dropped() -> dict[str, Any]:
        row = accuracy()
        assert row["accuracy"] <= 0.5 and row["drop_points"] > 5, row
        assert [a for a in alerts(mesh, "LoomAccuracyDrop") if a["labels"]["pipeline"] == "embed"]
        return row

    row = eventually(dropped, timeout=EVAL_S + 5)
    assert alerts(mesh, "LoomAccuracyDrop")[0]["severity"] == "P2"
    # Bad feedback is a 4xx with a reason, not a crash.
    status, body = http_json(f"{mesh.gateway_http}/v1/feedback", {"pipeline": "embed", "request_id": "x"})
    assert status == 400 and "label" in body["error"]["message"]
    status, body = http_json(f"{mesh.gateway_http}/v1/feedback", {"pipeline": "nope", "request_id": "x", "label": "a"})
    assert status == 404


async def test_dashboard_in_chromium_shows_the_live_mesh(mesh: Mesh) -> None:
    """Runs after the drift and accuracy tests, so every panel has real data (and series over time)."""
    from pathlib import Path

    from tests.browser import Chromium
    from tests.media import text_image
    from tests.support import TEST_VIEWER_KEY, predict_inputs

    status, body = predict_inputs(mesh.gateway_http, "content", {"image": text_image("Quarterly report")})
    assert status == 200, body
    artifacts = Path(os.environ.get("LOOM_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / ".artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    async with Chromium() as browser:
        # The page loads without credentials and asks for a key; its fetches then carry a viewer's key.
        await browser.navigate(f"{mesh.monitor_http}/")
        await browser.wait_for("document.getElementById('key-form') !== null", timeout=15)
        assert await browser.evaluate("document.body.dataset.ready") is None
        await browser.evaluate(
            f"document.getElementById('api-key').value = {TEST_VIEWER_KEY!r};"
            "document.getElementById('key-form').requestSubmit()"
        )
        await browser.wait_for("document.body.dataset.ready === '1'", timeout=15)

        def values(selector: str) -> str:
            return f"[...document.querySelectorAll({selector!r})].map(e => Number(e.dataset.raw))"

        embed = "[data-panel=pipelines] [data-pipeline=embed]"
        rps = await browser.evaluate(values(f"{embed} [data-value=rps]"))
        p95 = await browser.evaluate(values(f"{embed} [data-value=p95_ms]"))
        assert rps and rps[0] >= 0 and p95 and p95[0] > 0, (rps, p95)
        paths = await browser.evaluate(
            f"[...document.querySelectorAll('{embed} svg.chart path.series')].map(p => p.getAttribute('d').length)"
        )
        assert len(paths) >= 3 and all(n > 10 for n in paths), paths
        stage_rows = await browser.evaluate("document.querySelectorAll('[data-panel=stages] .stage-row').length")
        assert stage_rows >= 3
        models = await browser.evaluate(
            "[...document.querySelectorAll('[data-panel=models] tr[data-model]')].map(r => r.dataset.model)"
        )
        assert {"minilm", "ocr"} <= set(models), models
        psi = await browser.evaluate(values("[data-panel=drift] tr.drift-row [data-value=psi]"))
        assert psi and all(v >= 0 for v in psi), psi
        accuracy = await browser.evaluate(values("[data-panel=accuracy] [data-value=accuracy]"))
        assert accuracy and all(0 <= v <= 1 for v in accuracy), accuracy
        assert await browser.evaluate("document.querySelectorAll('[data-panel=alerts] [data-alert-id]').length") >= 1

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
        shot = await browser.screenshot(artifacts / "dashboard-live.png")
        assert shot.stat().st_size > 50_000
        # The one refused fetch before the key was entered is all Chromium may complain about.
        errors = [e for e in browser.console_errors() if "status of 401" not in e]
        assert not errors and len(browser.console_errors()) <= 1, browser.console_errors()


def test_loomctl_trace_shows_all_six_services_in_order(mesh: Mesh) -> None:
    from tests.media import text_image
    from tests.support import predict_inputs

    status, body = predict_inputs(
        mesh.gateway_http, "content", {"text": "The team won the final", "image": text_image("Invoice total")}
    )
    assert status == 200, body
    request_id = body["request_id"]

    def traced() -> dict[str, Any]:
        status, trace = http_json(f"{mesh.monitor_http}/v1/traces/{request_id}")
        assert status == 200, trace
        wanted = {"gateway", "preprocess", "inference", "postprocess", "fusion", "monitor"}
        assert wanted <= set(trace["services"]), trace["services"]
        return trace

    trace = eventually(traced, timeout=20, interval=0.5)
    assert trace["trace_id"] == body["trace_id"]
    spans = trace["spans"]
    assert spans[0]["service"] == "gateway" and spans[0]["depth"] == 0
    # The chain in order: each stage starts after the one before it started.
    firsts = {}
    for span in spans:
        firsts.setdefault(span["name"], span["start_ms"])
    order = ["process loom.pre.image", "process loom.infer.ocr", "process loom.post.ocr", "process loom.fuse"]
    starts = [min(v for k, v in firsts.items() if k.startswith(name)) for name in order]
    assert starts == sorted(starts), starts
    assert any(s["queue_wait_ms"] is not None for s in spans)

    from tests.support import TEST_VIEWER_KEY

    out = subprocess.run(
        [sys.executable, "-m", "tools.loomctl", "--monitor", mesh.monitor_http, "trace", request_id],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "LOOM_API_KEY": TEST_VIEWER_KEY},  # the monitor's reads need a viewer
    )
    assert out.returncode == 0, out.stderr
    for service in ("gateway", "preprocess", "inference", "postprocess", "fusion", "monitor"):
        assert service in out.stdout, out.stdout
    lines = out.stdout.splitlines()
    assert any("loom.infer.ocr" in line for line in lines)


def test_stopping_triton_fires_p1_model_unavailable_and_restart_resolves(mesh: Mesh) -> None:
    assert mesh.triton is not None
    with AlertListener(mesh.nats_url) as listener:
        mesh.triton.stop()
        try:

            def fired() -> list[dict[str, Any]]:
                found = alerts(mesh, "LoomModelUnavailable")
                assert {a["labels"]["model"] for a in found} >= {"minilm", "ocr", "vad"}, found
                return found

            found = eventually(fired, timeout=EVAL_S + 5, interval=0.2)
            assert all(a["severity"] == "P1" for a in found)
            eventually(lambda: "firing" in listener.states("LoomModelUnavailable"), timeout=5)
            assert listener.seen and all(a.severity == "P1" for a in listener.seen if a.name == "LoomModelUnavailable")
        finally:
            mesh.start_triton()
        eventually(lambda: not alerts(mesh, "LoomModelUnavailable"), timeout=EVAL_S + 10, interval=0.2)
        eventually(lambda: "resolved" in listener.states("LoomModelUnavailable"), timeout=5)

    def healed() -> bool:
        status, body = predict_http(mesh.gateway_http, "back again", timeout_ms=3000)
        assert status == 200, body
        return True

    eventually(healed, timeout=60, interval=0.5)
