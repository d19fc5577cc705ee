"""Retries with full-jitter backoff: which errors, how many tries, how long the pauses, never past the deadline."""

from __future__ import annotations

import random

import pytest
from prometheus_client import REGISTRY

from services.common.errors import InvalidArgument, Unavailable
from services.common.retry import NO_RESPONDERS, ONCE, Backoff, retry

pytestmark = pytest.mark.unit


class Clock:
    """A fake monotonic clock that only sleeping moves; records every pause."""

    def __init__(self) -> None:
        self.now = 100.0
        self.pauses: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds


class Flaky:
    """Fails with ``errors`` in turn, then answers "ok"; counts its calls."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def transient(exc: BaseException) -> bool:
    return isinstance(exc, Unavailable)


def retries(step: str) -> float:
    return REGISTRY.get_sample_value("loom_retries_total", {"service": "test", "step": step}) or 0.0


def test_full_jitter_draws_from_a_doubling_capped_range() -> None:
    policy = Backoff(attempts=10, base_s=0.1, cap_s=1.0)
    assert [policy.delay(n, lambda: 0.0) for n in (1, 2, 5)] == [0.0, 0.0, 0.0]
    almost = 0.999999
    assert [round(policy.delay(n, lambda: almost), 3) for n in range(1, 7)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    rng = random.Random(7)
    draws = [policy.delay(3, rng.random) for _ in range(2000)]
    assert all(0.0 <= d < 0.4 for d in draws)
    assert 0.17 < sum(draws) / len(draws) < 0.23  # uniform over [0, 0.4): mean 0.2, not clustered at the top


async def test_transient_errors_are_retried_then_the_answer_comes_back() -> None:
    clock, call = Clock(), Flaky(Unavailable("down"), Unavailable("still down"))
    before = retries("answer")
    answer = await retry(
        call,
        policy=Backoff(attempts=3, base_s=0.1, cap_s=1.0),
        retryable=transient,
        service="test",
        step="answer",
        clock=clock,
        sleep=clock.sleep,
        rand=lambda: 0.5,
    )
    assert answer == "ok" and call.calls == 3
    assert clock.pauses == [0.05, 0.1]  # half of [0, 0.1) then of [0, 0.2)
    assert retries("answer") - before == 2


async def test_an_error_that_is_not_transient_is_raised_at_once() -> None:
    clock, call = Clock(), Flaky(InvalidArgument("bad input"))
    with pytest.raises(InvalidArgument):
        await retry(call, policy=Backoff(attempts=5), retryable=transient, clock=clock, sleep=clock.sleep)
    assert call.calls == 1 and clock.pauses == []


async def test_the_last_error_comes_back_when_the_tries_are_spent() -> None:
    clock, call = Clock(), Flaky(Unavailable("1"), Unavailable("2"), Unavailable("3"), Unavailable("4"))
    with pytest.raises(Unavailable, match="3"):
        await retry(call, policy=Backoff(attempts=3), retryable=transient, clock=clock, sleep=clock.sleep)
    assert call.calls == 3 and len(clock.pauses) == 2
    once = Flaky(Unavailable("only"))
    with pytest.raises(Unavailable, match="only"):
        await retry(once, policy=ONCE, retryable=transient, clock=clock, sleep=clock.sleep)
    assert once.calls == 1


async def test_no_pause_ends_after_the_deadline() -> None:
    clock = Clock()
    call = Flaky(Unavailable("a"), Unavailable("b"), Unavailable("c"))
    # Pauses of 0.3 then 0.6 (rand 0.75 of 0.4, 0.8): the second would end at 100.9 > 100.5.
    with pytest.raises(Unavailable, match="b"):
        await retry(
            call,
            policy=Backoff(attempts=10, base_s=0.4, cap_s=5.0),
            retryable=transient,
            deadline=100.5,
            clock=clock,
            sleep=clock.sleep,
            rand=lambda: 0.75,
        )
    assert clock.pauses == [pytest.approx(0.3)] and call.calls == 2
    assert clock.now < 100.5


@pytest.mark.parametrize("seed", range(20))
async def test_whatever_the_draws_the_deadline_is_never_slept_past(seed: int) -> None:
    clock, rng = Clock(), random.Random(seed)
    call = Flaky(*(Unavailable(str(i)) for i in range(100)))
    deadline = clock.now + rng.uniform(0.01, 2.0)
    with pytest.raises(Unavailable):
        await retry(
            call,
            policy=Backoff(attempts=100, base_s=0.05, cap_s=0.5),
            retryable=transient,
            deadline=deadline,
            clock=clock,
            sleep=clock.sleep,
            rand=rng.random,
        )
    assert clock.now < deadline


def test_no_responders_policy_waits_about_a_second_and_gives_up_within_a_few() -> None:
    pauses = range(1, NO_RESPONDERS.attempts)
    worst = sum(NO_RESPONDERS.delay(n, lambda: 1.0) for n in pauses)
    mean = worst / 2  # each pause is uniform over its range
    assert 0.8 <= mean <= 1.5 and worst <= 2.5
