"""Pure per-stage and per-model-version statistics from telemetry events."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

from services.common.pb.loom.v1 import envelope_pb2 as pb


@dataclass
class StageStats:
    count: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=2048))
    last_seen_unix_ms: int = 0

    def summary(self) -> dict[str, object]:
        lat = np.asarray(self.latencies_ms, dtype=np.float64)
        pct = {f"p{q}_ms": round(float(np.percentile(lat, q)), 3) if lat.size else None for q in (50, 95, 99)}
        errors = self.count - self.codes.get("OK", 0)
        return {
            "count": self.count,
            "errors": errors,
            "error_rate": round(errors / self.count, 6) if self.count else 0.0,
            "codes": dict(self.codes),
            "mean_ms": round(float(lat.mean()), 3) if lat.size else None,
            **pct,
            "last_seen_unix_ms": self.last_seen_unix_ms,
        }


class StatsBook:
    """Counts and latency per (pipeline, service, stage), for a bounded number of stages."""

    def __init__(self, window: int = 2048, max_keys: int = 1000) -> None:
        self.window = window
        self.max_keys = max_keys
        self.dropped = 0
        self.stages: dict[tuple[str, str, str], StageStats] = {}

    def record(self, event: pb.TelemetryEvent) -> StageStats | None:
        key = (event.pipeline, event.service, event.stage)
        stats = self.stages.get(key)
        if stats is None:
            if len(self.stages) >= self.max_keys:
                self.dropped += 1
                return None
            stats = self.stages[key] = StageStats(latencies_ms=deque(maxlen=self.window))
        stats.count += 1
        stats.codes[event.code or "OK"] += 1
        stats.latencies_ms.append(event.duration_ms)
        stats.last_seen_unix_ms = max(stats.last_seen_unix_ms, event.timestamp_unix_ms)
        return stats

    def rows(self) -> list[dict[str, object]]:
        return [
            {"pipeline": pipeline, "service": svc, "stage": stage, **s.summary()}
            for (pipeline, svc, stage), s in sorted(self.stages.items())
        ]

    def snapshot(self) -> dict[str, object]:
        return {"stages": self.rows()}

    def items(self) -> int:
        return sum(len(s.latencies_ms) for s in self.stages.values())


class ModelTraffic:
    """Recent requests per model version: the live traffic split and its latency."""

    def __init__(self, window: int = 4096, max_keys: int = 200) -> None:
        self.window = window
        self.max_keys = max_keys
        self.dropped = 0
        self.samples: dict[tuple[str, str], deque[tuple[int, float]]] = {}

    def record(self, model: str, version: str, duration_ms: float, now_ms: int) -> None:
        samples = self.samples.get((model, version))
        if samples is None:
            if len(self.samples) >= self.max_keys:
                self.dropped += 1
                return
            samples = self.samples[(model, version)] = deque(maxlen=self.window)
        samples.append((now_ms, duration_ms))

    def snapshot(self, now_ms: int, window_s: float) -> list[dict[str, object]]:
        since = now_ms - window_s * 1000
        recent = {k: [d for t, d in v if t >= since] for k, v in self.samples.items()}
        per_model: Counter[str] = Counter()
        for (model, _), durations in recent.items():
            per_model[model] += len(durations)
        out = []
        for (model, version), durations in sorted(recent.items()):
            lat = np.asarray(durations, dtype=np.float64)
            out.append(
                {
                    "model": model,
                    "version": version,
                    "requests": len(durations),
                    "share": round(len(durations) / per_model[model], 4) if per_model[model] else 0.0,
                    "p50_ms": round(float(np.percentile(lat, 50)), 3) if lat.size else None,
                    "p95_ms": round(float(np.percentile(lat, 95)), 3) if lat.size else None,
                }
            )
        return out
