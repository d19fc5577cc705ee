"""A rollout step's analysis, as a pure function: pass, wait and each way to fail."""

from __future__ import annotations

import numpy as np
import pytest

from services.common.registry.schema import Analysis, Rollout, RolloutStep, Thresholds
from services.monitor.analysis import (
    Evidence,
    VersionAccuracy,
    analyze,
    canary_since,
    failed,
    outputs_since,
    stable_since,
    wilson_lower,
)
from services.monitor.rollout import judged_by_version, rollback_reason
from services.monitor.versions import VersionWindow

pytestmark = pytest.mark.unit

T0 = 1_700_000_000_000
STEPS = [RolloutStep(weight=10, min_requests=200, window_s=300), RolloutStep(weight=100, min_requests=100)]


def rollout(step: int = 0, step_started: int = T0, thresholds: Thresholds | None = None) -> Rollout:
    return Rollout(
        id="r1",
        model="minilm",
        version="2",
        baseline="1",
        steps=STEPS,
        thresholds=thresholds or Thresholds(),
        step=step,
        started_at_unix_ms=T0,
        step_started_at_unix_ms=step_started,
    )


def healthy(requests: int = 300, **changes: object) -> Evidence:
    fields: dict[str, object] = {
        "canary": VersionWindow(requests, 1, 52.0),
        "stable": VersionWindow(3000, 9, 50.0),
    }
    fields.update(changes)
    return Evidence(**fields)  # type: ignore[arg-type]


def check(analysis: Analysis, name: str) -> tuple[bool, float | None, str]:
    found = next(c for c in analysis.checks if c.name == name)
    return found.ok, found.value, found.detail


AFTER_WINDOW = T0 + 301_000


def test_a_healthy_canary_passes_once_it_has_its_requests_and_its_time() -> None:
    a = analyze(rollout(), healthy(), AFTER_WINDOW)
    assert a.verdict == "pass" and failed(a) == []
    assert (a.step, a.canary_requests, a.stable_requests, a.at_unix_ms) == (0, 300, 3000, AFTER_WINDOW)
    assert [c.name for c in a.checks] == ["requests", "window", "error_rate", "latency_p95", "output_psi", "accuracy"]
    assert "skipped" in check(a, "output_psi")[2] and "skipped" in check(a, "accuracy")[2]


def test_too_few_canary_requests_waits() -> None:
    a = analyze(rollout(), healthy(requests=150), AFTER_WINDOW)
    assert a.verdict == "wait"
    assert check(a, "requests") == (False, 150.0, "150 of 200 canary requests in step 1")


def test_a_step_waits_for_its_window_even_with_enough_requests() -> None:
    a = analyze(rollout(), healthy(requests=5000), T0 + 120_000)
    assert a.verdict == "wait"
    ok, value, _ = check(a, "window")
    assert not ok and value == pytest.approx(120.0)


def test_an_error_rate_breach_fails_at_once_without_waiting_for_the_window() -> None:
    evidence = healthy(requests=40, canary=VersionWindow(40, 8, 50.0))
    a = analyze(rollout(), evidence, T0 + 10_000)
    assert a.verdict == "fail"
    ok, value, detail = check(a, "error_rate")
    assert not ok and value == pytest.approx(0.2 - 0.003)
    assert "canary 20.00% (8/40, at least" in detail
    assert [c.name for c in failed(a)] == ["error_rate"]


def test_one_stray_error_is_noise_not_a_breach() -> None:
    # 1 error in 20 canary requests is 5 % observed, but not proven above stable's 0.3 % + 1 point.
    a = analyze(rollout(), healthy(requests=20, canary=VersionWindow(20, 1, 50.0)), T0 + 10_000)
    assert check(a, "error_rate")[0] and a.verdict != "fail"
    assert wilson_lower(1, 20) < 0.02 < 0.1 < wilson_lower(7, 20)


def test_a_breach_seen_on_too_few_requests_only_waits() -> None:
    a = analyze(rollout(), healthy(canary=VersionWindow(10, 5, 50.0)), T0 + 10_000)
    assert a.verdict == "wait" and not check(a, "error_rate")[0]
    th = Thresholds(min_requests_to_fail=5)
    assert analyze(rollout(thresholds=th), healthy(canary=VersionWindow(10, 5, 50.0)), T0 + 10_000).verdict == "fail"


def test_errors_without_stable_traffic_are_compared_with_zero() -> None:
    a = analyze(rollout(), healthy(canary=VersionWindow(100, 5, 50.0), stable=VersionWindow()), T0 + 10_000)
    assert a.verdict == "fail" and "no stable requests" in check(a, "error_rate")[2]


def test_latency_fails_on_ratio_and_difference_together() -> None:
    slow = healthy(canary=VersionWindow(300, 0, 160.0))
    a = analyze(rollout(), slow, AFTER_WINDOW)
    assert a.verdict == "fail"
    assert check(a, "latency_p95")[:2] == (False, pytest.approx(3.2))
    # Three times slower but only 4 ms apart: noise, not a regression.
    fast = healthy(canary=VersionWindow(300, 0, 6.0), stable=VersionWindow(3000, 0, 2.0))
    assert analyze(rollout(), fast, AFTER_WINDOW).verdict == "pass"
    # 15 ms slower but within the ratio: fine too.
    assert analyze(rollout(), healthy(canary=VersionWindow(300, 0, 65.0)), AFTER_WINDOW).verdict == "pass"


def test_output_drift_fails_on_a_shifted_score_distribution() -> None:
    rng = np.random.default_rng(0)
    stable_scores = rng.normal(0.8, 0.05, 1000).tolist()
    same = rng.normal(0.8, 0.05, 400).tolist()
    shifted = rng.normal(0.6, 0.05, 400).tolist()
    ok = analyze(
        rollout(),
        healthy(canary_outputs={"top_score": same}, stable_outputs={"top_score": stable_scores}),
        AFTER_WINDOW,
    )
    assert ok.verdict == "pass" and check(ok, "output_psi")[1] is not None
    bad = analyze(
        rollout(),
        healthy(canary_outputs={"top_score": shifted}, stable_outputs={"top_score": stable_scores}),
        AFTER_WINDOW,
    )
    assert bad.verdict == "fail"
    passed, value, detail = check(bad, "output_psi")
    assert not passed and value is not None and value > 1.0 and "top_score" in detail


def test_output_drift_is_skipped_with_too_few_scores() -> None:
    evidence = healthy(canary_outputs={"top_score": [0.1] * 50}, stable_outputs={"top_score": [0.9] * 1000})
    a = analyze(rollout(), evidence, AFTER_WINDOW)
    ok, value, detail = check(a, "output_psi")
    assert ok and value is None and "top_score (50 canary, 1000 stable)" in detail
    assert a.verdict == "pass"
    assert analyze(rollout(), evidence, AFTER_WINDOW, min_output_samples=50).verdict == "fail"


def test_accuracy_counts_only_with_enough_feedback_on_both_sides() -> None:
    worse = healthy(canary_judged=VersionAccuracy(50, 0.70), stable_judged=VersionAccuracy(400, 0.90))
    a = analyze(rollout(), worse, AFTER_WINDOW)
    assert a.verdict == "fail" and check(a, "accuracy")[:2] == (False, pytest.approx(0.2))
    close = healthy(canary_judged=VersionAccuracy(50, 0.88), stable_judged=VersionAccuracy(400, 0.90))
    assert analyze(rollout(), close, AFTER_WINDOW).verdict == "pass"
    few = healthy(canary_judged=VersionAccuracy(5, 0.0), stable_judged=VersionAccuracy(400, 0.90))
    a = analyze(rollout(), few, AFTER_WINDOW)
    assert a.verdict == "pass"
    assert check(a, "accuracy") == (True, None, "skipped: 5 canary and 400 stable judged answers; needs 20 per version")
    assert check(analyze(rollout(), healthy(), AFTER_WINDOW), "accuracy")[0]


def test_windows_canary_per_step_stable_since_the_rollout_and_at_least_a_step_window() -> None:
    r = rollout(step=1, step_started=T0 + 400_000)
    assert canary_since(r) == T0 + 400_000 and outputs_since(r) == T0
    assert stable_since(r, T0 + 500_000) == T0
    early = rollout(step=0, step_started=T0)
    assert stable_since(early, T0 + 10_000) == T0 + 10_000 - 300_000


def test_rollback_reason_names_the_failed_checks() -> None:
    a = analyze(rollout(), healthy(canary=VersionWindow(300, 60, 400.0)), AFTER_WINDOW)
    reason = rollback_reason(rollout(), a)
    assert reason.startswith("automatic rollback of version 2 at step 1: error_rate: canary 20.00%")
    assert "latency_p95: canary p95 400.0 ms" in reason and "requests" not in reason


def test_accuracy_rows_are_summed_over_pipelines_per_version() -> None:
    rows: list[dict[str, object]] = [
        {"pipeline": "a", "model": "m", "version": "1", "samples": 30, "accuracy": 1.0},
        {"pipeline": "b", "model": "m", "version": "1", "samples": 10, "accuracy": 0.6},
        {"pipeline": "a", "model": "m", "version": "2", "samples": 0, "accuracy": None},
    ]
    judged = judged_by_version(rows)
    assert judged == {("m", "1"): VersionAccuracy(40, pytest.approx(0.9))}  # type: ignore[arg-type]
