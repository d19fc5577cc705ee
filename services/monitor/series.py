"""Per-pipeline request series and SLOs, from the gateway's telemetry.

Time is cut into fixed buckets (10 s by default) kept for the long SLO
window. Each bucket holds counts and a log-spaced latency histogram, so any
window's percentiles, error ratio and slow-request ratio come from summing
buckets: memory is bounded by the window, not by the traffic.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from services.common.pipelines import SloSpec

# Upper bounds of the latency histogram's bins: 0.1 ms .. 300 s, about 8 % apart.
EDGES_MS = np.geomspace(0.1, 300_000.0, 200)
#: Codes that are the caller's fault: they do not spend the error budget.
CLIENT_CODES = frozenset(
    {"INVALID_ARGUMENT", "NOT_FOUND", "UNAUTHENTICATED", "PERMISSION_DENIED", "FAILED_PRECONDITION"}
)


def is_server_error(code: str) -> bool:
    return code not in ("", "OK") and code not in CLIENT_CODES


@dataclass
class Bucket:
    start_ms: int
    count: int = 0
    errors: int = 0
    hist: np.ndarray = field(default_factory=lambda: np.zeros(len(EDGES_MS) + 1, dtype=np.int64))

    def add(self, other: Bucket) -> None:
        self.count += other.count
        self.errors += other.errors
        self.hist += other.hist


def quantile_ms(hist: np.ndarray, q: float) -> float | None:
    """The ``q`` quantile of a histogram over EDGES_MS, interpolated inside its bin."""
    total = int(hist.sum())
    if total == 0:
        return None
    rank = q * total
    cumulative = np.cumsum(hist)
    i = int(np.searchsorted(cumulative, rank, side="left"))
    lower = 0.0 if i == 0 else float(EDGES_MS[i - 1])
    upper = float(EDGES_MS[min(i, len(EDGES_MS) - 1)])
    before = 0 if i == 0 else int(cumulative[i - 1])
    inside = int(hist[i])
    frac = (rank - before) / inside if inside else 1.0
    return lower + (upper - lower) * min(max(frac, 0.0), 1.0)


def above(hist: np.ndarray, threshold_ms: float) -> int:
    """How many samples are slower than ``threshold_ms`` (bin resolution)."""
    i = int(np.searchsorted(EDGES_MS, threshold_ms, side="left"))
    return int(hist[i + 1 :].sum())


class PipelineSeries:
    """Buckets of one pipeline, newest last, bounded to ``keep_s``."""

    def __init__(self, bucket_s: int, keep_s: int) -> None:
        self.bucket_ms = bucket_s * 1000
        self.buckets: deque[Bucket] = deque(maxlen=max(1, keep_s // bucket_s + 1))

    def record(self, duration_ms: float, code: str, now_ms: int) -> None:
        start = now_ms - now_ms % self.bucket_ms
        if not self.buckets or self.buckets[-1].start_ms < start:
            self.buckets.append(Bucket(start))
        bucket = self.buckets[-1]
        bucket.count += 1
        bucket.errors += is_server_error(code)
        bucket.hist[int(np.searchsorted(EDGES_MS, duration_ms, side="left"))] += 1

    def window(self, now_ms: int, seconds: float) -> Bucket:
        since = now_ms - seconds * 1000
        total = Bucket(int(since))
        for bucket in reversed(self.buckets):
            if bucket.start_ms + self.bucket_ms <= since:
                break
            total.add(bucket)
        return total

    def points(self, now_ms: int, n: int) -> list[dict[str, object]]:
        """Up to the last ``n`` buckets as chart points (empty ones included), from the first request on."""
        if not self.buckets:
            return []
        last = now_ms - now_ms % self.bucket_ms
        first = max(last - (n - 1) * self.bucket_ms, self.buckets[0].start_ms)
        by_start = {b.start_ms: b for b in self.buckets}
        out: list[dict[str, object]] = []
        for start in range(first, last + 1, self.bucket_ms):
            b = by_start.get(start) or Bucket(start)
            seconds = max(1.0, min(self.bucket_ms, now_ms - start) / 1000.0)
            out.append(
                {
                    "t": start,
                    "rps": round(b.count / seconds, 3),
                    "p50_ms": _round(quantile_ms(b.hist, 0.50)),
                    "p95_ms": _round(quantile_ms(b.hist, 0.95)),
                    "p99_ms": _round(quantile_ms(b.hist, 0.99)),
                    "error_rate": round(b.errors / b.count, 6) if b.count else 0.0,
                }
            )
        return out

    def rate(self, now_ms: int, seconds: float) -> float:
        """Requests per second over the last ``seconds`` (or since the first request, if later)."""
        if not self.buckets:
            return 0.0
        span = min(seconds, max(1.0, (now_ms - self.buckets[0].start_ms) / 1000.0))
        return self.window(now_ms, span).count / span


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


@dataclass
class SloWindows:
    short_s: int = 300
    long_s: int = 3600
    #: The window of the P1 latency rule and of the percentiles shown.
    fast_s: int = 60


class SloBook:
    """Series and SLO state for every pipeline the gateway answers."""

    def __init__(self, windows: SloWindows | None = None, bucket_s: int = 10, max_pipelines: int = 200) -> None:
        self.windows = windows or SloWindows()
        self.bucket_s = bucket_s
        self.max_pipelines = max_pipelines
        self.series: dict[str, PipelineSeries] = {}
        self.dropped = 0

    def record(self, pipeline: str, duration_ms: float, code: str, now_ms: int) -> None:
        series = self.series.get(pipeline)
        if series is None:
            if len(self.series) >= self.max_pipelines:
                self.dropped += 1
                return
            series = self.series[pipeline] = PipelineSeries(self.bucket_s, self.windows.long_s)
        series.record(duration_ms, code, now_ms)

    def burn_rates(self, pipeline: str, slo: SloSpec, now_ms: int) -> dict[str, dict[str, float]]:
        """Error-budget burn rate per SLO and window: 1.0 spends the budget exactly over the SLO period."""
        series = self.series[pipeline]
        out: dict[str, dict[str, float]] = {"availability": {}, "latency": {}}
        for name, seconds in (("short", self.windows.short_s), ("long", self.windows.long_s)):
            w = series.window(now_ms, seconds)
            errors = w.errors / w.count if w.count else 0.0
            slow = above(w.hist, slo.latency_p95_ms) / w.count if w.count else 0.0
            out["availability"][name] = round(errors / (1.0 - slo.success), 4)
            out["latency"][name] = round(slow / 0.05, 4)
        return out

    def fast_p95_ms(self, pipeline: str, now_ms: int) -> tuple[float | None, int]:
        w = self.series[pipeline].window(now_ms, self.windows.fast_s)
        return quantile_ms(w.hist, 0.95), w.count

    def snapshot(self, slos: dict[str, SloSpec], now_ms: int, points: int = 60) -> list[dict[str, object]]:
        out = []
        for pipeline, series in sorted(self.series.items()):
            slo = slos.get(pipeline, SloSpec())
            w = series.window(now_ms, self.windows.short_s)
            long = series.window(now_ms, self.windows.long_s)
            p95 = quantile_ms(w.hist, 0.95)
            success = 1.0 - long.errors / long.count if long.count else 1.0
            out.append(
                {
                    "pipeline": pipeline,
                    "slo": {"latency_p95_ms": slo.latency_p95_ms, "success": slo.success},
                    "window_s": self.windows.short_s,
                    "requests": w.count,
                    "errors": w.errors,
                    "error_rate": round(w.errors / w.count, 6) if w.count else 0.0,
                    "throughput_rps": round(series.rate(now_ms, self.windows.fast_s), 3),
                    "p50_ms": _round(quantile_ms(w.hist, 0.50)),
                    "p95_ms": _round(p95),
                    "p99_ms": _round(quantile_ms(w.hist, 0.99)),
                    "burn_rate": self.burn_rates(pipeline, slo, now_ms),
                    "slo_met": (p95 is None or p95 <= slo.latency_p95_ms) and success >= slo.success,
                    "series": series.points(now_ms, points),
                }
            )
        return out
