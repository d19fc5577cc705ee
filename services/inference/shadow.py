"""Shadow traffic: a copy of a part goes to another version, and only the monitor hears the answer.

The copy leaves after the primary answered, as a task of its own, at most
``max_inflight`` at once (more are dropped and counted): the caller's reply
never waits for it and never sees its result or its error. Its outputs are
compared with the primary's (cosine similarity of the float outputs, mean
over outputs) and reported as metrics and as a telemetry event on stage
``loom.shadow.<model>`` with the shadow version and ``{"agreement": cos}``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

import numpy as np
from prometheus_client import Counter, Histogram

from services.common.errors import Code, as_loom_error
from services.common.events import TelemetryPublisher
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.inference.triton import Outputs, from_tensor

log = logging.getLogger(__name__)

SHADOW = Counter(
    "loom_shadow_total",
    "Shadow copies of parts by outcome (ok, error, dropped: too many in flight).",
    ["model", "version", "result"],
)
AGREEMENT = Histogram(
    "loom_shadow_agreement",
    "Cosine similarity of a shadow version's outputs with the answering version's (mean over float outputs).",
    ["model", "version"],
    buckets=(0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999, 1.0),
)

#: Runs the shadow version on one part's inputs: (model, version, inputs, timeout_s) -> outputs.
RunShadow = Callable[[str, str, Mapping[str, np.ndarray], float], Awaitable[Outputs]]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two arrays of one shape; two zero arrays agree, one zero array does not."""
    x, y = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    if nx == 0.0 or ny == 0.0:
        return 1.0 if nx == ny else 0.0
    return float(np.clip(np.dot(x, y) / (nx * ny), -1.0, 1.0))


def agreement(primary: Mapping[str, np.ndarray], shadow: Mapping[str, np.ndarray]) -> float | None:
    """Mean cosine over the float outputs both have; a shape mismatch is 0; None when there is nothing to compare."""
    scores = []
    for name, a in primary.items():
        b = shadow.get(name)
        if b is None or a.dtype.kind != "f" or b.dtype.kind != "f":
            continue
        scores.append(cosine(a, b) if a.shape == b.shape else 0.0)
    return sum(scores) / len(scores) if scores else None


class ShadowMirror:
    """Sends bounded, fire-and-forget shadow copies and reports how they compare."""

    def __init__(self, run: RunShadow, telemetry: TelemetryPublisher, *, max_inflight: int, timeout_s: float) -> None:
        self.run = run
        self.telemetry = telemetry
        self.max_inflight = max_inflight
        self.timeout_s = timeout_s
        self._tasks: set[asyncio.Task[None]] = set()

    def mirror(
        self, model: str, version: str, inputs: Mapping[str, np.ndarray], primary: pb.CachedOutputs, part: pb.Part
    ) -> None:
        """Start a copy of ``part`` (its decoded ``inputs``) to ``version``; never raises, never waits."""
        if len(self._tasks) >= self.max_inflight:
            SHADOW.labels(model, version, "dropped").inc()
            return
        task = asyncio.create_task(self._shadow(model, version, inputs, primary, part.pipeline, part.request_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _shadow(
        self,
        model: str,
        version: str,
        inputs: Mapping[str, np.ndarray],
        primary: pb.CachedOutputs,
        pipeline: str,
        request_id: str,
    ) -> None:
        start = time.perf_counter()
        stats: dict[str, float] = {}
        try:
            outputs = await self.run(model, version, inputs, self.timeout_s)
            score = agreement({name: from_tensor(t) for name, t in primary.tensors.items()}, outputs)
        except Exception as exc:  # the shadow's failure is the monitor's news, never the caller's
            code = as_loom_error(exc).code
            if code == Code.INTERNAL:
                log.debug("shadow %s/%s failed", model, version, exc_info=True)
            SHADOW.labels(model, version, "error").inc()
        else:
            code = Code.OK
            SHADOW.labels(model, version, "ok").inc()
            if score is not None:
                AGREEMENT.labels(model, version).observe(score)
                stats["agreement"] = score
        await self.telemetry.emit(
            f"loom.shadow.{model}",
            pipeline=pipeline,
            request_id=request_id,
            model=model,
            model_version=version,
            duration_ms=(time.perf_counter() - start) * 1000.0,
            code=str(code),
            stats=stats,
        )

    async def close(self, grace_s: float = 2.0) -> None:
        """Let running copies finish (up to ``grace_s``), then cancel the rest."""
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for task in late:
                task.cancel()
