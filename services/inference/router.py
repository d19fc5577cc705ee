"""Which version of a model answers a part: the traffic policy applied to one part (pure).

Order: complexity rules (first match wins), then an experiment's arms, then
canary against stable. Arms and canary pick by a hash bucket of the route
key, so one key (a user, a session) always meets the same version while the
policy stands; the canary's range grows from 0, so a key inside the canary at
10 % is still inside at 50 %. The shadow is decided by a bucket of its own
salt: which keys are mirrored does not depend on which version answers them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from services.common.registry.schema import Experiment, RouteRule, TrafficPolicy

#: Route reasons besides ``rule:<name>`` and ``arm:<experiment>``.
DEFAULT, STABLE, CANARY, FALLBACK = "default", "stable", "canary", "fallback"
_SHADOW_SALT = "shadow"


def bucket(model: str, key: str, salt: str = "") -> float:
    """A number in [0, 100) that depends only on (model, key, salt): the key's place in a split."""
    digest = hashlib.sha256(b"\0".join((model.encode(), salt.encode(), key.encode()))).digest()
    return int.from_bytes(digest[:8], "big") * 100.0 / 2.0**64


@dataclass(frozen=True)
class Route:
    """Where a part goes: ``version`` ("" = Triton's default), why, and a version to mirror it to."""

    version: str
    reason: str
    shadow: str | None = None


def rule_matches(rule: RouteRule, *, tokens: int | None, inflight: int) -> bool:
    """Every condition the rule gives must hold; an unknown token count never satisfies ``max_tokens``."""
    if rule.max_tokens is not None and (tokens is None or tokens > rule.max_tokens):
        return False
    return rule.min_inflight is None or inflight >= rule.min_inflight


def arm(experiment: Experiment, model: str, key: str) -> str:
    """The experiment arm of ``key``: cumulative weights over the arms in version order.

    Salted with the experiment's name, so a new experiment re-deals the keys
    instead of inheriting the last one's groups.
    """
    point = bucket(model, key, f"experiment:{experiment.name}")
    versions = sorted(experiment.arms, key=int)
    upto = 0.0
    for version in versions:
        upto += experiment.arms[version]
        if point < upto:
            return version
    return versions[-1]  # weights sum to 100 up to float rounding


def choose(policy: TrafficPolicy | None, *, model: str, route_key: str, tokens: int | None, inflight: int) -> Route:
    """The route of one part.

    ``tokens``: the input's real tokens (None when unknown); ``inflight``: parts of
    this model this replica is working on, this one included.
    """
    if policy is None:
        return Route("", DEFAULT)
    route = _answering(policy, model=model, route_key=route_key, tokens=tokens, inflight=inflight)
    shadow = policy.shadow
    if (
        shadow is not None
        and shadow.version != route.version
        and bucket(model, route_key, _SHADOW_SALT) < shadow.percent
    ):
        return Route(route.version, route.reason, shadow.version)
    return route


def _answering(policy: TrafficPolicy, *, model: str, route_key: str, tokens: int | None, inflight: int) -> Route:
    for rule in policy.rules:
        if rule_matches(rule, tokens=tokens, inflight=inflight):
            return Route(rule.version, f"rule:{rule.name}")
    if policy.experiment is not None:
        return Route(arm(policy.experiment, model, route_key), f"arm:{policy.experiment.name}")
    if policy.canary is not None and bucket(model, route_key) < policy.canary.weight:
        return Route(policy.canary.version, CANARY)
    return Route(policy.stable, STABLE)
