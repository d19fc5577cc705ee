"""Circuit breakers per model version: what counts, fail fast, half-open recovery, metrics, canary fallback.

Triton is a fake here (a coroutine that fails or answers); the clock is a fake
put in place of the wall clock that purgatory and the breaker module read.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from opentelemetry.trace import INVALID_SPAN_CONTEXT
from prometheus_client import REGISTRY

from services.common.errors import Code, DeadlineExceeded, Internal, InvalidArgument, NotFound, Unavailable
from services.inference import breaker as breaker_module
from services.inference.breaker import BreakerOpen, CallerDeadline, TritonBreakers, counts_as_failure
from services.inference.router import Route
from services.inference.routing import with_fallback
from services.inference.service import Inference, _Row
from services.inference.settings import InferenceSettings
from services.inference.triton import ModelNotReady, TritonUnreachable

pytestmark = pytest.mark.unit

_names = itertools.count()


@pytest.fixture
def model() -> str:
    """A model name of its own per test: the metrics are process-wide."""
    return f"m{next(_names)}"


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    fake = SimpleNamespace(now=1_000_000.0)
    fake.time = lambda: fake.now
    monkeypatch.setattr("purgatory.domain.model.time", fake)
    monkeypatch.setattr(breaker_module, "time", fake)
    yield fake


class Triton:
    """A fake Triton call: raises ``error`` while it is set, answers otherwise; counts calls."""

    def __init__(self) -> None:
        self.error: Exception | None = None
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return "answer"


def gauge(model: str, version: str) -> float | None:
    return REGISTRY.get_sample_value("loom_breaker_state", {"model": model, "version": version})


def transitions(model: str, version: str, to: str) -> float:
    labels = {"model": model, "version": version, "to": to}
    return REGISTRY.get_sample_value("loom_breaker_transitions_total", labels) or 0.0


async def fail(breakers: TritonBreakers, model: str, version: str, triton: Triton, times: int) -> None:
    assert triton.error is not None
    for _ in range(times):
        with pytest.raises(type(triton.error)):
            await breakers.call(model, version, triton)


def test_only_signs_of_an_unwell_triton_count() -> None:
    for exc in (TritonUnreachable("x"), ModelNotReady("x"), Unavailable("x"), NotFound("x"), DeadlineExceeded("x")):
        assert counts_as_failure(exc), exc
    for other in (InvalidArgument("x"), Internal("x"), BreakerOpen("x"), CallerDeadline("x"), ValueError("x")):
        assert not counts_as_failure(other), other


async def test_opens_after_failures_in_a_row_then_fails_fast_naming_the_version(
    model: str, clock: SimpleNamespace
) -> None:
    breakers, triton = TritonBreakers(failures=3, reset_s=10.0), Triton()
    assert await breakers.call(model, "1", triton) == "answer"
    assert gauge(model, "1") == 0 and breakers.state(model, "1") == "closed"
    triton.error = TritonUnreachable(f"Triton is unavailable for model {model}")
    await fail(breakers, model, "1", triton, 3)
    assert breakers.state(model, "1") == "open" and gauge(model, "1") == 2
    assert transitions(model, "1", "open") == 1
    clock.now += 4.0
    calls = triton.calls
    with pytest.raises(BreakerOpen) as err:
        await breakers.call(model, "1", triton)
    assert triton.calls == calls  # failed fast: Triton was not asked
    assert err.value.code == Code.UNAVAILABLE
    message = err.value.message
    assert f"model {model} version 1" in message and "3 failures" in message
    assert "next try in 6.0s" in message and "Triton is unavailable" in message


async def test_successes_and_client_errors_reset_the_count(model: str, clock: SimpleNamespace) -> None:
    breakers, triton = TritonBreakers(failures=3, reset_s=10.0), Triton()
    for healthy in (None, InvalidArgument("too many tokens"), Internal("the model raised")):
        triton.error = DeadlineExceeded("slow")
        await fail(breakers, model, "1", triton, 2)
        triton.error = healthy
        if healthy is None:
            await breakers.call(model, "1", triton)
        else:
            await fail(breakers, model, "1", triton, 5)  # never counted, however many
        assert breakers.state(model, "1") == "closed", healthy


async def test_each_version_has_its_own_breaker(model: str, clock: SimpleNamespace) -> None:
    breakers, canary, stable = TritonBreakers(failures=2, reset_s=10.0), Triton(), Triton()
    canary.error = ModelNotReady(f"model {model} is not available on Triton")
    await fail(breakers, model, "2", canary, 2)
    with pytest.raises(BreakerOpen):
        await breakers.call(model, "2", canary)
    assert await breakers.call(model, "1", stable) == "answer"
    assert (gauge(model, "1"), gauge(model, "2")) == (0, 2)


async def test_half_open_probe_closes_on_success_and_reopens_on_failure(model: str, clock: SimpleNamespace) -> None:
    breakers, triton = TritonBreakers(failures=2, reset_s=5.0), Triton()
    triton.error = TritonUnreachable("down")
    await fail(breakers, model, "1", triton, 2)
    clock.now += 5.5
    # Past reset_s the gauge reads half-open before any call probes: the next call will.
    assert breakers.state(model, "1") == "half_open" and gauge(model, "1") == 1
    calls = triton.calls
    await fail(breakers, model, "1", triton, 1)  # the probe went to Triton and failed
    assert triton.calls == calls + 1
    assert breakers.state(model, "1") == "open"
    with pytest.raises(BreakerOpen, match=r"next try in 5\.0s"):  # a fresh reset_s
        await breakers.call(model, "1", triton)
    clock.now += 5.5
    triton.error = None
    assert await breakers.call(model, "1", triton) == "answer"
    assert breakers.state(model, "1") == "closed" and gauge(model, "1") == 0
    assert [transitions(model, "1", to) for to in ("open", "half_open", "closed")] == [2, 2, 1]


async def test_a_refused_call_does_not_grow_a_traceback(model: str, clock: SimpleNamespace) -> None:
    breakers, triton = TritonBreakers(failures=1, reset_s=60.0), Triton()
    triton.error = TritonUnreachable("down")
    await fail(breakers, model, "1", triton, 1)
    for _ in range(500):
        with pytest.raises(BreakerOpen) as err:
            await breakers.call(model, "1", triton)
    assert err.value.__cause__ is None and err.value.__context__ is not None
    refused = err.value.__context__
    assert refused.__traceback__ is None  # purgatory's one exception instance, not 500 frames deep


async def test_disabled_breakers_pass_every_call(model: str, clock: SimpleNamespace) -> None:
    breakers, triton = TritonBreakers(failures=1, reset_s=60.0, enabled=False), Triton()
    triton.error = TritonUnreachable("down")
    await fail(breakers, model, "1", triton, 5)
    assert triton.calls == 5 and gauge(model, "1") is None


async def test_an_open_canary_breaker_falls_back_to_stable(model: str, clock: SimpleNamespace) -> None:
    breakers, versions = TritonBreakers(failures=1, reset_s=60.0), {"1": Triton(), "2": Triton()}
    versions["2"].error = ModelNotReady("version 2 is not loaded")
    await fail(breakers, model, "2", versions["2"], 1)

    async def answer(version: str) -> str:
        return f"{await breakers.call(model, version, versions[version])} from {version}"

    assert await with_fallback(Route("2", "canary"), "1", answer) == ("answer from 1", "fallback")
    assert versions["2"].calls == 1  # the open breaker answered for version 2
    with pytest.raises(BreakerOpen):  # stable itself has nothing to fall back to
        await with_fallback(Route("2", "canary"), "2", answer)


# --- the inference service's Triton step: retries inside, the breaker around each try --------------


class FakeTriton:
    """Stands in for TritonModels.infer: fails with the queued errors, then answers one embedding per row."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def infer(
        self, model: str, inputs: dict[str, np.ndarray], **kw: object
    ) -> tuple[list[dict[str, np.ndarray]], str]:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return [{"embedding": np.zeros(3, np.float32)}], str(kw["version"] or "1")


def service(model: str, triton: FakeTriton, **settings: Any) -> Inference:
    svc = Inference(InferenceSettings(models=[model], retry_base_ms=1.0, retry_max_ms=2.0, **settings))
    svc.triton = triton  # type: ignore[assignment]
    svc.models[model] = svc._new_model(model)
    svc.models[model].batched = False
    return svc


def row(version: str, deadline_s: float = 5.0) -> _Row:
    tensors = {"input_ids": np.arange(4, dtype=np.int64)}
    return _Row(tensors, time.monotonic() + deadline_s, INVALID_SPAN_CONTEXT, version)


async def test_an_unreachable_triton_is_retried_before_the_breaker_opens(model: str) -> None:
    triton = FakeTriton(TritonUnreachable("down"), TritonUnreachable("down"))
    svc = service(model, triton, retry_attempts=3, breaker_failures=5)
    steps = {"service": "inference", "step": "triton_infer"}
    before = REGISTRY.get_sample_value("loom_retries_total", steps) or 0.0
    ((_, version),) = await svc._run_batch(svc.models[model], [row("2")])  # type: ignore[misc]
    assert triton.calls == 3 and version == "2"
    assert (REGISTRY.get_sample_value("loom_retries_total", steps) or 0.0) - before == 2
    assert svc.breakers.state(model, "2") == "closed"


async def test_a_version_that_is_not_ready_is_not_retried_and_opens_its_breaker(model: str) -> None:
    triton = FakeTriton(*(ModelNotReady("not loaded") for _ in range(5)))
    svc = service(model, triton, retry_attempts=3, breaker_failures=2)
    for _ in range(2):
        with pytest.raises(ModelNotReady):
            await svc._run_batch(svc.models[model], [row("2")])
    assert triton.calls == 2
    with pytest.raises(BreakerOpen, match=f"model {model} version 2"):
        await svc._run_batch(svc.models[model], [row("2")])
    assert triton.calls == 2
    assert svc.breakers.state(model, "default") == "closed"  # Triton's default version is another circuit


async def test_a_timeout_counts_only_when_triton_had_time_to_answer(model: str) -> None:
    triton = FakeTriton(*(DeadlineExceeded("Triton: Deadline Exceeded") for _ in range(4)))
    svc = service(model, triton, breaker_failures=2)
    for _ in range(2):  # parts that reached the batcher with their deadline nearly spent
        with pytest.raises(CallerDeadline):
            await svc._run_batch(svc.models[model], [row("1", deadline_s=0.1)])
    assert svc.breakers.state(model, "1") == "closed"
    for _ in range(2):  # a full second to answer, and Triton did not: that counts
        with pytest.raises(DeadlineExceeded):
            await svc._run_batch(svc.models[model], [row("1", deadline_s=1.0)])
    assert svc.breakers.state(model, "1") == "open"
