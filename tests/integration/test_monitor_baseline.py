"""Drift baselines kept outside the monitor: read over the API, loaded back over the API into the running
monitor, and loaded at start from LOOM_MONITOR_DRIFT_BASELINE_FILE by a second monitor process."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from services.common.launch.mesh import Mesh
from tests.integration.monitor_helpers import EVAL_S, drift, send
from tests.media import sentence
from tests.support import eventually, http_json

pytestmark = pytest.mark.integration

REFERENCE = 500  # the session mesh's LOOM_MONITOR_DRIFT_REFERENCE
SENT = 150  # values into the windows after the load: more than DriftBook's min_samples (100), which PSI needs


def embed_baseline(mon: str) -> dict[str, Any]:
    status, doc = http_json(f"{mon}/v1/drift/baseline")
    assert status == 200 and doc["version"] == 1, doc
    return {"version": doc["version"], "features": [f for f in doc["features"] if f["pipeline"] == "embed"]}


def by_key(doc: dict[str, Any]) -> dict[tuple[str, ...], dict[str, Any]]:
    return {(f["pipeline"], f["model"], f["version"], f["feature"], f["kind"]): f for f in doc["features"]}


def test_drift_baseline_round_trips_through_the_api_and_a_file(mesh: Mesh, tmp_path: Path) -> None:
    rng = random.Random(21)
    mon = mesh.monitor_http
    doc = embed_baseline(mon)
    if not any(f["feature"] == "text_chars" for f in doc["features"]):  # run alone: capture one first
        assert http_json(f"{mon}/v1/drift/baseline", {"action": "capture", "pipeline": "embed"})[0] == 202
        send(mesh, [sentence(rng, rng.randint(6, 14)) for _ in range(REFERENCE)])
        doc = eventually(lambda: embed_baseline(mon) if len(embed_baseline(mon)["features"]) >= 3 else None)
    saved = by_key(doc)
    assert all(f["samples"] == REFERENCE for f in saved.values()), doc
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(doc))

    # A bad document is refused whole.
    status, body = http_json(f"{mon}/v1/drift/baseline", {"action": "load", "baseline": {"version": 1}})
    assert status == 400 and body["error"]["code"] == "INVALID_ARGUMENT", body

    # The running monitor forgets embed's baselines, then takes the saved ones back.
    assert http_json(f"{mon}/v1/drift/baseline", {"action": "capture", "pipeline": "embed"})[0] == 202
    assert not embed_baseline(mon)["features"]
    status, body = http_json(f"{mon}/v1/drift/baseline", {"action": "load", "baseline": doc})
    assert status == 200 and body["loaded"], body
    assert by_key(embed_baseline(mon)) == saved

    # A second monitor starts from the file (no rollouts: one controller is enough).
    overrides = {"LOOM_MONITOR_DRIFT_BASELINE_FILE": str(path), "LOOM_MONITOR_ROLLOUT_ENABLED": "false"}
    _, ports = mesh.start_replica("monitor", "monitor-baseline", overrides=overrides)
    second = f"http://127.0.0.1:{ports['http']}"
    try:
        assert by_key(embed_baseline(second)) == saved
        # Traffic for both: neither captures a new reference, both compare the window with the loaded baseline.
        send(mesh, [sentence(rng, rng.randint(6, 14)) for _ in range(SENT)])

        def compared(url: str) -> dict[str, dict[str, Any]]:
            rows = drift(url, "embed")
            for key in saved:
                row = rows[key[3]]
                assert row["baseline_samples"] == REFERENCE and row["band"] != "capturing", row
                # Evaluated over all the values sent, in both monitors alike.
                assert row["window_samples"] == SENT and row["psi"] is not None, row
            return rows

        first = eventually(lambda: compared(mon), timeout=EVAL_S + 10)
        other = eventually(lambda: compared(second), timeout=EVAL_S + 10)
    finally:
        mesh.stop_replica("monitor-baseline")
    psi = {f: (first[f]["psi"], other[f]["psi"]) for f in ("text_chars", "text_tokens", "top_score")}
    # The same baseline and the same window of values: the same PSI in both monitors.
    assert all(abs(a - b) < 1e-6 for a, b in psi.values()), psi
    print(f"\nloaded baseline ({len(saved)} features, {REFERENCE} samples each); PSI (api, file): {psi}")
