"""Replicas each stage needs, from its recent traffic by Little's law.

Every stage reports one telemetry event per item it handled, with
``duration_ms`` = the time the item spent *inside* the stage: from the moment
the stage's runner took it off NATS/JetStream to the moment its handler
returned (``services.common.stage.StageRunner._run``; fusion and the gateway
time their own handler the same way). The wait in the NATS or JetStream queue
before a replica picked the item up is **not** in it, so the busy time below
does not grow with the backlog (the KEDA lag scaler watches that); it does
include contention inside a replica (a thread-pool slot, the event loop,
Triton's own queue for inference), which makes an overloaded stage ask for
more replicas, as it should.

Over a sliding window of ``window_s`` seconds, per stage service:

- arrival rate ``λ`` = items / window (items reported per second; in steady
  state the rate of completions equals the rate of arrivals),
- mean service time ``W`` = sum of ``duration_ms`` / items,
- Little's law: mean items in service ``L = λ·W`` (= busy seconds per second,
  whatever the number of replicas doing them),
- desired replicas = ``ceil(L / (concurrency x target_utilization))``,
  clamped to ``[min_replicas, max_replicas]``; with no traffic it is
  ``min_replicas``.

Events are kept in one-second buckets (count, busy ms), so memory is
``window_s`` buckets per stage whatever the traffic. Time is the monitor's
receive time, not the event's own timestamp: the hosts' clocks may disagree.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from services.common.answers import DURABLE_ANSWER_STAGE

#: The services that do a stage's work (the monitor itself is not one).
STAGE_SERVICES = ("gateway", "preprocess", "inference", "postprocess", "fusion")

#: Items one replica handles at once at full use. Why these numbers:
#: - gateway 64: W is the whole request (the gateway holds it open, async, until fusion answers); its own CPU per
#:   request is small (2-10 ms outside the mesh at 185 req/s on one replica, BENCHMARKS.md). 64 is half its admission
#:   limit LOOM_GATEWAY_MAX_INFLIGHT (128), so a replica planned at 70 % of it is far from refusing calls.
#: - preprocess 2: decode, resize and tokenize run in a thread pool of LOOM_PREPROCESS_WORKERS (default 2) threads.
#: - inference 4: W includes the part's time in Triton (queue + compute); one instance of the heaviest model (ocr,
#:   max_batch_size 4, requests of a batch run one after another) is saturated at 4 concurrent images (measured 99 %
#:   busy, BENCHMARKS.md). Text-only meshes batch 8-32 per execution (minilm) and may raise it.
#: - postprocess 1: its handlers are CPU work on one event loop, one item at a time.
#: - fusion 16: collecting parts is bookkeeping and key-value writes, waiting on NATS rather than on the CPU.
DEFAULT_CONCURRENCY: dict[str, float] = {
    "gateway": 64.0,
    "preprocess": 2.0,
    "inference": 4.0,
    "postprocess": 1.0,
    "fusion": 16.0,
}
#: Telemetry stages that are not work a replica of the stage service was asked for: shadow copies run on the
#: side, and a durable answer's event (fusion's) spans the request's whole stay in the lane.
_NOT_WORK = ("loom.shadow.", DURABLE_ANSWER_STAGE)
#: Shortest span a rate is computed over: right after the monitor starts a handful of events is no rate yet.
MIN_SPAN_MS = 1000
_BUCKET_MS = 1000
#: Floating point noise must not add a replica: 2.8 / (4 x 0.7) is 1.0000000000000002.
_EPS = 1e-9


@dataclass(frozen=True)
class CapacityPolicy:
    """How busy-ness becomes replicas."""

    concurrency: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_CONCURRENCY))
    target_utilization: float = 0.7
    min_replicas: int = 1
    max_replicas: int = 20

    def __post_init__(self) -> None:
        if not 0 < self.target_utilization <= 1:
            raise ValueError("target_utilization must be in (0, 1]")
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError("need 0 <= min_replicas <= max_replicas")
        bad = {k: v for k, v in self.concurrency.items() if not v > 0}
        if bad:
            raise ValueError(f"concurrency must be > 0: {bad}")

    def replicas(self, service: str, busy: float) -> int:
        """Replicas for ``busy`` items in service on average (L of Little's law)."""
        per_replica = self.concurrency.get(service, DEFAULT_CONCURRENCY.get(service, 1.0)) * self.target_utilization
        wanted = math.ceil(busy / per_replica - _EPS) if busy > 0 else 0
        return min(max(wanted, self.min_replicas), self.max_replicas)


@dataclass(frozen=True)
class StageLoad:
    service: str
    items: int
    span_s: float
    arrival_rate: float  # λ, items per second
    service_s: float | None  # W, mean seconds inside the stage per item; None without items
    busy: float  # L = λ·W
    desired_replicas: int

    def to_dict(self) -> dict[str, object]:
        return {
            "service": self.service,
            "items": self.items,
            "window_s": round(self.span_s, 3),
            "arrival_rate": round(self.arrival_rate, 6),
            "service_s": None if self.service_s is None else round(self.service_s, 6),
            "busy": round(self.busy, 6),
            "desired_replicas": self.desired_replicas,
        }


class CapacityBook:
    """Per stage service: items and busy time in one-second buckets over the last ``window_s``."""

    def __init__(self, policy: CapacityPolicy, window_s: float = 60.0, started_ms: int = 0) -> None:
        if window_s * 1000 < MIN_SPAN_MS:
            raise ValueError(f"window_s must be at least {MIN_SPAN_MS / 1000} s")
        self.policy = policy
        self.window_ms = int(window_s * 1000)
        self.started_ms = started_ms
        # [bucket index, items, busy ms]; lists so the newest bucket is updated in place.
        self._buckets: dict[str, deque[list[float]]] = {s: deque() for s in STAGE_SERVICES}

    def record(self, service: str, stage: str, duration_ms: float, now_ms: int) -> bool:
        """Count one handled item; False when the event is not stage work."""
        buckets = self._buckets.get(service)
        if buckets is None or stage.startswith(_NOT_WORK):
            return False
        index = now_ms // _BUCKET_MS
        if buckets and buckets[-1][0] == index:
            buckets[-1][1] += 1
            buckets[-1][2] += max(duration_ms, 0.0)
        else:
            buckets.append([index, 1, max(duration_ms, 0.0)])
            self._forget(buckets, now_ms)
        return True

    def _forget(self, buckets: deque[list[float]], now_ms: int) -> None:
        oldest = self._oldest_index(now_ms)
        while buckets and buckets[0][0] < oldest:
            buckets.popleft()

    def _oldest_index(self, now_ms: int) -> int:
        # The oldest bucket that starts inside (now - window, now]: a whole second more would be too old.
        return -(-(now_ms - self.window_ms) // _BUCKET_MS)

    def loads(self, now_ms: int) -> list[StageLoad]:
        """λ, W, L and desired replicas of every stage service now."""
        oldest = self._oldest_index(now_ms)
        # The buckets kept cover [oldest second, now]; before the monitor started there was nothing to see.
        span_ms = max(now_ms - max(oldest * _BUCKET_MS, self.started_ms), MIN_SPAN_MS)
        out = []
        for service, buckets in self._buckets.items():
            self._forget(buckets, now_ms)
            items = int(sum(b[1] for b in buckets))
            busy_ms = sum(b[2] for b in buckets)
            rate = items / (span_ms / 1000)
            busy = busy_ms / span_ms  # = λ·W: (items / span) x (busy / items)
            out.append(
                StageLoad(
                    service=service,
                    items=items,
                    span_s=span_ms / 1000,
                    arrival_rate=rate,
                    service_s=busy_ms / items / 1000 if items else None,
                    busy=busy,
                    desired_replicas=self.policy.replicas(service, busy),
                )
            )
        return out

    def items(self) -> int:
        """Buckets held: at most one per second of the window per stage service."""
        return sum(len(b) for b in self._buckets.values())
