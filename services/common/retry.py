"""Retries with capped exponential backoff and "full jitter", for idempotent steps only.

Full jitter (each pause drawn uniformly from ``[0, min(cap, base * 2**n))``)
spreads the retries of many callers that failed together — every replica
losing Triton at the same moment — instead of having them knock again in
step. The helper is deadline-aware: it never sleeps past the caller's
deadline, and gives the last error back at once when the pause would end
after it, so a caller sees the real failure within its deadline instead of
a DEADLINE_EXCEEDED of our own making.

Use it only where repeating the call cannot do harm twice (a Triton
inference, a metadata question over request/reply); never around a publish
that is not idempotent.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from services.common import metrics

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """How often and how patiently to retry."""

    attempts: int = 3  # tries in all, the first included; 1 = no retry
    base_s: float = 0.025  # the first pause is drawn from [0, base_s)
    cap_s: float = 0.5  # no pause is drawn from a range wider than this

    def delay(self, retry: int, rand: Callable[[], float] = random.random) -> float:
        """The pause before retry number ``retry`` (1 = the first retry): full jitter."""
        ceiling = min(self.cap_s, self.base_s * 2.0 ** max(retry - 1, 0))
        return rand() * ceiling


#: No retry: one try.
ONCE = Backoff(attempts=1)

#: A NATS request that met "no responders": right after a start (the service's subscription
#: not yet known to the server, or the service a moment behind its caller) this clears within
#: moments. About 1 s of pauses on average, 2.25 s at most, and never past the request's timeout.
NO_RESPONDERS = Backoff(attempts=8, base_s=0.05, cap_s=0.5)


async def retry(
    call: Callable[[], Awaitable[T]],
    *,
    policy: Backoff,
    retryable: Callable[[BaseException], bool],
    deadline: float | None = None,
    service: str = "",
    step: str = "",
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    rand: Callable[[], float] = random.random,
) -> T:
    """``await call()``; on an error ``retryable`` accepts, pause and try again.

    ``deadline`` (on ``clock``, time.monotonic by default): no pause ends at or
    after it; the last error is raised instead. Every retry is counted in
    ``loom_retries_total{service,step}`` when ``service`` is given.
    """
    tries = 0
    while True:
        tries += 1
        try:
            return await call()
        except Exception as exc:
            if tries >= policy.attempts or not retryable(exc):
                raise
            pause = policy.delay(tries, rand)
            if deadline is not None and clock() + pause >= deadline:
                raise
        if service:
            metrics.RETRIES.labels(service, step).inc()
        await sleep(pause)
