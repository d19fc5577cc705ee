"""The load generator: perf_analyzer's concurrency mode in one event loop.

``C`` closed-loop workers share a budget of ``N`` requests; each sends its next
request as soon as its previous answer arrives. A :data:`Call` is one request
that either returns an :class:`Answer` or raises; a failure is counted, never
fatal, because a benchmark must report its errors rather than stop at the first.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from tools.bench.triton_stats import ModelCounters

T = TypeVar("T")


class BadAnswer(Exception):
    """A reply that arrived but is wrong: an error status, degraded, incomplete or not the expected content."""


@dataclass(frozen=True)
class Answer(Generic[T]):
    """What one request gave back: the checked value and the gateway's per-stage times (empty for Triton)."""

    value: T
    stage_ms: Mapping[str, float] = field(default_factory=dict)


#: One request; raises on any failure (transport error, bad status, wrong content).
Call = Callable[[], Awaitable[Answer[T]]]


@dataclass
class LevelResult:
    """One path at one concurrency level: client latencies plus what was read around the level."""

    target: str
    concurrency: int
    requests: int
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    #: Sum over answered requests of the gateway's ``timings_ms`` (per stage and ``gateway_total``).
    stage_sum_ms: dict[str, float] = field(default_factory=dict)
    #: Triton's own counters per model over the level (deltas), empty if they could not be read.
    triton: dict[str, ModelCounters] = field(default_factory=dict)
    #: Share of all CPUs used during the level by processes outside this benchmark's tree, in percent.
    foreign_cpu_pct: float = float("nan")

    @property
    def ok(self) -> int:
        return len(self.latencies_ms)

    def pct(self, q: float) -> float:
        """Latency percentile ``q`` in ms, linear interpolation between samples (numpy's default)."""
        if not self.latencies_ms:
            return float("nan")
        return float(np.percentile(np.asarray(self.latencies_ms), q))

    @property
    def p50(self) -> float:
        return self.pct(50)

    @property
    def p90(self) -> float:
        return self.pct(90)

    @property
    def p99(self) -> float:
        return self.pct(99)

    @property
    def mean(self) -> float:
        return float(np.mean(self.latencies_ms)) if self.latencies_ms else float("nan")

    @property
    def throughput(self) -> float:
        return self.ok / self.wall_s if self.wall_s > 0 else float("nan")

    def stage_mean_ms(self, stage: str) -> float:
        """Mean of the gateway's ``timings_ms[stage]`` per answered request (NaN if it never reported it)."""
        total = self.stage_sum_ms.get(stage)
        return total / self.ok if total is not None and self.ok else float("nan")

    def model(self, name: str) -> ModelCounters:
        """Triton's counters for ``name`` over the level (all NaN when unknown)."""
        return self.triton.get(name, ModelCounters())


async def closed_loop(call: Call[Any], target: str, concurrency: int, requests: int) -> LevelResult:
    """``concurrency`` workers share a budget of ``requests``; each sends its next one on the last answer."""
    result = LevelResult(target, concurrency, requests)
    issued = 0

    async def worker() -> None:
        nonlocal issued
        while issued < requests:
            issued += 1
            t0 = time.perf_counter()
            try:
                answer = await call()
            except Exception as exc:  # counted, never fatal: a benchmark reports its errors
                result.errors += 1
                if len(result.error_samples) < 3:
                    result.error_samples.append(f"{type(exc).__name__}: {str(exc)[:200]}")
                continue
            result.latencies_ms.append((time.perf_counter() - t0) * 1000.0)
            for stage, ms in answer.stage_ms.items():
                result.stage_sum_ms[stage] = result.stage_sum_ms.get(stage, 0.0) + ms

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.wall_s = time.perf_counter() - started
    return result


async def first_success(call: Call[T], what: str, timeout: float = 60.0) -> T:
    """Retry until one request succeeds: the mesh's health checks do not prove the whole path is wired."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return (await call()).value
        except Exception as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} never answered: {type(exc).__name__}: {exc}") from exc
            await asyncio.sleep(0.25)
