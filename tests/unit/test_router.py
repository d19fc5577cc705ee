"""The traffic router: splits, stickiness, experiment arms, complexity rules and the shadow."""

from __future__ import annotations

from collections import Counter

import pytest

from services.common.registry.schema import Canary, Experiment, RouteRule, Shadow, TrafficPolicy
from services.inference.router import Route, bucket, choose, rule_matches

pytestmark = pytest.mark.unit

MODEL = "minilm"
KEYS = [f"user-{i}" for i in range(20_000)]


def route(policy: TrafficPolicy | None, key: str, *, tokens: int | None = 10, inflight: int = 1) -> Route:
    return choose(policy, model=MODEL, route_key=key, tokens=tokens, inflight=inflight)


def shares(policy: TrafficPolicy, **kw: int) -> dict[str, float]:
    counts = Counter(route(policy, key, **kw).version for key in KEYS)
    return {version: 100.0 * n / len(KEYS) for version, n in counts.items()}


def test_bucket_is_deterministic_in_range_and_depends_on_every_input() -> None:
    values = [bucket(MODEL, key) for key in KEYS[:2000]]
    assert all(0.0 <= v < 100.0 for v in values)
    assert values == [bucket(MODEL, key) for key in KEYS[:2000]]
    assert bucket(MODEL, "k") != bucket("other", "k")
    assert bucket(MODEL, "k") != bucket(MODEL, "k", "shadow")
    assert len(set(values)) == len(values)


def test_no_policy_routes_to_the_default_version() -> None:
    assert route(None, "anyone") == Route("", "default", None)


def test_stable_only() -> None:
    policy = TrafficPolicy(stable="1")
    assert {route(policy, key) for key in KEYS[:500]} == {Route("1", "stable", None)}


def test_canary_split_is_within_one_and_a_half_points() -> None:
    policy = TrafficPolicy(stable="1", canary=Canary(version="2", weight=10))
    got = shares(policy)
    assert set(got) == {"1", "2"}
    assert abs(got["2"] - 10.0) <= 1.5, got
    assert abs(got["1"] - 90.0) <= 1.5, got
    reasons = {r.version: r.reason for r in (route(policy, key) for key in KEYS[:2000])}
    assert reasons == {"1": "stable", "2": "canary"}


def test_a_key_is_sticky() -> None:
    policy = TrafficPolicy(stable="1", canary=Canary(version="2", weight=50))
    for key in KEYS[:1000]:
        first = route(policy, key)
        assert all(route(policy, key) == first for _ in range(3))


def test_growing_the_canary_keeps_its_keys() -> None:
    at = {w: TrafficPolicy(stable="1", canary=Canary(version="2", weight=w)) for w in (10, 50, 100)}
    in10 = {k for k in KEYS if route(at[10], k).version == "2"}
    in50 = {k for k in KEYS if route(at[50], k).version == "2"}
    assert in10 < in50
    assert abs(100.0 * len(in50) / len(KEYS) - 50.0) <= 1.5
    assert all(route(at[100], k).version == "2" for k in KEYS)
    zero = TrafficPolicy(stable="1", canary=Canary(version="2", weight=0))
    assert all(route(zero, k).version == "1" for k in KEYS[:2000])


def test_experiment_arms_follow_their_weights_and_are_sticky() -> None:
    policy = TrafficPolicy(stable="1", experiment=Experiment(name="ab", arms={"3": 20, "1": 50, "2": 30}))
    got = shares(policy)
    for version, weight in {"1": 50, "2": 30, "3": 20}.items():
        assert abs(got[version] - weight) <= 1.5, got
    assert {route(policy, k).reason for k in KEYS[:100]} == {"arm:ab"}
    assert [route(policy, k) for k in KEYS[:500]] == [route(policy, k) for k in KEYS[:500]]
    # Arms are dealt per experiment: another experiment does not inherit the groups.
    other = TrafficPolicy(stable="1", experiment=Experiment(name="ab2", arms={"3": 20, "1": 50, "2": 30}))
    assert [route(policy, k).version for k in KEYS[:500]] != [route(other, k).version for k in KEYS[:500]]


def test_rules_by_tokens_and_inflight() -> None:
    short = RouteRule(name="short", version="3", max_tokens=16)
    busy = RouteRule(name="busy", version="4", min_inflight=8)
    both = RouteRule(name="both", version="5", max_tokens=64, min_inflight=4)
    policy = TrafficPolicy(stable="1", canary=Canary(version="2", weight=100), rules=[short, both, busy])
    assert route(policy, "k", tokens=16) == Route("3", "rule:short")
    assert route(policy, "k", tokens=17, inflight=3) == Route("2", "canary")
    assert route(policy, "k", tokens=64, inflight=4) == Route("5", "rule:both")
    assert route(policy, "k", tokens=65, inflight=4) == Route("2", "canary")
    assert route(policy, "k", tokens=65, inflight=8) == Route("4", "rule:busy")
    assert route(policy, "k", tokens=None, inflight=8) == Route("4", "rule:busy")  # unknown tokens: no max_tokens
    assert route(policy, "k", tokens=None, inflight=1) == Route("2", "canary")
    assert not rule_matches(short, tokens=None, inflight=100)
    # Rules come first, in order: an earlier match wins over a later one.
    first = TrafficPolicy(stable="1", rules=[busy, short])
    assert route(first, "k", tokens=1, inflight=9) == Route("4", "rule:busy")


def test_shadow_mirrors_its_share_and_never_the_answering_version() -> None:
    policy = TrafficPolicy(stable="1", canary=Canary(version="2", weight=50), shadow=Shadow(version="2", percent=100))
    routes = [route(policy, k) for k in KEYS[:4000]]
    assert {r.shadow for r in routes if r.version == "1"} == {"2"}
    assert {r.shadow for r in routes if r.version == "2"} == {None}  # the canary answers: no copy to itself
    assert any(r.version == "2" for r in routes)

    full = TrafficPolicy(stable="1", shadow=Shadow(version="3", percent=100))
    assert all(route(full, k) == Route("1", "stable", "3") for k in KEYS[:500])

    part = TrafficPolicy(stable="1", shadow=Shadow(version="3", percent=25))
    mirrored = sum(route(part, k).shadow == "3" for k in KEYS) * 100.0 / len(KEYS)
    assert abs(mirrored - 25.0) <= 1.5

    none = TrafficPolicy(stable="1", shadow=Shadow(version="3", percent=0))
    assert all(route(none, k).shadow is None for k in KEYS[:500])

    # A rule that sends parts to the shadow version: those parts get no copy.
    ruled = TrafficPolicy(
        stable="1", shadow=Shadow(version="3"), rules=[RouteRule(name="small", version="3", max_tokens=5)]
    )
    assert route(ruled, "k", tokens=4) == Route("3", "rule:small", None)
    assert route(ruled, "k", tokens=6) == Route("1", "stable", "3")


def test_shadow_choice_does_not_depend_on_the_answering_split() -> None:
    """The mirrored keys are the same whatever the canary weight: separate salt."""
    mirrored = []
    for weight in (10, 50):
        policy = TrafficPolicy(
            stable="1", canary=Canary(version="2", weight=weight), shadow=Shadow(version="3", percent=30)
        )
        mirrored.append({k for k in KEYS if route(policy, k).shadow == "3"})
    assert mirrored[0] == mirrored[1]
