"""The built-in alert rules, as plain functions of the monitor's signals.

Each returns :class:`Condition` instances (active or not); the same
thresholds are written as Prometheus rules in deploy/monitoring/rules.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from services.common.pipelines import SloSpec
from services.monitor.alerts import Condition, condition
from services.monitor.dlq_watch import DlqWatch
from services.monitor.series import SloBook
from services.monitor.triton_watch import TritonWatch


@dataclass(frozen=True)
class Thresholds:
    latency_p1_ms: float = 3000.0
    latency_min_requests: int = 10
    drift_alert: float = 0.2
    accuracy_drop_points: float = 5.0
    accuracy_drop_p1_points: float = 10.0
    burn_rate: float = 14.4
    saturation: float = 0.8
    saturation_for_s: float = 300.0
    dropping_window_s: float = 300.0


def model_unavailable(triton: TritonWatch, starting: bool = False) -> list[Condition]:
    """``starting``: the monitor is in its start-up grace and Triton has not answered yet (no alert)."""
    if starting and not triton.seen_up:
        return []
    down = {model: (version, why) for model, version, why in triton.unavailable()}
    return [
        condition(
            "LoomModelUnavailable",
            "P1",
            {"model": name, "version": down.get(name, (triton.last_version.get(name, ""), ""))[0]},
            name in down,
            1.0 if name in down else 0.0,
            f"model {name} is unavailable: {down[name][1]}" if name in down else f"model {name} serves",
        )
        for name in triton.names
    ]


def dead_letters(dlq: DlqWatch) -> list[Condition]:
    """One P2 per stage with letters in LOOM_DLQ: work the durable lane gave up on, which nothing retries."""
    return [
        condition(
            "LoomDeadLetters",
            "P2",
            {"stage": stage},
            n > 0,
            float(n),
            f"{n} message{'' if n == 1 else 's'} in the dead-letter stream (stage {stage}); inspect with "
            f"`loomctl dlq list --stage {stage}`, replay with `loomctl dlq replay <seq>`",
        )
        for stage, n in sorted(dlq.counts.items())
    ]


def high_latency(slo: SloBook, now_ms: int, t: Thresholds) -> list[Condition]:
    out = []
    for pipeline in slo.series:
        p95, count = slo.fast_p95_ms(pipeline, now_ms)
        active = p95 is not None and count >= t.latency_min_requests and p95 > t.latency_p1_ms
        out.append(
            condition(
                "LoomHighLatency",
                "P1",
                {"pipeline": pipeline},
                active,
                (p95 or 0.0) / 1000.0,
                f"{pipeline}: p95 latency {(p95 or 0) / 1000:.2f} s over the last {slo.windows.fast_s} s "
                f"(limit {t.latency_p1_ms / 1000:.1f} s)",
            )
        )
    return out


def slo_burn(slo: SloBook, specs: dict[str, SloSpec], now_ms: int, t: Thresholds) -> list[Condition]:
    out = []
    for pipeline in slo.series:
        rates = slo.burn_rates(pipeline, specs.get(pipeline, SloSpec()), now_ms)
        for name, r in rates.items():
            active = r["short"] > t.burn_rate and r["long"] > t.burn_rate
            out.append(
                condition(
                    "LoomSLOBurn",
                    "warning",
                    {"pipeline": pipeline, "slo": name},
                    active,
                    min(r["short"], r["long"]),
                    f"{pipeline}: {name} error budget burning {r['short']:.1f}x (short) / {r['long']:.1f}x (long)",
                )
            )
    return out


def drift_high(drift: list[dict[str, object]], t: Thresholds) -> list[Condition]:
    out = []
    for d in drift:
        psi = d.get("psi")
        value = float(psi) if isinstance(psi, int | float) else 0.0
        labels = {k: str(d[k]) for k in ("pipeline", "model", "version", "feature")}
        out.append(
            condition(
                "LoomDriftHigh",
                "P2",
                labels,
                value > t.drift_alert,
                value,
                f"{labels['pipeline']}/{labels['model']}:{labels['version']} {d.get('kind', 'input')} feature "
                f"{labels['feature']} drifted: PSI {value:.3f} > {t.drift_alert}",
            )
        )
    return out


def accuracy_drop(accuracy: list[dict[str, object]], t: Thresholds) -> list[Condition]:
    """P2 past ``accuracy_drop_points``, P1 past ``accuracy_drop_p1_points`` (one alert, its severity by size)."""
    out = []
    for a in accuracy:
        drop = a.get("drop_points")
        value = float(drop) if isinstance(drop, int | float) else 0.0
        labels = {k: str(a[k]) for k in ("pipeline", "model", "version")}
        out.append(
            condition(
                "LoomAccuracyDrop",
                "P1" if value > t.accuracy_drop_p1_points else "P2",
                labels,
                value > t.accuracy_drop_points,
                value,
                f"{labels['pipeline']} {labels['model']}:{labels['version']} accuracy {a.get('accuracy')} is "
                f"{value:.1f} points below its reference {a.get('reference_accuracy')}",
            )
        )
    return out


def saturation(triton: TritonWatch, t: Thresholds) -> list[Condition]:
    out = []
    for resource, metric in (("cpu", "nv_cpu_utilization"), ("gpu", "nv_gpu_utilization")):
        value = triton.gauge(metric)
        if value is None:
            continue
        out.append(
            condition(
                "LoomResourceSaturation",
                "warning",
                {"resource": resource},
                value > t.saturation,
                value,
                f"{resource} utilisation {value:.0%} > {t.saturation:.0%}",
                for_s=t.saturation_for_s,
            )
        )
    return out


@dataclass
class DropWatch:
    """Remembers the monitor's drop counters to tell whether they moved recently."""

    samples: dict[str, deque[tuple[int, float]]] = field(default_factory=dict)

    def conditions(self, totals: dict[str, float], now_ms: int, t: Thresholds) -> list[Condition]:
        out = []
        for buffer, total in totals.items():
            history = self.samples.setdefault(buffer, deque(maxlen=1024))
            history.append((now_ms, total))
            while len(history) > 1 and history[0][0] < now_ms - t.dropping_window_s * 1000:
                history.popleft()
            moved = total - history[0][1]
            out.append(
                condition(
                    "LoomMonitorDropping",
                    "warning",
                    {"buffer": buffer},
                    moved > 0,
                    moved,
                    f"the monitor dropped {moved:.0f} {buffer} items in the last {t.dropping_window_s:.0f} s",
                )
            )
        return out
