"""Registry transitions: every move of a model record, and every refusal leaving the record as it was."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, LoomError, NotFound
from services.common.registry import ops
from services.common.registry.schema import (
    Analysis,
    Canary,
    Experiment,
    ModelRecord,
    RolloutStep,
    RouteRule,
    Shadow,
    Thresholds,
    TrafficPolicy,
    VersionMeta,
)

pytestmark = pytest.mark.unit

T0 = 1_700_000_000_000


def meta(version: str, semver: str = "") -> VersionMeta:
    return VersionMeta(version=version, semver=semver or f"{version}.0.0", artifacts={"model.onnx": "ab" * 32})


def three_versions() -> ModelRecord:
    rec = ops.register(None, "minilm", meta("1"), T0)
    rec = ops.register(rec, "minilm", meta("2"), T0 + 1)
    return ops.register(rec, "minilm", meta("3"), T0 + 2)


def rolling(version: str = "2") -> ModelRecord:
    return ops.start_rollout(three_versions(), version, T0 + 10, actor="ana", rollout_id="r1")


def refused(rec: ModelRecord, error: type[LoomError], match: str, change: Callable[[ModelRecord], object]) -> None:
    """``change`` raises ``error`` naming ``match``, and the record it got is untouched."""
    before = rec.model_dump()
    with pytest.raises(error, match=match):
        change(rec)
    assert rec.model_dump() == before


@pytest.fixture(autouse=True)
def _default_steps_untouched() -> Iterator[None]:
    before = [s.model_dump() for s in ops.DEFAULT_STEPS]
    yield
    assert [s.model_dump() for s in ops.DEFAULT_STEPS] == before


# --- register -------------------------------------------------------------------------------------


def test_first_version_becomes_stable() -> None:
    rec = ops.register(None, "minilm", meta("1"), T0)
    assert rec.name == "minilm" and rec.stable == "1" and rec.active_versions() == ["1"]
    assert rec.versions["1"].created_at == "2023-11-14T22:13:20Z"  # filled from now_ms when absent
    assert rec.updated_at_unix_ms == T0


def test_more_versions_keep_stable_and_keep_created_at() -> None:
    given = meta("2").model_copy(update={"created_at": "2024-01-01T00:00:00Z"})
    rec = ops.register(ops.register(None, "minilm", meta("1"), T0), "minilm", given, T0 + 5)
    assert rec.stable == "1" and rec.active_versions() == ["1", "2"]
    assert rec.versions["2"].created_at == "2024-01-01T00:00:00Z"


def test_register_refusals() -> None:
    rec = three_versions()
    refused(
        rec,
        AlreadyExists,
        r"version 2 of 'minilm' is already registered.*retire it first",
        lambda r: ops.register(r, "minilm", meta("2"), T0),
    )
    refused(rec, InvalidArgument, "record of 'minilm'", lambda r: ops.register(r, "other", meta("4"), T0))
    with pytest.raises(InvalidArgument, match="model name 'Bad Name'"):
        ops.register(None, "Bad Name", meta("1"), T0)


def test_a_retired_version_may_come_back_with_new_metadata() -> None:
    rec = ops.retire(three_versions(), "3", T0 + 20)
    assert rec.versions["3"].state == "retired" and rec.versions["3"].retired_at
    back = ops.register(rec, "minilm", meta("3", "3.1.0"), T0 + 30)
    assert back.versions["3"].state == "active" and back.versions["3"].retired_at == ""
    assert back.versions["3"].semver == "3.1.0"
    assert rec.versions["3"].state == "retired"  # the input is not touched


# --- retire ---------------------------------------------------------------------------------------


def test_retire_marks_the_version_and_leaves_the_input() -> None:
    rec = three_versions()
    out = ops.retire(rec, "2", T0 + 20)
    assert out.active_versions() == ["1", "3"] and out.versions["2"].retired_at == "2023-11-14T22:13:20Z"
    assert rec.active_versions() == ["1", "2", "3"]


@pytest.mark.parametrize(
    ("policy", "version"),
    [
        (TrafficPolicy(stable="1", canary=Canary(version="2", weight=5)), "2"),
        (TrafficPolicy(stable="1", shadow=Shadow(version="3")), "3"),
        (TrafficPolicy(stable="1", experiment=Experiment(name="ab", arms={"1": 50, "2": 50})), "2"),
        (TrafficPolicy(stable="1", rules=[RouteRule(name="short", version="3", max_tokens=16)]), "3"),
    ],
    ids=["canary", "shadow", "arm", "rule"],
)
def test_retire_refuses_a_version_the_policy_names(policy: TrafficPolicy, version: str) -> None:
    rec = ops.set_traffic(three_versions(), policy, T0 + 5)
    refused(rec, FailedPrecondition, "set a traffic policy without it first", lambda r: ops.retire(r, version, T0))


def test_retire_refusals() -> None:
    rec = three_versions()
    refused(rec, NotFound, r"no version '9'; registered versions: 1, 2, 3", lambda r: ops.retire(r, "9", T0))
    refused(rec, FailedPrecondition, "stable version.*promote another version first", lambda r: ops.retire(r, "1", T0))
    gone = ops.retire(rec, "3", T0)
    refused(gone, FailedPrecondition, "already retired", lambda r: ops.retire(r, "3", T0))
    running = rolling("2")
    refused(
        running,
        FailedPrecondition,
        "rollout r1 of version 2 is running; abort it first",
        lambda r: ops.retire(r, "2", T0),
    )


# --- set_traffic ----------------------------------------------------------------------------------


def test_set_traffic_replaces_the_policy() -> None:
    policy = TrafficPolicy(
        stable="2", experiment=Experiment(name="ab", arms={"2": 70, "3": 30}), shadow=Shadow(version="1", percent=10)
    )
    rec = three_versions()
    out = ops.set_traffic(rec, policy, T0 + 7)
    assert out.policy == policy and out.policy is not policy and out.updated_at_unix_ms == T0 + 7
    assert rec.policy == TrafficPolicy(stable="1")


def test_set_traffic_refusals() -> None:
    rec = ops.retire(three_versions(), "3", T0)
    refused(
        rec,
        NotFound,
        "no version '7'; registered versions: 1, 2, 3",
        lambda r: ops.set_traffic(r, TrafficPolicy(stable="7"), T0),
    )
    refused(
        rec,
        FailedPrecondition,
        "version 3 of 'minilm' is retired; register it again first",
        lambda r: ops.set_traffic(r, TrafficPolicy(stable="1", shadow=Shadow(version="3")), T0),
    )
    running = rolling()
    refused(
        running,
        FailedPrecondition,
        "rollout r1 of version 2 is running and owns the traffic split; abort it",
        lambda r: ops.set_traffic(r, TrafficPolicy(stable="1"), T0),
    )


# --- start_rollout --------------------------------------------------------------------------------


def test_start_rollout_sets_the_canary_and_ends_an_experiment() -> None:
    rec = ops.set_traffic(
        three_versions(), TrafficPolicy(stable="1", experiment=Experiment(name="ab", arms={"1": 50, "3": 50})), T0
    )
    out = ops.start_rollout(rec, "2", T0 + 10, actor="ana", rollout_id="r1")
    assert out.policy.canary == Canary(version="2", weight=10) and out.policy.experiment is None
    r = out.rollout
    assert r is not None
    assert (r.id, r.model, r.version, r.baseline, r.state, r.step) == ("r1", "minilm", "2", "1", "running", 0)
    assert [s.weight for s in r.steps] == [10, 50, 100] and r.thresholds == Thresholds()
    assert (r.started_by, r.started_at_unix_ms, r.step_started_at_unix_ms) == ("ana", T0 + 10, T0 + 10)
    assert rec.rollout is None and rec.policy.experiment is not None


def test_start_rollout_with_own_plan_and_random_id() -> None:
    steps = [RolloutStep(weight=25, min_requests=5, window_s=1), RolloutStep(weight=100, min_requests=5)]
    out = ops.start_rollout(three_versions(), "3", T0, steps=steps, thresholds=Thresholds(max_p95_ratio=2))
    assert out.rollout is not None and len(out.rollout.id) == 12 and int(out.rollout.id, 16) >= 0
    assert out.policy.canary == Canary(version="3", weight=25)
    assert out.rollout.thresholds.max_p95_ratio == 2 and out.rollout.steps == steps
    assert out.rollout.steps[0] is not steps[0]


def test_start_rollout_refusals() -> None:
    rec = ops.retire(three_versions(), "3", T0)
    refused(rec, NotFound, "no version '8'", lambda r: ops.start_rollout(r, "8", T0))
    refused(rec, FailedPrecondition, "retired; register it again first", lambda r: ops.start_rollout(r, "3", T0))
    refused(rec, FailedPrecondition, "already stable", lambda r: ops.start_rollout(r, "1", T0))
    flat = [RolloutStep(weight=50), RolloutStep(weight=50)]
    refused(rec, InvalidArgument, "increase strictly", lambda r: ops.start_rollout(r, "2", T0, steps=flat))
    refused(rec, InvalidArgument, "at least one step", lambda r: ops.start_rollout(r, "2", T0, steps=[]))
    running = rolling("2")
    refused(
        running,
        FailedPrecondition,
        "rollout r1 of version 2 is running; abort it first",
        lambda r: ops.start_rollout(r, "3", T0),
    )
    paused = ops.pause(running, "look", T0)
    refused(
        paused,
        FailedPrecondition,
        "rollout r1 of version 2 is paused; abort it first",
        lambda r: ops.start_rollout(r, "3", T0),
    )


# --- pause / resume / abort -----------------------------------------------------------------------


def test_pause_keeps_the_split_and_resume_restarts_the_window() -> None:
    running = rolling()
    paused = ops.pause(running, "investigating", T0 + 20)
    assert paused.rollout is not None and paused.rollout.state == "paused" and paused.rollout.reason == "investigating"
    assert paused.policy.canary == Canary(version="2", weight=10)
    resumed = ops.resume(paused, T0 + 30)
    assert resumed.rollout is not None and resumed.rollout.state == "running" and resumed.rollout.reason == ""
    assert resumed.rollout.step_started_at_unix_ms == T0 + 30
    assert running.rollout is not None and running.rollout.state == "running"


def test_pause_resume_refusals() -> None:
    idle = three_versions()
    refused(
        idle,
        FailedPrecondition,
        "no rollout of 'minilm' is active, nothing to pause; start one",
        lambda r: ops.pause(r, "", T0),
    )
    refused(idle, FailedPrecondition, "nothing to resume", lambda r: ops.resume(r, T0))
    running = rolling()
    refused(running, FailedPrecondition, "is running, not paused; nothing to resume", lambda r: ops.resume(r, T0))
    paused = ops.pause(running, "x", T0)
    refused(paused, FailedPrecondition, "paused already; resume or abort it", lambda r: ops.pause(r, "y", T0))


def test_abort_sends_all_traffic_to_stable_and_keeps_history() -> None:
    running = rolling()
    out = ops.abort(running, "", T0 + 40, actor="bob")
    assert out.policy == TrafficPolicy(stable="1")
    assert out.rollout is not None and out.rollout.state == "aborted" and out.rollout.reason == "aborted by bob"
    assert out.rollout.finished_at_unix_ms == T0 + 40
    assert [h.id for h in out.history] == ["r1"] and out.history[0].state == "aborted"
    paused_abort = ops.abort(ops.pause(running, "x", T0), "bad idea", T0 + 50)
    assert paused_abort.rollout is not None and paused_abort.rollout.reason == "bad idea"
    refused(out, FailedPrecondition, "nothing to abort", lambda r: ops.abort(r, "", T0))


# --- advance / promote ----------------------------------------------------------------------------


def test_advance_walks_the_steps_then_promotes() -> None:
    rec = rolling()
    rec = ops.advance(rec, T0 + 100)
    assert rec.rollout is not None and rec.rollout.step == 1 and rec.rollout.step_started_at_unix_ms == T0 + 100
    assert rec.policy.canary == Canary(version="2", weight=50)
    rec = ops.advance(rec, T0 + 200)
    assert rec.policy.canary == Canary(version="2", weight=100)
    done = ops.advance(rec, T0 + 300)
    assert done.stable == "2" and done.policy.canary is None
    assert (
        done.rollout is not None and done.rollout.state == "succeeded" and done.rollout.reason == "all 3 steps passed"
    )
    assert done.history[-1].state == "succeeded" and done.history[-1].finished_at_unix_ms == T0 + 300
    assert rec.stable == "1"


def test_advance_refusals() -> None:
    refused(three_versions(), FailedPrecondition, "nothing to advance", lambda r: ops.advance(r, T0))
    paused = ops.pause(rolling(), "x", T0)
    refused(paused, FailedPrecondition, "paused; resume it first", lambda r: ops.advance(r, T0))


def test_promote_the_rollout_by_default_and_drop_its_shadow() -> None:
    rec = ops.set_traffic(three_versions(), TrafficPolicy(stable="1", shadow=Shadow(version="2")), T0)
    rec = ops.start_rollout(rec, "2", T0, rollout_id="r9")
    out = ops.promote(rec, None, T0 + 60)
    assert out.policy == TrafficPolicy(stable="2")
    assert out.rollout is not None and out.rollout.state == "succeeded" and out.rollout.reason == "version 2 promoted"
    assert [h.id for h in out.history] == ["r9"]


def test_promote_by_hand_without_a_rollout() -> None:
    rec = ops.set_traffic(
        three_versions(),
        TrafficPolicy(stable="1", canary=Canary(version="3", weight=20), shadow=Shadow(version="2")),
        T0,
    )
    out = ops.promote(rec, None, T0 + 1)  # the policy's canary
    assert (
        out.policy == TrafficPolicy(stable="3", shadow=Shadow(version="2")) and out.rollout is None and not out.history
    )
    named = ops.promote(rec, "2", T0 + 1)  # another version: canary removed, shadow of it removed
    assert named.policy == TrafficPolicy(stable="2")


def test_promote_refusals() -> None:
    rec = ops.retire(three_versions(), "3", T0)
    refused(rec, InvalidArgument, "no canary to promote; name the version", lambda r: ops.promote(r, None, T0))
    refused(rec, NotFound, "registered versions: 1, 2, 3", lambda r: ops.promote(r, "5", T0))
    refused(rec, FailedPrecondition, "retired", lambda r: ops.promote(r, "3", T0))
    refused(rec, FailedPrecondition, "already the stable version", lambda r: ops.promote(r, "1", T0))
    running = rolling("2")
    refused(
        running,
        FailedPrecondition,
        "rollout r1 of version 2 is running; abort it first to promote version 3",
        lambda r: ops.promote(r, "3", T0),
    )


# --- rollback -------------------------------------------------------------------------------------


def test_rollback_of_a_rollout() -> None:
    rec = ops.advance(rolling(), T0 + 50)
    out = ops.rollback(rec, "canary error rate 0.2 above stable", T0 + 60)
    assert out.policy == TrafficPolicy(stable="1")
    assert out.rollout is not None and out.rollout.state == "rolled_back"
    assert out.rollout.reason == "canary error rate 0.2 above stable" and out.rollout.step == 1
    assert out.history[-1].state == "rolled_back"


def test_rollback_by_hand_clears_experiment_and_rules_but_keeps_the_shadow() -> None:
    policy = TrafficPolicy(
        stable="1",
        experiment=Experiment(name="ab", arms={"1": 50, "2": 50}),
        rules=[RouteRule(name="busy", version="3", min_inflight=8)],
        shadow=Shadow(version="3"),
    )
    rec = ops.set_traffic(three_versions(), policy, T0)
    out = ops.rollback(rec, "", T0 + 1, actor="bob")
    assert out.policy == TrafficPolicy(stable="1", shadow=Shadow(version="3")) and out.rollout is None
    refused(
        out,
        FailedPrecondition,
        "nothing to roll back: all traffic of 'minilm' already goes to stable version 1",
        lambda r: ops.rollback(r, "", T0),
    )


def test_rollback_reason_defaults_to_the_actor() -> None:
    out = ops.rollback(rolling(), "", T0, actor="carol")
    assert out.rollout is not None and out.rollout.reason == "rolled back by carol"


# --- analysis and bounds --------------------------------------------------------------------------


def test_record_analysis_is_bounded_and_needs_a_rollout() -> None:
    rec = rolling()
    for i in range(ops.ANALYSIS_MAX + 5):
        rec = ops.record_analysis(rec, Analysis(at_unix_ms=T0 + i, step=0, verdict="wait", canary_requests=i))
    assert rec.rollout is not None and len(rec.rollout.analysis) == ops.ANALYSIS_MAX
    assert (
        rec.rollout.analysis[0].canary_requests == 5
        and rec.rollout.analysis[-1].canary_requests == ops.ANALYSIS_MAX + 4
    )
    assert rec.updated_at_unix_ms == T0 + ops.ANALYSIS_MAX + 4
    refused(
        three_versions(),
        FailedPrecondition,
        "nothing to analyse",
        lambda r: ops.record_analysis(r, Analysis(at_unix_ms=T0, step=0, verdict="pass")),
    )


def test_history_keeps_the_latest_rollouts() -> None:
    rec = three_versions()
    for i in range(ops.HISTORY_MAX + 3):
        rec = ops.abort(ops.start_rollout(rec, "2", T0 + i, rollout_id=f"r{i}"), "", T0 + i)
    assert len(rec.history) == ops.HISTORY_MAX
    assert rec.history[0].id == "r3" and rec.history[-1].id == f"r{ops.HISTORY_MAX + 2}"
    assert rec.rollout is not None and rec.rollout.id == rec.history[-1].id  # the last one stays visible


def test_records_survive_a_json_round_trip() -> None:
    rec = ops.record_analysis(rolling(), Analysis(at_unix_ms=T0, step=0, verdict="wait"))
    assert ModelRecord.model_validate_json(rec.model_dump_json()) == rec
