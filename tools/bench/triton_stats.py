"""Triton's own per-model statistics, read around each level.

Triton keeps cumulative counters per model, the numbers behind its ``nv_inference_*``
metrics; the difference over a level says how many requests a model served, in
how many executions (the mean dynamic batch), and how long they spent in Triton.
They are read with the statistics extension (``get_inference_statistics``)
rather than scraped from /metrics because only it has the per-batch-size
execution times: durations per *request* charge each request its whole batch's
execution, so only ``batch_stats`` tell how long the model instance was busy.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, fields
from typing import Any

import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

NAN = float("nan")


@dataclass(frozen=True)
class ModelCounters:
    """Cumulative counters of one model (all versions summed), or their difference over a level."""

    requests: float = NAN  # successful requests (nv_inference_request_success)
    items: float = NAN  # batch items inferred; above requests when a request carries a batch (nv_inference_count)
    executions: float = NAN  # model executions, one per dynamic batch (nv_inference_exec_count)
    request_us: float = NAN  # summed per request: arrival to response (nv_inference_request_duration_us)
    queue_us: float = NAN  # summed per request: waiting in the scheduler (nv_inference_queue_duration_us)
    busy_us: float = NAN  # summed per execution: input + infer + output, i.e. the instance's busy time

    def __sub__(self, before: ModelCounters) -> ModelCounters:
        return ModelCounters(*(getattr(self, f.name) - getattr(before, f.name) for f in fields(self)))

    def _per_request_ms(self, total_us: float) -> float:
        return total_us / self.requests / 1000.0 if self.requests > 0 else NAN

    @property
    def mean_batch(self) -> float:
        """Items per execution: the batch size the model really ran (the inference service's micro-batches
        and Triton's dynamic batcher together)."""
        return self.items / self.executions if self.executions > 0 else NAN

    @property
    def request_ms(self) -> float:
        """Mean time a request spent inside Triton, from arrival to response (queue + compute)."""
        return self._per_request_ms(self.request_us)

    @property
    def queue_ms(self) -> float:
        """Mean time a request waited in the scheduler's queue."""
        return self._per_request_ms(self.queue_us)

    @property
    def busy_per_item_ms(self) -> float:
        """Execution time per item: what one image costs the model instance, batch-mates excluded."""
        return self.busy_us / self.items / 1000.0 if self.items > 0 else NAN


def _us(duration: Any) -> float:
    """A ``StatisticDuration``'s nanoseconds as microseconds."""
    return float(duration.ns) / 1000.0


def from_response(response: Any, models: tuple[str, ...]) -> dict[str, ModelCounters]:
    """The counters of ``models`` in a ``ModelStatisticsResponse`` (a model never used gets zeros)."""
    sums = {m: dict.fromkeys((f.name for f in fields(ModelCounters)), 0.0) for m in models}
    for stats in response.model_stats:
        if stats.name not in sums:
            continue
        acc, inf = sums[stats.name], stats.inference_stats
        acc["requests"] += inf.success.count
        acc["items"] += stats.inference_count
        acc["executions"] += stats.execution_count
        acc["request_us"] += _us(inf.success)
        acc["queue_us"] += _us(inf.queue)
        acc["busy_us"] += sum(
            _us(b.compute_input) + _us(b.compute_infer) + _us(b.compute_output) for b in stats.batch_stats
        )
    return {m: ModelCounters(**values) for m, values in sums.items()}


async def read(client: triton_aio.InferenceServerClient, models: tuple[str, ...]) -> dict[str, ModelCounters]:
    """Current counters of ``models``; empty if Triton cannot say (the level still counts, without them)."""
    try:
        return from_response(await client.get_inference_statistics(""), models)
    except InferenceServerException:
        return {}


async def settled(
    client: triton_aio.InferenceServerClient, models: tuple[str, ...], timeout_s: float = 2.0
) -> dict[str, ModelCounters]:
    """Counters once they stop moving: Triton records a batch's statistics just after it sends the answers.

    Read right after the last answer, the counters can still miss that batch, which then lands in the
    next level's difference; with 40 images per level, one batch of 4 would be a 10% error.
    """
    current = await read(client, models)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        latest = await read(client, models)
        if latest == current:
            break
        current = latest
    return current
