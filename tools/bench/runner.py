"""Runs a suite against the live mesh: readiness, warm-up, then each measured level.

Paths run one after another, never at the same time, so each level has the
machine to itself (apart from other people's work, which each level reports).
Around every measured level the runner reads Triton's counters and the
machine's CPU use; what it learns is attached to the level's result.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from tools.bench.load import LevelResult, closed_loop, first_success
from tools.bench.system import cpu_snapshot, foreign_cpu_pct
from tools.bench.targets import Clients, Suite
from tools.bench.triton_stats import settled


@dataclass
class SuiteRun:
    """A suite's results: one LevelResult per (level, path), plus each path's first answer."""

    name: str
    levels: list[int]
    requests: int
    warmup: int
    results: list[LevelResult]
    #: The first successful answer's value per path (embedding or recognised text).
    first: dict[str, Any] = field(default_factory=dict)

    def at(self, target: str, level: int) -> LevelResult:
        return next(r for r in self.results if r.target == target and r.concurrency == level)

    @property
    def rewarm(self) -> int:
        """Unmeasured requests before each level (at least the level's concurrency)."""
        return max(1, self.warmup // 4)


async def measured_level(suite: Suite, clients: Clients, target: str, level: int) -> LevelResult:
    before = await settled(clients.triton, suite.models)
    cpu_before = cpu_snapshot()
    res = await closed_loop(suite.calls[target], target, level, suite.requests)
    cpu_after = cpu_snapshot()
    after = await settled(clients.triton, suite.models)
    res.foreign_cpu_pct = foreign_cpu_pct(cpu_before, cpu_after, res.wall_s)
    res.triton = {m: after[m] - before[m] for m in suite.models if m in before and m in after}
    return res


async def run_suite(suite: Suite, clients: Clients) -> SuiteRun:
    run = SuiteRun(suite.name, suite.levels, suite.requests, suite.warmup, [])
    # Readiness of the whole path, and the answers the report compares.
    run.first = {name: await first_success(call, f"{suite.name}/{name}") for name, call in suite.calls.items()}
    # Warm-up: every path at the highest concurrency (connections, Triton's
    # batcher, onnxruntime, the services' executors); results are discarded.
    top = max(suite.levels)
    for name, call in suite.calls.items():
        await closed_loop(call, name, top, suite.warmup)
    for level in suite.levels:
        for name, call in suite.calls.items():
            await closed_loop(call, name, level, max(level, run.rewarm))  # short re-warm per level
            res = await measured_level(suite, clients, name, level)
            run.results.append(res)
            batches = "  ".join(f"{m} batch {res.model(m).mean_batch:4.1f}" for m in suite.models)
            print(
                f"  {suite.name:<5} c={level:<3} {name:<13} p50 {res.p50:8.2f} ms  p99 {res.p99:8.2f} ms  "
                f"{res.throughput:7.1f}/s  {batches}  other CPU {res.foreign_cpu_pct:3.0f}%  errors {res.errors}",
                file=sys.stderr,
                flush=True,
            )
    return run
