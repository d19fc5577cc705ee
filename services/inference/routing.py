"""The service side of routing: a part's route from the watched registry, the fallback to stable, the tally.

:mod:`services.inference.router` decides (pure); this module feeds it a part
and records what happened: the reason in ``part.notes["inference.route"]``
and ``loom_route_total{model,version,reason}``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

import numpy as np
from prometheus_client import Counter

from services.common.errors import NotFound, Unavailable
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.registry.store import RegistryStore
from services.inference.router import FALLBACK, Route, choose

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The Part note that says why the part went to the version that answered it.
ROUTE_NOTE = "inference.route"

ROUTES = Counter(
    "loom_route_total",
    "Parts answered per model version and route reason (stable, canary, arm:<experiment>, rule:<name>, "
    "fallback, default).",
    ["model", "version", "reason"],
)


def real_tokens(inputs: Mapping[str, np.ndarray]) -> int | None:
    """The input's real tokens: the attention mask's sum; None without one."""
    mask = inputs.get("attention_mask")
    return int(mask.sum()) if mask is not None and mask.dtype.kind in "iub" else None


def route_part(
    registry: RegistryStore | None, model: str, part: pb.Part, inputs: Mapping[str, np.ndarray], *, inflight: int
) -> tuple[Route, str]:
    """The part's route under the model's current policy, and the stable version ("" with no record)."""
    record = registry.records.get(model) if registry is not None else None
    route = choose(
        record.policy if record is not None else None,
        model=model,
        route_key=part.route_key or part.request_id,
        tokens=real_tokens(inputs),
        inflight=inflight,
    )
    return route, record.stable if record is not None else ""


async def with_fallback(route: Route, stable: str, answer: Callable[[str], Awaitable[T]]) -> tuple[T, str]:
    """``answer(route.version)`` and the route reason; when a version other than stable is
    unavailable (not loaded, unknown to Triton), stable answers once instead, reason ``fallback``.
    """
    try:
        return await answer(route.version), route.reason
    except (Unavailable, NotFound) as exc:
        if not route.version or not stable or route.version == stable:
            raise
        log.debug("version %s unavailable, stable %s answers: %s", route.version, stable, exc.message)
        return await answer(stable), FALLBACK


def record(part: pb.Part, reason: str) -> None:
    """Note the route on the answered part and count it under the version that answered."""
    part.notes[ROUTE_NOTE] = reason
    ROUTES.labels(part.model, part.model_version, reason).inc()
