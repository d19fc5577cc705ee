"""One rollout step's analysis: the canary compared with the stable version, as a pure function.

The verdict is ``fail`` as soon as a check is breached with enough canary requests to mean
something (``thresholds.min_requests_to_fail``) — a broken canary is rolled back within an
evaluation or two, not at the end of its window; ``pass`` once the step has seen its requests and
its time with no breach; ``wait`` otherwise.

Windows: the canary's requests, errors and latency count from the step's start (each step is judged
on its own traffic share); its output scores count from the rollout's start (the distribution does
not depend on the weight, and more samples mean a less noisy PSI). The stable version's window
starts with the rollout and covers at least the step's window: at a 100 % step stable receives
nothing new, so its evidence is what it did while the rollout ran.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from services.common.registry.schema import Analysis, Check, Rollout, Verdict
from services.monitor.drift import Baseline, psi
from services.monitor.versions import VersionWindow

#: Checks that only gate a pass; the others are breaches that fail the step.
GATES = ("requests", "window")


@dataclass(frozen=True)
class VersionAccuracy:
    """Judged answers (feedback) of one version."""

    samples: int = 0
    accuracy: float | None = None


@dataclass(frozen=True)
class Evidence:
    """What the monitor knows about both versions over the analysis windows."""

    canary: VersionWindow
    stable: VersionWindow
    canary_outputs: Mapping[str, Sequence[float]] = field(default_factory=dict)
    stable_outputs: Mapping[str, Sequence[float]] = field(default_factory=dict)
    canary_judged: VersionAccuracy = field(default_factory=VersionAccuracy)
    stable_judged: VersionAccuracy = field(default_factory=VersionAccuracy)


def canary_since(rollout: Rollout) -> int:
    return rollout.step_started_at_unix_ms


def outputs_since(rollout: Rollout) -> int:
    return rollout.started_at_unix_ms


def stable_since(rollout: Rollout, now_ms: int) -> int:
    window_ms = int(rollout.steps[rollout.step].window_s * 1000)
    return min(rollout.started_at_unix_ms, now_ms - window_ms)


def analyze(
    rollout: Rollout, evidence: Evidence, now_ms: int, *, min_output_samples: int = 200, bins: int = 10
) -> Analysis:
    """The analysis of the rollout's current step; ``min_output_samples`` per side before a PSI counts."""
    step = rollout.steps[rollout.step]
    th = rollout.thresholds
    canary, stable = evidence.canary, evidence.stable
    elapsed_s = max(0.0, (now_ms - rollout.step_started_at_unix_ms) / 1000.0)
    checks = [
        Check(
            name="requests",
            ok=canary.requests >= step.min_requests,
            value=float(canary.requests),
            threshold=float(step.min_requests),
            detail=f"{canary.requests} of {step.min_requests} canary requests in step {rollout.step + 1}",
        ),
        Check(
            name="window",
            ok=elapsed_s >= step.window_s,
            value=round(elapsed_s, 3),
            threshold=step.window_s,
            detail=f"step running {elapsed_s:.0f} s of {step.window_s:.0f} s",
        ),
        _error_rate(canary, stable, th.max_error_rate_diff),
        _latency(canary, stable, th.max_p95_ratio, th.min_p95_diff_ms),
        _output_psi(evidence, th.max_output_psi, min_output_samples, bins),
        _accuracy(evidence.canary_judged, evidence.stable_judged, th.max_accuracy_drop, th.min_feedback),
    ]
    breached = [c for c in checks if not c.ok and c.name not in GATES]
    gates_ok = all(c.ok for c in checks if c.name in GATES)
    verdict: Verdict
    if breached and canary.requests >= th.min_requests_to_fail:
        verdict = "fail"
    elif not breached and gates_ok:
        verdict = "pass"
    else:
        verdict = "wait"
    return Analysis(
        at_unix_ms=now_ms,
        step=rollout.step,
        verdict=verdict,
        canary_requests=canary.requests,
        stable_requests=stable.requests,
        checks=checks,
    )


def failed(analysis: Analysis) -> list[Check]:
    """The breached checks of an analysis (gates that are merely not reached yet are left out)."""
    return [c for c in analysis.checks if not c.ok and c.name not in GATES]


def _error_rate(canary: VersionWindow, stable: VersionWindow, limit: float) -> Check:
    if not canary.requests:
        return Check(name="error_rate", ok=True, threshold=limit, detail="no canary requests yet")
    diff = canary.error_rate - stable.error_rate
    # A breach must be more than noise: the canary's rate at the low end of its one-sided 95 %
    # interval must still exceed stable's by the limit (1 error in 20 requests is not 5 % proven).
    low = wilson_lower(canary.errors, canary.requests)
    base = (
        f"stable {stable.error_rate:.2%} ({stable.errors}/{stable.requests})"
        if stable.requests
        else "no stable requests (compared with 0 %)"
    )
    return Check(
        name="error_rate",
        ok=low - stable.error_rate <= limit,
        value=round(diff, 6),
        threshold=limit,
        detail=f"canary {canary.error_rate:.2%} ({canary.errors}/{canary.requests}, at least {low:.2%} "
        f"with 95 % confidence) vs {base}; fails above +{limit:.2%}",
    )


def wilson_lower(errors: int, requests: int, z: float = 1.645) -> float:
    """The lower end of the one-sided 95 % Wilson score interval of ``errors / requests``."""
    if requests <= 0:
        return 0.0
    p = errors / requests
    denom = 1 + z * z / requests
    centre = p + z * z / (2 * requests)
    margin = z * np.sqrt(p * (1 - p) / requests + z * z / (4 * requests * requests))
    return float(max(0.0, (centre - margin) / denom))


def _latency(canary: VersionWindow, stable: VersionWindow, ratio_limit: float, min_diff_ms: float) -> Check:
    if canary.p95_ms is None or stable.p95_ms is None:
        missing = "canary" if canary.p95_ms is None else "stable"
        return Check(name="latency_p95", ok=True, threshold=ratio_limit, detail=f"skipped: no {missing} latency yet")
    ratio = canary.p95_ms / stable.p95_ms if stable.p95_ms > 0 else float("inf")
    diff = canary.p95_ms - stable.p95_ms
    breach = ratio > ratio_limit and diff > min_diff_ms
    return Check(
        name="latency_p95",
        ok=not breach,
        value=round(ratio, 4) if np.isfinite(ratio) else None,
        threshold=ratio_limit,
        detail=f"canary p95 {canary.p95_ms:.1f} ms vs stable {stable.p95_ms:.1f} ms; "
        f"fails above {ratio_limit:g}x and +{min_diff_ms:g} ms",
    )


def _output_psi(evidence: Evidence, limit: float, min_samples: int, bins: int) -> Check:
    scores: dict[str, float] = {}
    short: list[str] = []
    for feature in sorted(set(evidence.canary_outputs) | set(evidence.stable_outputs)):
        c = np.asarray(evidence.canary_outputs.get(feature, ()), dtype=np.float64)
        s = np.asarray(evidence.stable_outputs.get(feature, ()), dtype=np.float64)
        if c.size < min_samples or s.size < min_samples:
            short.append(f"{feature} ({c.size} canary, {s.size} stable)")
            continue
        base = Baseline.from_sample(s, bins)  # bins from the stable sample: it is the reference
        scores[feature] = psi(base.proportions, base.proportions_of(c))
    if not scores:
        why = f"too few output scores: {', '.join(short)}" if short else "no output scores"
        return Check(
            name="output_psi", ok=True, threshold=limit, detail=f"skipped: {why}; needs {min_samples} per version"
        )
    worst = max(scores, key=lambda f: scores[f])
    listed = ", ".join(f"{f} {v:.3f}" for f, v in sorted(scores.items()))
    return Check(
        name="output_psi",
        ok=scores[worst] <= limit,
        value=round(scores[worst], 6),
        threshold=limit,
        detail=f"PSI of canary output scores vs stable: {listed}; fails above {limit:g}",
    )


def _accuracy(canary: VersionAccuracy, stable: VersionAccuracy, limit: float, min_feedback: int) -> Check:
    if canary.samples < min_feedback or stable.samples < min_feedback or None in (canary.accuracy, stable.accuracy):
        return Check(
            name="accuracy",
            ok=True,
            threshold=limit,
            detail=f"skipped: {canary.samples} canary and {stable.samples} stable judged answers; "
            f"needs {min_feedback} per version",
        )
    assert canary.accuracy is not None and stable.accuracy is not None
    drop = stable.accuracy - canary.accuracy
    return Check(
        name="accuracy",
        ok=drop <= limit,
        value=round(drop, 6),
        threshold=limit,
        detail=f"canary {canary.accuracy:.1%} ({canary.samples} judged) vs stable {stable.accuracy:.1%} "
        f"({stable.samples} judged); fails when {limit:.1%} lower",
    )
