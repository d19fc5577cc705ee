"""Pure per-stage statistics from telemetry events."""

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
            **pct,
            "last_seen_unix_ms": self.last_seen_unix_ms,
        }


class StatsBook:
    """Counts and latency per (service, stage)."""

    def __init__(self, window: int = 2048) -> None:
        self.window = window
        self.stages: dict[tuple[str, str], StageStats] = {}

    def record(self, event: pb.TelemetryEvent) -> StageStats:
        key = (event.service, event.stage)
        stats = self.stages.get(key)
        if stats is None:
            stats = self.stages[key] = StageStats(latencies_ms=deque(maxlen=self.window))
        stats.count += 1
        stats.codes[event.code or "OK"] += 1
        stats.latencies_ms.append(event.duration_ms)
        stats.last_seen_unix_ms = max(stats.last_seen_unix_ms, event.timestamp_unix_ms)
        return stats

    def snapshot(self) -> dict[str, object]:
        return {
            "stages": [
                {"service": svc, "stage": stage, **s.summary()} for (svc, stage), s in sorted(self.stages.items())
            ]
        }
