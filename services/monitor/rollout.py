"""The rollout controller: on every monitor evaluation, judge each running rollout and act on it.

For a running rollout it gathers the evidence (:class:`VersionBook`, :class:`AccuracyBook`), runs
:func:`analyze` and then advances the rollout (next step, or promotion after the last), rolls it
back, or only records the analysis. Every write is a compare-and-set through
:meth:`RegistryStore.update`, and the change function re-checks that the rollout it judged is still
the same rollout at the same step and still running: a second monitor replica, or an operator who
paused, aborted or promoted in between, makes the decision stale and nothing is written twice.

Analyses are written with the verdict's changes, not every tick: when the verdict changes, when the
set of passing checks changes (at most every ``write_interval_s``) and otherwise every
``refresh_s``; the latest analysis of every tick is kept in memory for the API.

An automatic rollback raises ``LoomRolloutRolledBack`` (P2). The alert is derived from the
registry — the model's current rollout was rolled back by the controller less than
``alert_hold_s`` ago — so it survives a monitor restart, fires on every replica alike and
resolves when the hold ends or a new rollout of the model starts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import Counter

from services.common.audit import AuditLog
from services.common.registry import ops
from services.common.registry.schema import Analysis, ModelRecord, Rollout
from services.common.registry.store import RegistryStore
from services.monitor.accuracy import AccuracyBook
from services.monitor.alerts import Condition, condition
from services.monitor.analysis import (
    Evidence,
    VersionAccuracy,
    analyze,
    canary_since,
    failed,
    outputs_since,
    stable_since,
)
from services.monitor.versions import VersionBook

log = logging.getLogger(__name__)

ACTOR = "monitor"
#: Every automatic rollback's reason starts with this; the alert tells it from a rollback by hand.
AUTO_ROLLBACK = "automatic rollback"
ALERT = "LoomRolloutRolledBack"

DECISIONS = Counter(
    "loom_rollout_decisions_total",
    "Rollout decisions the monitor applied (step, promote, rollback).",
    ["model", "decision"],
)


class StaleDecision(Exception):
    """The record moved (another replica or an operator acted) since the decision was taken."""


class RolloutController:
    """Judges running rollouts and writes the decisions (see the module docstring)."""

    def __init__(
        self,
        registry: RegistryStore,
        audit: AuditLog,
        versions: VersionBook,
        accuracy: AccuracyBook,
        *,
        alert_hold_s: float = 900.0,
        write_interval_s: float = 5.0,
        refresh_s: float = 60.0,
        min_output_samples: int = 200,
    ) -> None:
        self.registry = registry
        self.audit = audit
        self.versions = versions
        self.accuracy = accuracy
        self.alert_hold_ms = int(alert_hold_s * 1000)
        self.write_interval_ms = int(write_interval_s * 1000)
        self.refresh_ms = int(refresh_s * 1000)
        self.min_output_samples = min_output_samples
        #: model -> (rollout id, the analysis of the last tick), written or not.
        self.latest: dict[str, tuple[str, Analysis]] = {}
        # Records this controller wrote: the watch delivers them a moment later.
        self._written: dict[str, ModelRecord] = {}

    def view(self) -> dict[str, ModelRecord]:
        """The watched records, with this controller's own newer writes laid over them."""
        out = dict(self.registry.records)
        for model, rec in self._written.items():
            seen = out.get(model)
            if seen is None or seen.updated_at_unix_ms <= rec.updated_at_unix_ms:
                out[model] = rec
        return out

    # -- the tick -----------------------------------------------------------
    async def tick(self, now_ms: int) -> list[tuple[str, str]]:
        """Judge every running rollout once; returns the decisions applied as (model, decision)."""
        decisions: list[tuple[str, str]] = []
        judged: dict[tuple[str, str], VersionAccuracy] | None = None
        for model, rec in sorted(self.view().items()):
            rollout = rec.rollout
            if rollout is None or rollout.state != "running" or rollout.step >= len(rollout.steps):
                continue
            if judged is None:  # accuracy rows only when some rollout needs them
                judged = judged_by_version(self.accuracy.snapshot())
            try:
                decision = await self._judge(model, rollout, now_ms, judged)
            except Exception:
                log.exception("rollout %s of %s: the decision failed; retrying next evaluation", rollout.id, model)
                continue
            if decision:
                decisions.append((model, decision))
        return decisions

    def evidence(
        self, rollout: Rollout, now_ms: int, judged: dict[tuple[str, str], VersionAccuracy] | None = None
    ) -> Evidence:
        model, canary, stable = rollout.model, rollout.version, rollout.baseline
        judged = judged if judged is not None else judged_by_version(self.accuracy.snapshot())
        return Evidence(
            canary=self.versions.window(model, canary, canary_since(rollout), now_ms),
            stable=self.versions.window(model, stable, stable_since(rollout, now_ms), now_ms),
            canary_outputs=self.versions.outputs(model, canary, outputs_since(rollout)),
            stable_outputs=self.versions.outputs(model, stable, stable_since(rollout, now_ms)),
            canary_judged=judged.get((model, canary), VersionAccuracy()),
            stable_judged=judged.get((model, stable), VersionAccuracy()),
        )

    async def _judge(
        self, model: str, rollout: Rollout, now_ms: int, judged: dict[tuple[str, str], VersionAccuracy]
    ) -> str:
        analysis = analyze(
            rollout, self.evidence(rollout, now_ms, judged), now_ms, min_output_samples=self.min_output_samples
        )
        self.latest[model] = (rollout.id, analysis)
        if analysis.verdict == "pass":
            return await self._advance(model, rollout, analysis, now_ms)
        if analysis.verdict == "fail":
            return await self._rollback(model, rollout, analysis, now_ms)
        if self._worth_writing(rollout, analysis):

            def record(current: ModelRecord | None) -> ModelRecord:
                rec = _same(current, rollout)
                assert rec.rollout is not None
                if not self._worth_writing(rec.rollout, analysis):
                    raise StaleDecision("an equivalent analysis is already recorded")
                return ops.record_analysis(rec, analysis)

            await self._write(model, record)
        return ""

    def _worth_writing(self, rollout: Rollout, analysis: Analysis) -> bool:
        last = rollout.analysis[-1] if rollout.analysis else None
        if last is None or last.step != analysis.step or last.verdict != analysis.verdict:
            return True
        age = analysis.at_unix_ms - last.at_unix_ms
        changed = [(c.name, c.ok) for c in last.checks] != [(c.name, c.ok) for c in analysis.checks]
        return age >= self.refresh_ms or (changed and age >= self.write_interval_ms)

    async def _advance(self, model: str, rollout: Rollout, analysis: Analysis, now_ms: int) -> str:
        last_step = rollout.step + 1 >= len(rollout.steps)

        def step(current: ModelRecord | None) -> ModelRecord:
            return ops.advance(ops.record_analysis(_same(current, rollout), analysis), now_ms)

        new = await self._write(model, step)
        if new is None:
            return ""
        decision = "promote" if last_step else "step"
        details: dict[str, Any] = {
            "rollout": rollout.id,
            "step": rollout.step,
            "weight": rollout.steps[rollout.step].weight,
            "analysis": analysis.model_dump(mode="json"),
        }
        if last_step:
            details["stable"] = new.policy.stable
            log.info("rollout %s: %s version %s promoted to stable", rollout.id, model, rollout.version)
        else:
            details["next_weight"] = rollout.steps[rollout.step + 1].weight
            log.info(
                "rollout %s: %s version %s passed step %d, now at %g %%",
                rollout.id,
                model,
                rollout.version,
                rollout.step + 1,
                details["next_weight"],
            )
        await self._audit(f"rollout.{decision}", f"{model}/{rollout.version}", details)
        DECISIONS.labels(model, decision).inc()
        return decision

    async def _rollback(self, model: str, rollout: Rollout, analysis: Analysis, now_ms: int) -> str:
        reason = rollback_reason(rollout, analysis)

        def back(current: ModelRecord | None) -> ModelRecord:
            return ops.rollback(ops.record_analysis(_same(current, rollout), analysis), reason, now_ms, actor=ACTOR)

        if await self._write(model, back) is None:
            return ""
        log.warning("rollout %s: %s version %s rolled back: %s", rollout.id, model, rollout.version, reason)
        details = {
            "rollout": rollout.id,
            "step": rollout.step,
            "weight": rollout.steps[rollout.step].weight,
            "reason": reason,
            "analysis": analysis.model_dump(mode="json"),
        }
        await self._audit("rollout.rollback", f"{model}/{rollout.version}", details)
        DECISIONS.labels(model, "rollback").inc()
        return "rollback"

    async def _write(self, model: str, change: Callable[[ModelRecord | None], ModelRecord]) -> ModelRecord | None:
        """The CAS write; None when the decision went stale (someone else acted first)."""
        try:
            new = await self.registry.update(model, change)
        except StaleDecision as exc:
            log.debug("rollout decision for %s not written: %s", model, exc)
            return None
        self._written[model] = new
        return new

    async def _audit(self, action: str, target: str, details: dict[str, Any]) -> None:
        try:
            await self.audit.append(action, actor=ACTOR, target=target, details=details)
        except Exception:  # the decision stands; the log line keeps what the audit entry would have
            log.exception("audit entry %s for %s could not be written: %s", action, target, details)

    # -- outputs --------------------------------------------------------------
    def conditions(self, now_ms: int) -> list[Condition]:
        """``LoomRolloutRolledBack`` for every model whose current rollout the controller rolled back lately."""
        out = []
        for model, rec in sorted(self.view().items()):
            r = rec.rollout
            if r is None or r.state != "rolled_back" or not r.reason.startswith(AUTO_ROLLBACK):
                continue
            if now_ms - r.finished_at_unix_ms >= self.alert_hold_ms:
                continue
            out.append(
                condition(
                    ALERT,
                    "P2",
                    {"model": model, "version": r.version, "rollout": r.id},
                    True,
                    1.0,
                    f"{model}: rollout {r.id} of version {r.version} rolled back to version {r.baseline} "
                    f"at step {r.step + 1} ({r.steps[r.step].weight:g} %): {r.reason}",
                )
            )
        return out

    def rows(self) -> list[dict[str, object]]:
        """Every model's current rollout with its latest analysis, for GET /v1/rollouts."""
        out: list[dict[str, object]] = []
        for model, rec in sorted(self.view().items()):
            r = rec.rollout
            latest: Analysis | None = None
            if r is not None:
                ident, analysis = self.latest.get(model, ("", None))
                latest = analysis if ident == r.id and r.state == "running" else None
                if latest is None and r.analysis:
                    latest = r.analysis[-1]
            out.append(
                {
                    "model": model,
                    "stable": rec.policy.stable,
                    "canary": None if rec.policy.canary is None else rec.policy.canary.model_dump(mode="json"),
                    "weight": weight(rec),
                    "rollout": None if r is None else r.model_dump(mode="json", exclude={"analysis"}),
                    "analyses": 0 if r is None else len(r.analysis),
                    "analysis": None if latest is None else latest.model_dump(mode="json"),
                }
            )
        return out


def _same(current: ModelRecord | None, rollout: Rollout) -> ModelRecord:
    """``current`` if it still holds the judged rollout, running, at the judged step; else StaleDecision."""
    r = None if current is None else current.rollout
    if current is None or r is None:
        raise StaleDecision(f"rollout {rollout.id} is gone")
    if r.id != rollout.id or r.state != "running":
        raise StaleDecision(f"rollout {rollout.id} is now {r.id} {r.state}")
    if r.step != rollout.step or r.step_started_at_unix_ms != rollout.step_started_at_unix_ms:
        raise StaleDecision(f"rollout {rollout.id} moved to step {r.step + 1} (or restarted its window)")
    return current


def rollback_reason(rollout: Rollout, analysis: Analysis) -> str:
    checks = "; ".join(f"{c.name}: {c.detail}" for c in failed(analysis))
    return f"{AUTO_ROLLBACK} of version {rollout.version} at step {rollout.step + 1}: {checks}"


def weight(rec: ModelRecord) -> float | None:
    """The canary's share now: its weight while a rollout is active, 100 once promoted, 0 when it ended otherwise."""
    r = rec.rollout
    if r is None:
        return None
    if r.active:
        return rec.policy.canary.weight if rec.policy.canary is not None else 0.0
    return 100.0 if r.state == "succeeded" else 0.0


def judged_by_version(rows: Iterable[dict[str, object]]) -> dict[tuple[str, str], VersionAccuracy]:
    """Accuracy rows (one per pipeline, model, version) summed into one per (model, version)."""
    totals: dict[tuple[str, str], tuple[int, float]] = {}
    for row in rows:
        samples, accuracy = row.get("samples"), row.get("accuracy")
        if not isinstance(samples, int) or not isinstance(accuracy, int | float) or samples <= 0:
            continue
        key = (str(row["model"]), str(row["version"]))
        n, correct = totals.get(key, (0, 0.0))
        totals[key] = (n + samples, correct + accuracy * samples)
    return {key: VersionAccuracy(n, correct / n) for key, (n, correct) in totals.items()}
