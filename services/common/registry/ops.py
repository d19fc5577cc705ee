"""Pure transitions of a :class:`ModelRecord`: register, retire, route traffic, roll out.

Every function takes the current record, never mutates it (it works on a deep
copy) and returns the new one, or raises a :class:`LoomError` whose message
says what to do next. No I/O: :meth:`RegistryStore.update` runs them inside a
compare-and-set loop, so they may run more than once for one write, and unit
tests cover every rule without a server.
"""

from __future__ import annotations

import itertools
import uuid
from datetime import UTC, datetime
from typing import Any

from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.common.registry.schema import (
    MODEL_NAME,
    Analysis,
    Canary,
    ModelRecord,
    Rollout,
    RolloutState,
    RolloutStep,
    Thresholds,
    TrafficPolicy,
    VersionMeta,
)

#: 10 % -> 50 % -> 100 %, each step with the RolloutStep defaults (min_requests, window_s).
DEFAULT_STEPS: list[RolloutStep] = [RolloutStep(weight=10), RolloutStep(weight=50), RolloutStep(weight=100)]
HISTORY_MAX = 20  # finished rollouts kept per model
ANALYSIS_MAX = 50  # analyses kept per rollout (latest last)


def rfc3339(now_ms: int) -> str:
    """``2025-01-31T12:00:00Z``: the registry's wall-clock format."""
    return datetime.fromtimestamp(now_ms / 1000, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _known(rec: ModelRecord) -> str:
    return ", ".join(sorted(rec.versions, key=int)) or "none"


def _version(rec: ModelRecord, version: str) -> VersionMeta:
    meta = rec.versions.get(version)
    if meta is None:
        raise NotFound(f"model {rec.name!r} has no version {version!r}; registered versions: {_known(rec)}")
    return meta


def _active_version(rec: ModelRecord, version: str) -> VersionMeta:
    meta = _version(rec, version)
    if meta.state != "active":
        raise FailedPrecondition(
            f"version {version} of {rec.name!r} is retired; register it again first "
            f"(active versions: {', '.join(rec.active_versions()) or 'none'})"
        )
    return meta


def _active_rollout(rec: ModelRecord) -> Rollout | None:
    return rec.rollout if rec.rollout is not None and rec.rollout.active else None


def _busy(rollout: Rollout) -> str:
    return f"rollout {rollout.id} of version {rollout.version} is {rollout.state}"


def _policy(policy: TrafficPolicy, **changes: Any) -> TrafficPolicy:
    """A new policy validated as a whole (field-by-field assignment would trip the cross-field checks)."""
    fields = {name: getattr(policy, name) for name in TrafficPolicy.model_fields}
    fields.update(changes)
    return TrafficPolicy(**fields)


def _finish(rec: ModelRecord, state: RolloutState, reason: str, now_ms: int) -> None:
    """End the active rollout: it stays as ``rec.rollout`` and joins the bounded history."""
    assert rec.rollout is not None
    rec.rollout.state = state
    rec.rollout.reason = reason
    rec.rollout.finished_at_unix_ms = now_ms
    rec.history = [*rec.history, rec.rollout.model_copy(deep=True)][-HISTORY_MAX:]


def register(rec: ModelRecord | None, model: str, meta: VersionMeta, now_ms: int) -> ModelRecord:
    """Add version ``meta.version``; the first version of a model becomes its stable version.

    A retired version may be registered again: it comes back active with the new metadata.
    """
    new_meta = meta.model_copy(deep=True)
    new_meta.state = "active"
    new_meta.retired_at = ""
    if not new_meta.created_at:
        new_meta.created_at = rfc3339(now_ms)
    if rec is None:
        if not MODEL_NAME.match(model):
            raise InvalidArgument(f"model name {model!r} must match {MODEL_NAME.pattern}")
        return ModelRecord(
            name=model,
            versions={new_meta.version: new_meta},
            policy=TrafficPolicy(stable=new_meta.version),
            updated_at_unix_ms=now_ms,
        )
    if rec.name != model:
        raise InvalidArgument(f"record of {rec.name!r} given to register a version of {model!r}")
    old = rec.versions.get(new_meta.version)
    if old is not None and old.state == "active":
        raise AlreadyExists(
            f"version {new_meta.version} of {model!r} is already registered (semver {old.semver}); "
            f"retire it first or use another version number (registered versions: {_known(rec)})"
        )
    out = rec.model_copy(deep=True)
    out.versions = {**out.versions, new_meta.version: new_meta}
    out.updated_at_unix_ms = now_ms
    return out


def retire(rec: ModelRecord, version: str, now_ms: int) -> ModelRecord:
    """Mark ``version`` retired (Triton unloads it); refused while anything routes to it."""
    meta = _version(rec, version)
    if meta.state == "retired":
        raise FailedPrecondition(f"version {version} of {rec.name!r} is already retired (since {meta.retired_at})")
    if version == rec.stable:
        raise FailedPrecondition(
            f"version {version} is the stable version of {rec.name!r}; promote another version first"
        )
    rollout = _active_rollout(rec)
    if rollout is not None and rollout.version == version:
        raise FailedPrecondition(f"{_busy(rollout)}; abort it first")
    if version in rec.policy.referenced():
        raise FailedPrecondition(
            f"the traffic policy of {rec.name!r} routes to version {version} (canary, shadow, experiment "
            "arm or rule); set a traffic policy without it first"
        )
    out = rec.model_copy(deep=True)
    out.versions[version].state = "retired"
    out.versions[version].retired_at = rfc3339(now_ms)
    out.updated_at_unix_ms = now_ms
    return out


def set_traffic(rec: ModelRecord, policy: TrafficPolicy, now_ms: int) -> ModelRecord:
    """Replace the traffic policy by hand; every version it names must be registered and active."""
    rollout = _active_rollout(rec)
    if rollout is not None:
        raise FailedPrecondition(f"{_busy(rollout)} and owns the traffic split; abort it (or promote) first")
    for version in sorted(policy.referenced(), key=int):
        _active_version(rec, version)
    out = rec.model_copy(deep=True)
    out.policy = policy.model_copy(deep=True)
    out.updated_at_unix_ms = now_ms
    return out


def _check_steps(steps: list[RolloutStep]) -> None:
    if not steps:
        raise InvalidArgument("a rollout needs at least one step")
    weights = [s.weight for s in steps]
    if any(b <= a for a, b in itertools.pairwise(weights)):
        raise InvalidArgument(f"rollout step weights must increase strictly, not {weights}")


def start_rollout(
    rec: ModelRecord,
    version: str,
    now_ms: int,
    *,
    steps: list[RolloutStep] | None = None,
    thresholds: Thresholds | None = None,
    actor: str = "",
    rollout_id: str | None = None,
) -> ModelRecord:
    """Start a canary rollout of ``version``: it takes the first step's weight; an experiment ends."""
    _active_version(rec, version)
    if version == rec.stable:
        raise FailedPrecondition(f"version {version} is already stable for {rec.name!r}; nothing to roll out")
    rollout = _active_rollout(rec)
    if rollout is not None:
        raise FailedPrecondition(f"{_busy(rollout)}; abort it first")
    plan = [s.model_copy(deep=True) for s in (steps if steps is not None else DEFAULT_STEPS)]
    _check_steps(plan)
    out = rec.model_copy(deep=True)
    out.policy = _policy(out.policy, canary=Canary(version=version, weight=plan[0].weight), experiment=None)
    out.rollout = Rollout(
        id=rollout_id or uuid.uuid4().hex[:12],
        model=rec.name,
        version=version,
        baseline=rec.stable,
        steps=plan,
        thresholds=thresholds.model_copy(deep=True) if thresholds is not None else Thresholds(),
        started_by=actor,
        started_at_unix_ms=now_ms,
        step_started_at_unix_ms=now_ms,
    )
    out.updated_at_unix_ms = now_ms
    return out


def _require_rollout(rec: ModelRecord, doing: str) -> Rollout:
    rollout = _active_rollout(rec)
    if rollout is None:
        raise FailedPrecondition(f"no rollout of {rec.name!r} is active, nothing to {doing}; start one first")
    return rollout


def pause(rec: ModelRecord, reason: str, now_ms: int) -> ModelRecord:
    """Hold the rollout at its step: the traffic split stays, the controller stops advancing."""
    rollout = _require_rollout(rec, "pause")
    if rollout.state == "paused":
        raise FailedPrecondition(f"{_busy(rollout)} already; resume or abort it")
    out = rec.model_copy(deep=True)
    assert out.rollout is not None
    out.rollout.state = "paused"
    out.rollout.reason = reason
    out.updated_at_unix_ms = now_ms
    return out


def resume(rec: ModelRecord, now_ms: int) -> ModelRecord:
    """Continue a paused rollout; the step's observation window starts again."""
    rollout = _require_rollout(rec, "resume")
    if rollout.state != "paused":
        raise FailedPrecondition(f"{_busy(rollout)}, not paused; nothing to resume")
    out = rec.model_copy(deep=True)
    assert out.rollout is not None
    out.rollout.state = "running"
    out.rollout.reason = ""
    out.rollout.step_started_at_unix_ms = now_ms
    out.updated_at_unix_ms = now_ms
    return out


def abort(rec: ModelRecord, reason: str, now_ms: int, actor: str = "") -> ModelRecord:
    """Stop the rollout by hand: the canary loses its traffic, stable takes it all."""
    _require_rollout(rec, "abort")
    out = rec.model_copy(deep=True)
    out.policy = _policy(out.policy, canary=None)
    _finish(out, "aborted", reason or (f"aborted by {actor}" if actor else "aborted"), now_ms)
    out.updated_at_unix_ms = now_ms
    return out


def advance(rec: ModelRecord, now_ms: int) -> ModelRecord:
    """The controller's "step passed": the next step's weight and a fresh window, or promotion."""
    rollout = _require_rollout(rec, "advance")
    if rollout.state != "running":
        raise FailedPrecondition(f"{_busy(rollout)}; resume it first")
    if rollout.step + 1 >= len(rollout.steps):
        return promote(rec, rollout.version, now_ms, reason=f"all {len(rollout.steps)} steps passed")
    out = rec.model_copy(deep=True)
    assert out.rollout is not None
    out.rollout.step += 1
    out.rollout.step_started_at_unix_ms = now_ms
    weight = out.rollout.steps[out.rollout.step].weight
    out.policy = _policy(out.policy, canary=Canary(version=rollout.version, weight=weight))
    out.updated_at_unix_ms = now_ms
    return out


def promote(rec: ModelRecord, version: str | None, now_ms: int, *, reason: str = "") -> ModelRecord:
    """Make ``version`` (default: the rollout's or the policy's canary) the stable version."""
    rollout = _active_rollout(rec)
    if version is None:
        if rollout is not None:
            version = rollout.version
        elif rec.policy.canary is not None:
            version = rec.policy.canary.version
        else:
            raise InvalidArgument(f"{rec.name!r} has no canary to promote; name the version to promote")
    _active_version(rec, version)
    if version == rec.stable:
        raise FailedPrecondition(f"version {version} is already the stable version of {rec.name!r}")
    if rollout is not None and rollout.version != version:
        raise FailedPrecondition(f"{_busy(rollout)}; abort it first to promote version {version}")
    out = rec.model_copy(deep=True)
    shadow = out.policy.shadow if out.policy.shadow is not None and out.policy.shadow.version != version else None
    out.policy = _policy(out.policy, stable=version, canary=None, shadow=shadow)
    if rollout is not None:
        _finish(out, "succeeded", reason or f"version {version} promoted", now_ms)
    out.updated_at_unix_ms = now_ms
    return out


def rollback(rec: ModelRecord, reason: str, now_ms: int, *, actor: str = "") -> ModelRecord:
    """Send all traffic to stable: canary, experiment and rules go; an active rollout is rolled back."""
    rollout = _active_rollout(rec)
    policy = rec.policy
    if rollout is None and policy.canary is None and policy.experiment is None and not policy.rules:
        raise FailedPrecondition(
            f"nothing to roll back: all traffic of {rec.name!r} already goes to stable version {rec.stable}"
        )
    out = rec.model_copy(deep=True)
    out.policy = _policy(out.policy, canary=None, experiment=None, rules=[])
    if rollout is not None:
        _finish(out, "rolled_back", reason or (f"rolled back by {actor}" if actor else "rolled back"), now_ms)
    out.updated_at_unix_ms = now_ms
    return out


def record_analysis(rec: ModelRecord, analysis: Analysis) -> ModelRecord:
    """Keep the controller's latest verdict with the active rollout (the newest ANALYSIS_MAX)."""
    _require_rollout(rec, "analyse")
    out = rec.model_copy(deep=True)
    assert out.rollout is not None
    out.rollout.analysis = [*out.rollout.analysis, analysis.model_copy(deep=True)][-ANALYSIS_MAX:]
    out.updated_at_unix_ms = analysis.at_unix_ms
    return out
