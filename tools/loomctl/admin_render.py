"""Pure text rendering of the gateway's admin JSON: the registry, one model, rollouts, the audit log.

Every function takes the ``/v1/admin`` JSON (``ModelRecord``, ``Rollout``, audit
entries) and returns lines; nothing here does I/O or reads the clock.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

from tools.loomctl.render import clip, table, utc

SHA_SHORT = 12  # hex digits of an artifact's sha256 in tables (--json has them whole)


def pct(weight: Any) -> str:
    return f"{float(weight or 0):g}%"


def _versions(rec: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    versions = rec.get("versions") or {}
    return {v: versions[v] for v in sorted(versions, key=lambda v: int(v) if str(v).isdigit() else 0)}


def roles(policy: Mapping[str, Any] | None) -> dict[str, list[str]]:
    """What each version does in the traffic policy: ``stable``, ``canary 10%``, ``shadow 100%``, ..."""
    p = policy or {}
    out: dict[str, list[str]] = {}

    def add(version: Any, role: str) -> None:
        out.setdefault(str(version), []).append(role)

    if p.get("stable"):
        add(p["stable"], "stable")
    if p.get("canary"):
        add(p["canary"].get("version"), f"canary {pct(p['canary'].get('weight'))}")
    if p.get("shadow"):
        add(p["shadow"].get("version"), f"shadow {pct(p['shadow'].get('percent', 100))}")
    experiment = p.get("experiment")
    if experiment:
        for version, weight in (experiment.get("arms") or {}).items():
            add(version, f"arm {experiment.get('name')} {pct(weight)}")
    for rule in p.get("rules") or []:
        add(rule.get("version"), f"rule {rule.get('name')}")
    return out


def traffic_summary(policy: Mapping[str, Any] | None) -> str:
    """One cell: what takes traffic besides stable, or ``all to stable``."""
    p = policy or {}
    parts = []
    if p.get("canary"):
        parts.append(f"canary {p['canary'].get('version')} at {pct(p['canary'].get('weight'))}")
    experiment = p.get("experiment")
    if experiment:
        arms = ",".join(f"{v}={float(w):g}" for v, w in sorted((experiment.get("arms") or {}).items()))
        parts.append(f"experiment {experiment.get('name')} ({arms})")
    if p.get("shadow"):
        parts.append(f"shadow {p['shadow'].get('version')} {pct(p['shadow'].get('percent', 100))}")
    rules = p.get("rules") or []
    if rules:
        parts.append(f"{len(rules)} rule{'s' if len(rules) > 1 else ''}")
    return ", ".join(parts) or "all to stable"


def rollout_summary(rollout: Mapping[str, Any] | None) -> str:
    if not rollout:
        return "-"
    steps = rollout.get("steps") or []
    step = int(rollout.get("step") or 0)
    state = str(rollout.get("state"))
    if state in ("running", "paused") and steps:
        return f"{state} v{rollout.get('version')} step {step + 1}/{len(steps)} ({pct(steps[step].get('weight'))})"
    return f"{state} v{rollout.get('version')}"


def registry_table(records: Sequence[Mapping[str, Any]]) -> list[str]:
    rows = []
    for rec in sorted(records, key=lambda r: str(r.get("name"))):
        versions = _versions(rec)
        active = [v for v, m in versions.items() if m.get("state", "active") == "active"]
        retired = [v for v, m in versions.items() if m.get("state") == "retired"]
        stable = str((rec.get("policy") or {}).get("stable", "-"))
        semver = versions.get(stable, {}).get("semver", "")
        rows.append(
            [
                str(rec.get("name")),
                f"{stable} ({semver})" if semver else stable,
                ",".join(active) or "-",
                ",".join(retired) or "-",
                traffic_summary(rec.get("policy")),
                rollout_summary(rec.get("rollout")),
                utc(rec.get("updated_at_unix_ms") or None),
            ]
        )
    return table(["MODEL", "STABLE", "ACTIVE", "RETIRED", "TRAFFIC", "ROLLOUT", "UPDATED"], rows)


def versions_table(rec: Mapping[str, Any]) -> list[str]:
    """One row per artifact (the version's columns on its first row), sha256 shortened."""
    by_version = roles(rec.get("policy"))
    rows = []
    for version, meta in _versions(rec).items():
        artifacts = sorted((meta.get("artifacts") or {}).items()) or [("-", "")]
        first = [
            version,
            str(meta.get("semver", "")),
            str(meta.get("state", "active")),
            ", ".join(by_version.get(version, [])) or "-",
        ]
        for i, (name, digest) in enumerate(artifacts):
            rows.append([*(first if i == 0 else [""] * len(first)), name, str(digest)[:SHA_SHORT] or "-"])
    return table(["VERSION", "SEMVER", "STATE", "ROLE", "ARTIFACT", "SHA256"], rows)


def _metrics(metrics: Mapping[str, Any] | None) -> str:
    return ", ".join(f"{k}={float(v):g}" for k, v in sorted((metrics or {}).items())) or "-"


def metadata_lines(version: str, meta: Mapping[str, Any], width: int = 100) -> list[str]:
    """The version's metadata, long text wrapped to ``width`` under its label."""
    fields = [
        ("training data", meta.get("training_data")),
        ("metrics", _metrics(meta.get("metrics")) if meta.get("metrics") else ""),
        ("created", " ".join(str(x) for x in (meta.get("created_at"), meta.get("created_by")) if x)),
        ("notes", meta.get("notes")),
        ("source", meta.get("source")),
        ("retired", meta.get("retired_at")),
    ]
    lines = [f"version {version} ({meta.get('semver', '?')}, {meta.get('state', 'active')})"]
    for name, value in fields:
        if value:
            label = f"  {name:<14}"
            lines += textwrap.wrap(
                str(value),
                width,
                initial_indent=label,
                subsequent_indent=" " * len(label),
                break_long_words=False,  # a path stays whole
                break_on_hyphens=False,
            )
    return lines


def policy_lines(policy: Mapping[str, Any] | None) -> list[str]:
    p = policy or {}
    lines = [f"  stable        {p.get('stable', '-')}"]
    if p.get("canary"):
        lines.append(f"  canary        {p['canary'].get('version')} at {pct(p['canary'].get('weight'))}")
    if p.get("shadow"):
        lines.append(f"  shadow        {p['shadow'].get('version')}, {pct(p['shadow'].get('percent', 100))} mirrored")
    experiment = p.get("experiment")
    if experiment:
        arms = ", ".join(f"{v} {pct(w)}" for v, w in sorted((experiment.get("arms") or {}).items()))
        lines.append(f"  experiment    {experiment.get('name')}: {arms}")
    for rule in p.get("rules") or []:
        when = [
            f"{k} {'<=' if k == 'max_tokens' else '>='} {rule[k]}"
            for k in ("max_tokens", "min_inflight")
            if rule.get(k)
        ]
        lines.append(f"  rule          {rule.get('name')}: {' and '.join(when)} -> {rule.get('version')}")
    return lines


def _number(value: Any) -> str:
    return "-" if value is None else f"{float(value):.4g}"


#: Checks that only hold a step back until it has its requests and its time (not breaches).
GATES = ("requests", "window")


def checks_table(analysis: Mapping[str, Any]) -> list[str]:
    rows = [
        [
            str(c.get("name")),
            "ok" if c.get("ok") else ("waiting" if c.get("name") in GATES else "FAIL"),
            _number(c.get("value")),
            _number(c.get("threshold")),
            clip(str(c.get("detail") or ""), 70),
        ]
        for c in analysis.get("checks") or []
    ]
    return table(["CHECK", "RESULT", "VALUE", "THRESHOLD", "DETAIL"], rows, right=[2, 3])


def rollout_lines(rollout: Mapping[str, Any] | None) -> list[str]:
    """The rollout's state, its plan with the current step marked, and its latest analysis."""
    if not rollout:
        return ["no rollout"]
    steps = rollout.get("steps") or []
    step = int(rollout.get("step") or 0)
    active = rollout.get("state") in ("running", "paused")
    plan = " -> ".join(
        f"[{pct(s.get('weight'))}]" if active and i == step else pct(s.get("weight")) for i, s in enumerate(steps)
    )
    first = steps[0] if steps else {}
    lines = [
        f"rollout {rollout.get('id')}: version {rollout.get('version')} over {rollout.get('baseline')}, "
        f"{rollout.get('state')}" + (f" at step {step + 1}/{len(steps)}" if active else ""),
        f"  plan          {plan or '-'} (each step: {first.get('min_requests', '?')} requests, "
        f"{float(first.get('window_s') or 0):g} s)",
        f"  started       {utc(rollout.get('started_at_unix_ms') or None)} by {rollout.get('started_by') or '-'}",
    ]
    if active:
        lines.append(f"  step since    {utc(rollout.get('step_started_at_unix_ms') or None)}")
    if rollout.get("finished_at_unix_ms"):
        lines.append(f"  finished      {utc(rollout['finished_at_unix_ms'])}")
    if rollout.get("reason"):
        lines.append(f"  reason        {rollout['reason']}")
    analyses = rollout.get("analysis") or []
    if not analyses:
        lines.append("  analysis      none yet")
        return lines
    latest = analyses[-1]
    step_no = int(latest.get("step") or 0) + 1
    lines.append(
        f"  analysis      {latest.get('verdict')} at {utc(latest.get('at_unix_ms'))} (step {step_no}, "
        f"{latest.get('canary_requests', 0)} canary / {latest.get('stable_requests', 0)} stable requests)"
    )
    lines += ["    " + line for line in checks_table(latest)]
    return lines


def history_table(history: Sequence[Mapping[str, Any]]) -> list[str]:
    rows = [
        [
            str(r.get("id")),
            str(r.get("version")),
            str(r.get("baseline")),
            str(r.get("state")),
            f"{int(r.get('step') or 0) + 1}/{len(r.get('steps') or [])}",
            utc(r.get("started_at_unix_ms") or None),
            utc(r.get("finished_at_unix_ms") or None),
            str(r.get("started_by") or "-"),
            clip(str(r.get("reason") or ""), 60),
        ]
        for r in reversed(history)  # newest first
    ]
    return table(["ID", "VERSION", "BASELINE", "STATE", "STEP", "STARTED", "FINISHED", "BY", "REASON"], rows)


def model_lines(rec: Mapping[str, Any]) -> list[str]:
    """``models show``: versions with sha256, each version's metadata, the policy and the rollout."""
    lines = [
        f"model {rec.get('name')}  (updated {utc(rec.get('updated_at_unix_ms') or None)})",
        "",
        *versions_table(rec),
        "",
    ]
    for version, meta in _versions(rec).items():
        lines += metadata_lines(version, meta)
    lines += ["", "traffic policy", *policy_lines(rec.get("policy")), "", *rollout_lines(rec.get("rollout"))]
    return lines


def _details(entry: Mapping[str, Any]) -> str:
    details = dict(entry.get("details") or {})
    error = details.pop("error", None)
    if error:
        return str(error)
    details.pop("artifacts", None)  # long; --json has them
    return json.dumps(details, separators=(",", ":"), sort_keys=True, default=str) if details else ""


def audit_table(entries: Sequence[Mapping[str, Any]], width: int = 80) -> list[str]:
    """Oldest first, as the gateway returns them; DETAILS is the error of a refused or failed action."""
    rows = [
        [
            str(e.get("seq", "")),
            str(e.get("time", "")),
            str(e.get("actor", "")),
            str(e.get("action", "")),
            str(e.get("target", "")),
            str(e.get("result", "")),
            clip(_details(e), width),
        ]
        for e in entries
    ]
    return table(["SEQ", "TIME", "ACTOR", "ACTION", "TARGET", "RESULT", "DETAILS"], rows, right=[0])
