"""Per model version evidence for rollouts: requests, errors, latency, output scores, shadow agreement.

The other books drop failed inference events before they see them (an error has no features to
drift); a canary's errors are exactly what a rollout must see, so this book takes inference events
of every code. Requests go into 10 s buckets with the SLO book's latency histogram
(:class:`services.monitor.series.PipelineSeries`), so any window since a rollout or a step started
is a sum of buckets; windows are exact to one bucket. Output scores (postprocess events) and shadow
agreements are kept as bounded timestamped samples. Time is the monitor's receive time, as for the
SLO series, so other hosts' clocks do not matter.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.monitor.series import PipelineSeries, is_server_error, quantile_ms

INFER = "loom.infer."
POST = "loom.post."
SHADOW = "loom.shadow."

K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True)
class VersionWindow:
    """One version's requests over a window."""

    requests: int = 0
    errors: int = 0  # server errors only: a caller's bad input is not the version's fault
    p95_ms: float | None = None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass
class _Shadow:
    samples: deque[tuple[int, float]]  # (t, agreement)
    requests: int = 0
    errors: int = 0


class VersionBook:
    """Evidence per (model, version), with a bounded number of keys and samples."""

    def __init__(self, bucket_s: int = 10, keep_s: int = 3600, samples: int = 2000, max_keys: int = 100) -> None:
        self.bucket_s = bucket_s
        self.keep_s = keep_s
        self.samples = samples
        self.max_keys = max_keys
        self.dropped = 0  # events refused because their key would exceed max_keys
        self._requests: dict[tuple[str, str], PipelineSeries] = {}
        self._outputs: dict[tuple[str, str, str], deque[tuple[int, float]]] = {}
        self._shadows: dict[tuple[str, str], _Shadow] = {}

    def record(self, event: pb.TelemetryEvent, now_ms: int) -> None:
        """Take what a rollout needs from one telemetry event; others are ignored."""
        model, version, code = event.model, event.model_version, event.code or "OK"
        if not model or not version:  # no version: nothing to compare (a failure before routing)
            return
        if event.stage.startswith(INFER):
            series = self._get(self._requests, (model, version), lambda: PipelineSeries(self.bucket_s, self.keep_s))
            if series is not None:
                series.record(event.duration_ms, code, now_ms)
        elif event.stage.startswith(SHADOW):
            shadow = self._get(self._shadows, (model, version), lambda: _Shadow(deque(maxlen=self.samples)))
            if shadow is None:
                return
            shadow.requests += 1
            shadow.errors += is_server_error(code)
            agreement = event.stats.get("agreement")
            if code == "OK" and agreement is not None and np.isfinite(agreement):
                shadow.samples.append((now_ms, float(agreement)))
        elif event.stage.startswith(POST) and code == "OK":
            for feature, value in event.stats.items():
                if not np.isfinite(value):
                    continue
                out = self._get(self._outputs, (model, version, feature), lambda: deque(maxlen=self.samples))
                if out is not None:
                    out.append((now_ms, float(value)))

    def _get(self, table: dict[K, V], key: K, new: Callable[[], V]) -> V | None:
        found = table.get(key)
        if found is None:
            if len(self._requests) + len(self._outputs) + len(self._shadows) >= self.max_keys:
                self.dropped += 1
                return None
            found = table[key] = new()
        return found

    # -- queries ------------------------------------------------------------
    def window(self, model: str, version: str, since_ms: int, now_ms: int) -> VersionWindow:
        """Requests, server errors and p95 of one version from ``since_ms`` (to bucket resolution) to now."""
        series = self._requests.get((model, version))
        if series is None:
            return VersionWindow()
        w = series.window(now_ms, max(0.0, (now_ms - since_ms) / 1000.0))
        return VersionWindow(w.count, w.errors, quantile_ms(w.hist, 0.95))

    def outputs(self, model: str, version: str, since_ms: int) -> dict[str, list[float]]:
        """Output scores per feature recorded at or after ``since_ms`` (the newest ``samples`` at most)."""
        return {
            feature: [v for t, v in values if t >= since_ms]
            for (m, ver, feature), values in self._outputs.items()
            if m == model and ver == version
        }

    def shadow(self, model: str, version: str, since_ms: int) -> dict[str, object] | None:
        """Shadow copies of one version: counts since it was first seen, agreement since ``since_ms``."""
        shadow = self._shadows.get((model, version))
        if shadow is None:
            return None
        recent = np.asarray([a for t, a in shadow.samples if t >= since_ms], dtype=np.float64)
        return {
            "requests": shadow.requests,
            "errors": shadow.errors,
            "samples": int(recent.size),
            "agreement_mean": round(float(recent.mean()), 6) if recent.size else None,
            "agreement_p05": round(float(np.percentile(recent, 5)), 6) if recent.size else None,
        }

    def keys(self) -> list[tuple[str, str]]:
        """Every (model, version) with requests, outputs or shadow copies."""
        found = set(self._requests) | set(self._shadows) | {(m, v) for m, v, _ in self._outputs}
        return sorted(found, key=lambda k: (k[0], _numeric(k[1])))

    def snapshot(self, now_ms: int, window_s: float) -> list[dict[str, object]]:
        """One row per (model, version) over the last ``window_s``, for GET /v1/versions."""
        since = int(now_ms - window_s * 1000)
        rows: list[dict[str, object]] = []
        for model, version in self.keys():
            w = self.window(model, version, since, now_ms)
            outputs = self.outputs(model, version, since)
            rows.append(
                {
                    "model": model,
                    "version": version,
                    "window_s": window_s,
                    "requests": w.requests,
                    "errors": w.errors,
                    "error_rate": round(w.error_rate, 6),
                    "p95_ms": None if w.p95_ms is None else round(w.p95_ms, 3),
                    "outputs": {f: len(v) for f, v in sorted(outputs.items())},
                    "shadow": self.shadow(model, version, since),
                }
            )
        return rows

    def items(self) -> int:
        """Samples held (output scores and shadow agreements), for the buffer gauges."""
        return sum(len(v) for v in self._outputs.values()) + sum(len(s.samples) for s in self._shadows.values())


def _numeric(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (0, version)
