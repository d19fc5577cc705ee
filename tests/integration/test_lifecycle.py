"""Model lifecycle on a real mesh: register, split, shadow, rollout, rollback, hot swap.

One mesh of its own, on a copy of the Triton repository (registering copies
version folders into it). The tests run in order and build on each other's
registry state: v2 is registered, takes part of the traffic, is rolled out and
promoted; a faulty v3 is rolled back by the monitor; v4 replaces v1 under load.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from services.common.launch.mesh import Mesh, free_ports
from services.inference.router import bucket
from tests.conftest import MONITOR_TEST_ENV
from tests.media import SENTENCES, sentence
from tests.support import TEST_API_KEY, copy_model_repository, eventually, http_json, metric, predict_http

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FAULTY = ROOT / "tests" / "fixtures" / "models" / "minilm_faulty" / "3"


@pytest.fixture(scope="module")
def life(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    repo = copy_model_repository(tmp_path_factory.mktemp("lifecycle") / "triton")
    m = Mesh(ports=free_ports(), model_repository=repo, env=MONITOR_TEST_ENV, api_key=TEST_API_KEY)
    failed = False
    try:
        m.start(timeout=240)
        yield m
    except BaseException:
        failed = True
        raise
    finally:
        m.stop(remove_workdir=not failed)


def admin(m: Mesh, path: str, body: Any = None, method: str | None = None) -> Any:
    status, doc = http_json(f"{m.gateway_http}/v1/admin/{path}", body, method=method, timeout=180)
    assert status in (200, 201), (path, status, doc)
    return doc


def loomctl(m: Mesh, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "tools.loomctl", "--gateway", m.gateway_http, "--monitor", m.monitor_http, *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        env={**os.environ, "LOOM_API_KEY": TEST_API_KEY},  # loomctl's credential
    )
    assert out.returncode == 0, out.stderr + out.stdout
    return out.stdout


def text_for(key: str, i: int) -> str:
    """Varied text, as real traffic is: a few fixed sentences give a few clusters of output scores,
    and a tiny systematic shift between versions (int8 vs fp32) then moves whole clusters across
    a PSI bin edge, which reads as output drift."""
    rng = random.Random(f"{key}:{i}")
    return sentence(rng, rng.randint(4, 14))


def ask(m: Mesh, key: str, i: int = 0) -> tuple[int, Any]:
    text = text_for(key, i)
    return predict_http(m.gateway_http, text, headers={"x-loom-route-key": key}, bypass_cache=True)


def version_of(body: Any) -> str:
    return str(body["outputs"]["text"]["model_version"])


@dataclass
class Load:
    """Steady background traffic with a route key per request; records every answer."""

    m: Mesh
    workers: int = 3
    results: list[tuple[float, str, int, str]] = field(default_factory=list)  # (t, key, status, version)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        for w in range(self.workers):
            t = threading.Thread(target=self._run, args=(w,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _run(self, worker: int) -> None:
        i = 0
        deadline = time.monotonic() + 600  # bounded even if a test forgets to stop it
        while not self._stop.is_set() and time.monotonic() < deadline:
            key = f"user-{worker}-{i}"
            status, body = ask(self.m, key, i)
            version = version_of(body) if status == 200 else ""
            self.results.append((time.time(), key, status, version))
            i += 1

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def failures(self) -> list[tuple[float, str, int, str]]:
        return [r for r in self.results if r[2] != 200]


def record(m: Mesh) -> dict[str, Any]:
    return admin(m, "models/minilm")  # type: ignore[no-any-return]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.resolve().read_bytes()).hexdigest()


# -- the tests, in order ---------------------------------------------------------


def test_v1_is_seeded_stable_and_v2_registers_with_metadata_and_loads(life: Mesh) -> None:
    rec = record(life)
    assert rec["policy"]["stable"] == "1" and rec["versions"]["1"]["semver"] == "1.0.0"

    source = life.model_repository / "minilm" / "2"
    rec = admin(life, "models/minilm/versions", {"source": str(source), "notes": "fp32 export"})
    assert rec["versions"]["2"]["semver"] == "2.0.0"
    assert rec["versions"]["2"]["artifacts"]["model.onnx"] == sha256(source / "model.onnx")
    status, ready = http_json(f"http://127.0.0.1:{life.ports['triton_http']}/v2/models/minilm/versions/2/ready")
    assert status == 200, ready

    shown = loomctl(life, "models", "show", "minilm")
    assert "2.0.0" in shown and sha256(source / "model.onnx")[:12] in shown, shown
    full = json.loads(loomctl(life, "models", "show", "minilm", "--json"))
    assert full["versions"]["2"]["artifacts"]["model.onnx"] == sha256(source / "model.onnx")
    # Registered is not serving: v2 takes no traffic until told to.
    status, body = ask(life, "someone")
    assert status == 200 and version_of(body) == "1"


def test_ninety_ten_split_is_sticky_and_shadow_sees_every_request(life: Mesh) -> None:
    loomctl(life, "traffic", "set", "minilm", "--stable", "1", "--canary", "2=10")
    keys = [f"k{i}" for i in range(2000)]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda ik: ask(life, ik[1], ik[0]), enumerate(keys)))
    assert all(status == 200 for status, _ in answers), [b for s, b in answers if s != 200][:3]
    versions = [version_of(body) for _, body in answers]
    share = Counter(versions)["2"] / len(versions) * 100
    print(f"canary share over {len(versions)} requests: {share:.2f} %")
    assert abs(share - 10) <= 3, share
    # The route is the hash bucket of the key: exactly the keys below 10 went to the canary.
    assert all((v == "2") == (bucket("minilm", k) < 10) for k, v in zip(keys, versions, strict=True))
    # Sticky: the same key gets the same version every time.
    for key, first in list(zip(keys, versions, strict=True))[:40]:
        again = {version_of(ask(life, key)[1]) for _ in range(3)}
        assert again == {first}, key

    loomctl(life, "traffic", "set", "minilm", "--stable", "1", "--shadow", "2")
    before = metric(life.http_url("inference"), "loom_shadow_total", model="minilm", version="2")
    n = 200
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: ask(life, f"s{i}", i), range(n)))
    assert {(s, version_of(b)) for s, b in answers} == {(200, "1")}  # the caller never sees the shadow
    eventually(
        lambda: metric(life.http_url("inference"), "loom_shadow_total", model="minilm", version="2") - before == n,
        timeout=30,
    )
    assert metric(life.http_url("inference"), "loom_shadow_total", model="minilm", version="2", result="ok") >= n


def test_manual_rollback_is_one_command_and_the_next_request_sees_it(life: Mesh) -> None:
    loomctl(life, "traffic", "set", "minilm", "--stable", "1", "--canary", "2=50")
    key = next(f"r{i}" for i in range(1000) if bucket("minilm", f"r{i}") < 50)
    assert version_of(ask(life, key)[1]) == "2"
    loomctl(life, "rollback", "minilm", "--reason", "operator test")
    status, body = ask(life, key)
    assert status == 200 and version_of(body) == "1"
    assert record(life)["policy"].get("canary") is None


def test_good_version_rolls_out_automatically_to_100_percent(life: Mesh) -> None:
    with Load(life) as load:
        loomctl(
            life, "rollout", "start", "minilm", "2", "--steps", "10,50,100", "--min-requests", "15", "--window", "2"
        )

        def promoted() -> dict[str, Any]:
            rec = record(life)
            assert rec["policy"]["stable"] == "2", rec["rollout"]
            return rec

        rec = eventually(promoted, timeout=240, interval=1.0)
    assert rec["rollout"]["state"] == "succeeded", rec["rollout"]
    assert load.failures() == [], load.failures()[:5]
    assert {v for *_, v in load.results} == {"1", "2"}
    actions = [e["action"] for e in admin(life, "audit?model=minilm&limit=50")["entries"]]
    assert actions.count("rollout.step") == 2 and "rollout.promote" in actions, actions


def test_faulty_version_is_rolled_back_within_a_minute_with_alert_and_audit(life: Mesh) -> None:
    admin(life, "models/minilm/versions", {"source": str(FAULTY), "notes": "fails a third of its inputs"})
    with Load(life, workers=4) as load:
        loomctl(
            life, "rollout", "start", "minilm", "3", "--steps", "10,50,100", "--min-requests", "200", "--window", "60"
        )
        rec = eventually(
            lambda: (r := record(life))["rollout"]["state"] == "rolled_back" and r, timeout=120, interval=0.5
        )
        time.sleep(2)  # traffic after the rollback: stable only
    rollout = rec["rollout"]
    assert rec["policy"]["stable"] == "2" and rec["policy"].get("canary") is None
    failures = load.failures()
    assert failures, "the faulty canary should have failed some requests"
    # Only the canary's own errors: every failed request had a key inside the canary's 10 % range.
    assert all(bucket("minilm", key) < 10 for _, key, _, _ in failures), failures[:5]
    breach = failures[0][0]
    assert rollout["finished_at_unix_ms"] / 1000 - breach < 60, (rollout, breach)
    print(f"rolled back {rollout['finished_at_unix_ms'] / 1000 - breach:.1f} s after the first canary error")
    after = [r for r in load.results if r[0] > rollout["finished_at_unix_ms"] / 1000 + 1]
    assert after and all(status == 200 and version == "2" for _, _, status, version in after)

    _, alerts = http_json(f"{life.monitor_http}/v1/alerts")
    assert any(a["name"] == "LoomRolloutRolledBack" for a in alerts["alerts"]), alerts
    audit = loomctl(life, "audit", "--model", "minilm", "--json")
    entries = json.loads(audit)
    rollback = [e for e in entries if e["action"] == "rollout.rollback"]
    assert rollback and rollback[-1]["actor"] == "monitor", entries[-5:]


def test_hot_swap_under_load_fails_no_request(life: Mesh, tmp_path: Path) -> None:
    v4 = tmp_path / "4"
    shutil.copytree(life.model_repository / "minilm" / "1", v4, symlinks=True)
    meta = (v4 / "metadata.yaml").read_text().replace("semver: 1.0.0", "semver: 1.0.1")
    (v4 / "metadata.yaml").write_text(meta)
    with Load(life, workers=4) as load:
        time.sleep(1)
        admin(life, "models/minilm/versions", {"source": str(v4)})
        loomctl(life, "promote", "minilm", "4")
        loomctl(life, "models", "retire", "minilm", "1")
        loomctl(life, "models", "retire", "minilm", "3")
        time.sleep(2)
    assert load.failures() == [], load.failures()[:5]
    assert len(load.results) > 50
    assert load.results[-1][3] == "4"
    status, _ = http_json(f"http://127.0.0.1:{life.ports['triton_http']}/v2/models/minilm/versions/1/ready")
    assert status != 200  # unloaded from Triton
    assert record(life)["versions"]["1"]["state"] == "retired"


def test_short_texts_go_to_the_light_version_and_the_answer_says_so(life: Mesh) -> None:
    # Version 4 is the int8 model (a quarter of fp32's size); version 2 the fp32 export.
    loomctl(life, "traffic", "set", "minilm", "--stable", "2", "--rule", "short:4:max_tokens=8")
    before = metric(life.http_url("inference"), "loom_route_total", model="minilm", version="4", reason="rule:short")
    status, short = predict_http(life.gateway_http, "Goal!", bypass_cache=True)
    assert status == 200 and version_of(short) == "4", short
    assert short["notes"]["text/inference.route"] == "rule:short", short["notes"]
    status, long = predict_http(life.gateway_http, SENTENCES[0] + " " + SENTENCES[1], bypass_cache=True)
    assert status == 200 and version_of(long) == "2", long
    assert long["notes"]["text/inference.route"] == "stable", long["notes"]
    after = metric(life.http_url("inference"), "loom_route_total", model="minilm", version="4", reason="rule:short")
    assert after - before == 1


def test_ab_experiment_splits_by_key_and_counts_each_arm(life: Mesh) -> None:
    loomctl(life, "traffic", "set", "minilm", "--stable", "2", "--experiment", "ab", "--arm", "2=50", "--arm", "4=50")
    inference = life.http_url("inference")
    before = {v: metric(inference, "loom_route_total", model="minilm", version=v, reason="arm:ab") for v in ("2", "4")}
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: ask(life, f"ab{i}", i), range(300)))
    assert all(status == 200 for status, _ in answers)
    arms = Counter(version_of(body) for _, body in answers)
    assert set(arms) == {"2", "4"} and all(90 <= n <= 210 for n in arms.values()), arms
    assert {body["notes"]["text/inference.route"] for _, body in answers} == {"arm:ab"}
    for version in ("2", "4"):  # per-arm counts, as Prometheus sees them
        seen = metric(inference, "loom_route_total", model="minilm", version=version, reason="arm:ab")
        assert seen - before[version] == arms[version]

    # The monitor's per-version view has both arms with their own latency.
    def both_arms() -> dict[str, dict[str, Any]]:
        _, doc = http_json(f"{life.monitor_http}/v1/versions?window_s=30")
        rows = {r["version"]: r for r in doc["versions"] if r["model"] == "minilm"}
        assert all(rows.get(v, {}).get("requests", 0) >= arms[v] and rows[v]["p95_ms"] for v in ("2", "4")), rows
        return rows

    rows = eventually(both_arms, timeout=15)
    print({v: (rows[v]["requests"], rows[v]["p95_ms"]) for v in ("2", "4")})
