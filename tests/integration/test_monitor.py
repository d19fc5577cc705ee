"""The monitor on the real mesh: drift, accuracy from feedback, Triton's metrics and outage alerts.

The session mesh runs the monitor with a 1 s evaluation interval, 500-value
drift windows and a 50-answer accuracy window (tests/conftest.py). The
dashboard and ``loomctl trace`` are in test_monitor_views.py, drift
baselines from a file or the API in test_monitor_baseline.py.
"""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.common.launch.mesh import Mesh
from tests.integration.monitor_helpers import EVAL_S, AlertListener, alerts, drift, metrics_text, send
from tests.media import sentence
from tests.support import eventually, http_json, predict_http

pytestmark = pytest.mark.integration


def test_drift_alerts_on_shifted_inputs_and_resolves(mesh: Mesh) -> None:
    rng = random.Random(4)
    mon = mesh.monitor_http
    status, _ = http_json(f"{mon}/v1/drift/baseline", {"action": "capture", "pipeline": "embed"})
    assert status == 202
    with AlertListener(mesh.nats_url) as listener:
        # 500 requests become the baseline, 500 more like them fill the window.
        send(mesh, [sentence(rng, rng.randint(6, 14)) for _ in range(1000)])

        def stable() -> dict[str, dict[str, Any]]:
            features = drift(mon, "embed")
            assert {"text_chars", "text_tokens", "top_score"} <= set(features), features
            for f in features.values():
                assert f["band"] == "stable" and f["psi"] is not None and f["psi"] < 0.1, f
                assert f["baseline_samples"] == 500 and f["window_samples"] == 500, f
            return features

        baseline = eventually(stable, timeout=10)
        assert baseline["text_chars"]["kind"] == "input" and baseline["top_score"]["kind"] == "output"
        assert baseline["text_chars"]["model"] == "minilm" and baseline["text_chars"]["version"]
        time.sleep(2 * EVAL_S)  # two more evaluations of the unshifted window
        assert not alerts(mon, "LoomDriftHigh", pipeline="embed")
        assert "firing" not in listener.states("LoomDriftHigh", pipeline="embed"), listener.seen

        # Much longer texts: the length features drift far beyond 0.2.
        send(mesh, [sentence(rng, rng.randint(40, 70)) for _ in range(500)])

        def alerted() -> list[dict[str, Any]]:
            found = alerts(mon, "LoomDriftHigh", pipeline="embed")
            assert {a["labels"]["feature"] for a in found} >= {"text_chars", "text_tokens"}, found
            return found

        fired = eventually(alerted, timeout=EVAL_S + 5, interval=0.1)
        assert all(a["severity"] == "P2" and a["value"] > 0.2 for a in fired)
        shifted = drift(mon, "embed")
        assert shifted["text_chars"]["band"] == "alert"
        # Within one evaluation interval: each alert started no later than one interval after the first
        # evaluation whose PSI for its feature was above 0.2 (the history shows the crossing itself).
        delays = {}
        for a in fired:
            row = shifted[a["labels"]["feature"]]
            assert row["version"] == a["labels"]["version"] and row["model"] == a["labels"]["model"]
            history = row["history"]
            first = next(i for i, h in enumerate(history) if h["psi"] > 0.2)
            assert first > 0 and history[first - 1]["psi"] <= 0.2, history  # the crossing is in the history
            delays[a["labels"]["feature"]] = a["started_unix_ms"] - history[first]["t"]
        assert all(0 <= d < EVAL_S * 1000 for d in delays.values()), delays
        assert 'loom_drift_psi{feature="text_chars",model="minilm",pipeline="embed"' in metrics_text(mon)
        eventually(lambda: "firing" in listener.states("LoomDriftHigh", pipeline="embed"), timeout=5)

        # Back to normal inputs: the window refills and the alert resolves.
        send(mesh, [sentence(rng, rng.randint(6, 14)) for _ in range(500)])
        eventually(lambda: not alerts(mon, "LoomDriftHigh", pipeline="embed"), timeout=EVAL_S + 5)
        after = drift(mon, "embed")
        assert after["text_chars"]["psi"] < 0.2
        values = {a["labels"]["feature"]: a["value"] for a in fired}
        print(
            "\ndrift PSI (embed) baseline -> shifted -> back: "
            + ", ".join(
                f"{f} {baseline[f]['psi']:.3f} -> {values.get(f, shifted[f]['psi']):.3f} -> {after[f]['psi']:.3f}"
                for f in ("text_chars", "text_tokens", "top_score")
            )
            + f"; alert start minus first PSI>0.2 evaluation: {delays} ms"
        )
        history = [a for a in alerts(mon, "LoomDriftHigh", state="all", pipeline="embed") if a["state"] == "resolved"]
        assert history and all(a["resolved_unix_ms"] >= a["started_unix_ms"] for a in history)
        eventually(lambda: "resolved" in listener.states("LoomDriftHigh", pipeline="embed"), timeout=5)


def test_accuracy_from_feedback_drops_and_alerts(mesh: Mesh) -> None:
    rng = random.Random(7)
    mon = mesh.monitor_http
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
        _, body = http_json(f"{mon}/v1/accuracy")
        rows = [r for r in body["accuracy"] if r["pipeline"] == "embed"]
        assert len(rows) == 1, rows
        return rows[0]  # type: ignore[no-any-return]

    def high() -> dict[str, Any]:
        row = accuracy()
        assert row["samples"] == 50 and row["accuracy"] == 1.0 and row["reference_accuracy"] == 1.0, row
        return row

    row = eventually(high, timeout=10)
    assert row["model"] == "minilm" and row["precision"] == 1.0 and row["recall"] == 1.0
    assert not alerts(mon, "LoomAccuracyDrop", pipeline="embed")

    with AlertListener(mesh.nats_url) as listener:
        for answer in answers[100:]:  # a burst of contradicting truth: 30 of the 50 in the window
            feedback(answer, False)

        def dropped() -> dict[str, Any]:
            row = accuracy()
            assert row["accuracy"] <= 0.5 and row["drop_points"] > 10, row
            # A drop of more than 10 points is P1 (5 to 10 points: P2).
            assert [a["severity"] for a in alerts(mon, "LoomAccuracyDrop", pipeline="embed")] == ["P1"], row
            return row

        row = eventually(dropped, timeout=EVAL_S + 5)
        eventually(lambda: "firing" in listener.states("LoomAccuracyDrop", pipeline="embed"), timeout=5)
    # Bad feedback is a 4xx with a reason, not a crash.
    status, body = http_json(f"{mesh.gateway_http}/v1/feedback", {"pipeline": "embed", "request_id": "x"})
    assert status == 400 and "label" in body["error"]["message"]
    status, body = http_json(f"{mesh.gateway_http}/v1/feedback", {"pipeline": "nope", "request_id": "x", "label": "a"})
    assert status == 404


def test_monitor_re_exposes_tritons_metrics(mesh: Mesh) -> None:
    """The monitor's /metrics carries Triton's own families, per model and version, with live values."""
    send(mesh, [f"triton metrics {i}" for i in range(5)])

    def scraped() -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for family in text_string_to_metric_families(metrics_text(mesh.monitor_http)):
            for s in family.samples:
                if s.name.startswith("nv_") and s.labels.get("model") == "minilm":
                    found.setdefault(s.name.removesuffix("_total"), {})[tuple(sorted(s.labels.items()))] = s.value
        for name in (
            "nv_inference_request_success",
            "nv_inference_count",
            "nv_inference_queue_duration_us",
            "nv_inference_compute_infer_duration_us",
        ):
            assert name in found and sum(found[name].values()) > 0, (name, sorted(found))
        return found

    found = eventually(scraped, timeout=EVAL_S + 10, interval=0.5)
    assert all(dict(labels).get("version") for labels in found["nv_inference_request_success"])
    print(
        "\ntriton via the monitor (minilm): "
        + ", ".join(f"{n} {sum(found[n].values()):.0f}" for n in sorted(found) if n.startswith("nv_inference"))
    )


def test_stopping_triton_fires_p1_model_unavailable_and_restart_resolves(mesh: Mesh) -> None:
    assert mesh.triton is not None
    mon = mesh.monitor_http
    with AlertListener(mesh.nats_url) as listener:
        mesh.triton.stop()
        try:

            def fired() -> list[dict[str, Any]]:
                found = alerts(mon, "LoomModelUnavailable")
                assert {a["labels"]["model"] for a in found} >= {"minilm", "ocr", "vad"}, found
                return found

            found = eventually(fired, timeout=EVAL_S + 5, interval=0.2)
            assert all(a["severity"] == "P1" for a in found)
            eventually(lambda: "firing" in listener.states("LoomModelUnavailable"), timeout=5)
            assert listener.seen and all(a.severity == "P1" for a in listener.seen if a.name == "LoomModelUnavailable")
            # Triton's own metrics go away with it (not stale values).
            eventually(
                lambda: not [x for x in metrics_text(mon).splitlines() if x.startswith("nv_")], timeout=EVAL_S + 5
            )
        finally:
            mesh.start_triton()
        eventually(lambda: not alerts(mon, "LoomModelUnavailable"), timeout=EVAL_S + 10, interval=0.2)
        eventually(lambda: "resolved" in listener.states("LoomModelUnavailable"), timeout=5)

    def healed() -> bool:
        status, body = predict_http(mesh.gateway_http, "back again", timeout_ms=3000)
        assert status == 200, body
        return True

    eventually(healed, timeout=60, interval=0.5)
