"""Circuit breakers around Triton, one per model version: a broken version fails fast, the others serve on.

The state machine is purgatory's (asyncio-native, in memory): CLOSED counts
consecutive failures and opens after ``failures`` of them; OPEN fails every
call at once with UNAVAILABLE (:class:`BreakerOpen`, naming the model
version, the last failure and when it will try again); once ``reset_s`` has
passed the next call goes through (HALF-OPEN): its success closes the
circuit, its failure opens it for another ``reset_s``. purgatory lets every
call through while half-open, not only one; here that is a few batches at
most, because the calls of one version are micro-batched. purgatory times
the open period on the wall clock (``time.time()``): a clock step shortens or
lengthens one open period, nothing worse.

Only failures that say Triton or the model version is unwell count: Triton
unreachable or UNAVAILABLE, the version not loaded, not ready or unknown,
and timeouts of calls that had at least :data:`TIMEOUT_FLOOR_S` to answer
(:func:`deadline_error`). A client's error (INVALID_ARGUMENT) or the model's own
INTERNAL answer proves Triton is up: it counts as a success, as does a call
cancelled at shutdown (purgatory sees only "failure" or "not").

``loom_breaker_state{model,version}`` is read at scrape time: 0 closed,
1 half-open (also an open circuit whose ``reset_s`` has passed: the next
call probes), 2 open. So an alert on 2 stops by itself once no call has
failed for ``reset_s``, whether or not traffic came to probe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from prometheus_client import Counter, Gauge
from purgatory import AsyncCircuitBreakerFactory
from purgatory.domain.model import Context, OpenedState

from services.common.errors import DeadlineExceeded, LoomError, NotFound, Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

STATE = Gauge(
    "loom_breaker_state",
    "Circuit breaker of Triton calls per model version: 0 closed, 1 half-open (the next call probes), 2 open.",
    ["model", "version"],
)
TRANSITIONS = Counter(
    "loom_breaker_transitions",
    "Circuit breaker state changes per model version, by the state entered (open, half_open, closed).",
    ["model", "version", "to"],
)

#: purgatory's state names -> ours (metric label values).
_STATES = {"closed": "closed", "half-opened": "half_open", "opened": "open"}
_VALUES = {"closed": 0.0, "half_open": 1.0, "open": 2.0}


#: A Triton call that timed out with less time than this to answer says nothing about Triton: the
#: part arrived with its deadline nearly spent (a queue upstream, an overloaded replica).
TIMEOUT_FLOOR_S = 0.25


class BreakerOpen(Unavailable):
    """A model version's breaker is open: the call failed fast, Triton was not asked."""


class CallerDeadline(DeadlineExceeded):
    """A Triton call ran out of the caller's own, nearly spent, time: not counted against Triton."""


def deadline_error(exc: DeadlineExceeded, budget_s: float) -> DeadlineExceeded:
    """``exc`` as it should count: a timeout of a call given under TIMEOUT_FLOOR_S becomes CallerDeadline."""
    return CallerDeadline(exc.message) if budget_s < TIMEOUT_FLOOR_S else exc


def counts_as_failure(exc: BaseException) -> bool:
    """Does ``exc`` say Triton or the model version is unwell? (Unreachable, not ready, unknown, too slow.)"""
    if isinstance(exc, BreakerOpen | CallerDeadline):
        return False
    return isinstance(exc, Unavailable | NotFound | DeadlineExceeded)


class TritonBreakers:
    """The circuit breakers of one inference replica, keyed by (model, version)."""

    def __init__(self, *, failures: int, reset_s: float, enabled: bool = True) -> None:
        self.failures = failures
        self.reset_s = reset_s
        self.enabled = enabled
        self._factory = AsyncCircuitBreakerFactory(
            default_threshold=failures,
            default_ttl=reset_s,
            # purgatory counts what the exclude list does not excuse: excuse all that is not a failure.
            exclude=[(BaseException, lambda exc: not counts_as_failure(exc))],
        )
        self._factory.add_listener(self._on_event)
        self._labels: dict[str, tuple[str, str]] = {}
        self._contexts: dict[str, Context] = {}  # purgatory's in-memory state, shared by every call
        self._last_error: dict[str, str] = {}

    @staticmethod
    def circuit(model: str, version: str) -> str:
        return f"{model}/{version}"

    async def call(self, model: str, version: str, fn: Callable[[], Awaitable[T]]) -> T:
        """``await fn()`` through the breaker of ``model`` ``version``; BreakerOpen while it is open."""
        if not self.enabled:
            return await fn()
        name = self.circuit(model, version)
        if name not in self._labels:
            self._labels[name] = (model, version)
            STATE.labels(model, version).set_function(lambda: _VALUES[self.state(model, version)])
        breaker = await self._factory.get_breaker(name)
        self._contexts[name] = breaker.context
        try:
            async with breaker:
                try:
                    return await fn()
                except LoomError as exc:  # noted before purgatory sees it, so an opening names it
                    if counts_as_failure(exc):
                        self._last_error[name] = exc.message
                    raise
        except OpenedState as exc:
            # purgatory raises the same instance on every refused call: drop the traceback it
            # would otherwise grow by a frame each time.
            exc.__traceback__ = None
            raise BreakerOpen(self._open_message(model, version, exc.opened_at)) from None

    def state(self, model: str, version: str) -> str:
        """``closed``, ``half_open`` or ``open`` (an open circuit past ``reset_s`` reads half_open)."""
        context = self._contexts.get(self.circuit(model, version))
        if context is None:
            return "closed"
        state = _STATES[context.state]
        if state == "open" and context.opened_at is not None and time.time() >= context.opened_at + context.ttl:
            return "half_open"
        return state

    def _open_message(self, model: str, version: str, opened_at: float) -> str:
        retry_in = max(opened_at + self.reset_s - time.time(), 0.0)
        last = self._last_error.get(self.circuit(model, version), "")
        return (
            f"Triton circuit breaker open for model {model} version {version} after {self.failures} failures "
            f"in a row{f' (last: {last})' if last else ''}; failing fast, next try in {retry_in:.1f}s"
        )

    def _on_event(self, name: str, kind: str, event: Any) -> None:
        if kind != "state_changed" or name not in self._labels:
            return
        model, version = self._labels[name]
        to = _STATES.get(event.state, event.state)
        TRANSITIONS.labels(model, version, to).inc()
        # At most one line per reset_s per version: an opening, a probe, a closing.
        if to == "open":
            last = self._last_error.get(name, "")
            log.warning("Triton breaker of %s version %s opened for %.1fs: %s", model, version, self.reset_s, last)
        else:
            log.info("Triton breaker of %s version %s is %s", model, version, to.replace("_", "-"))
