"""loomctl's model lifecycle commands, against the gateway's ``/v1/admin`` API.

``models list|show|register|retire``, ``traffic set``, ``rollout start|status|pause|resume|abort``,
``promote``, ``rollback`` and ``audit``. The options become request bodies in pure
functions (``*_body``), so they are tested without a server; the gateway checks
them again and its message is what the operator sees when it refuses.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tools.loomctl import admin_render
from tools.loomctl.client import ApiError
from tools.loomctl.common import Command, UsageError, as_dict, client, out, quote

ADMIN = "/v1/admin"
#: ``loomctl`` adds a subcommand parser: (name, function, help) -> parser.
AddCommand = Callable[[str, Command, str], argparse.ArgumentParser]
AddGlobals = Callable[[argparse.ArgumentParser], None]


def _model(model: str) -> str:
    return f"{ADMIN}/models/{quote(model)}"


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


# --- options into request bodies (pure) ---------------------------------------------------------


def _weight(raw: str, what: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise UsageError(f"{what}: {raw!r} is not a number") from None


def _version_weight(item: str, what: str, default: float | None = None) -> tuple[str, float]:
    version, sep, raw = item.partition("=")
    if not version:
        raise UsageError(f"{what}: expected VERSION=WEIGHT, got {item!r}")
    if not sep:
        if default is None:
            raise UsageError(f"{what}: expected VERSION=WEIGHT, got {item!r}")
        return version, default
    return version, _weight(raw, what)


def parse_rule(item: str) -> dict[str, Any]:
    """``NAME:VERSION:max_tokens=N[,min_inflight=M]`` -> a route rule."""
    name, version, conditions = [*item.split(":", 2), "", ""][:3]
    if not name or not version or not conditions:
        raise UsageError(f"--rule: expected NAME:VERSION:max_tokens=N or NAME:VERSION:min_inflight=N, got {item!r}")
    rule: dict[str, Any] = {"name": name, "version": version}
    for cond in conditions.split(","):
        key, sep, raw = cond.partition("=")
        if key not in ("max_tokens", "min_inflight") or not sep:
            raise UsageError(f"--rule {name}: a condition is max_tokens=N or min_inflight=N, not {cond!r}")
        if not raw.isdigit():
            raise UsageError(f"--rule {name}: {key} must be a whole number, not {raw!r}")
        rule[key] = int(raw)
    return rule


def _load_file(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"--file: cannot read {path}: {exc.strerror or exc}") from None
    try:
        import yaml  # the mesh's own dependency; JSON alone where it is missing

        doc = yaml.safe_load(text)
    except ImportError:
        doc = json.loads(text)
    except Exception as exc:  # yaml.YAMLError and friends
        raise UsageError(f"--file {path}: not YAML or JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise UsageError(f"--file {path}: expected a mapping (stable, canary, shadow, experiment, rules)")
    return doc


def traffic_body(args: argparse.Namespace, current_stable: str | None) -> dict[str, Any]:
    """The TrafficPolicy to PUT: from ``--file``, or from the flags (stable defaults to the current one)."""
    flags = [args.stable, args.canary, args.shadow, args.arm, args.experiment, args.rule]
    if args.file:
        if any(flags):
            raise UsageError("--file replaces the whole policy; give it alone")
        return _load_file(args.file)
    if not any(flags):
        raise UsageError("say what to set: --stable, --canary, --shadow, --arm/--experiment, --rule or --file")
    if bool(args.arm) != bool(args.experiment):
        raise UsageError("an experiment needs both --experiment NAME and its --arm VERSION=WEIGHT (two or more)")
    if args.arm and args.canary:
        raise UsageError("a policy has either a canary or an experiment, not both")
    stable = args.stable or current_stable
    if not stable:
        raise UsageError("--stable VERSION is needed (the model has no stable version yet)")
    policy: dict[str, Any] = {"stable": stable}
    if args.canary:
        version, weight = _version_weight(args.canary, "--canary")
        policy["canary"] = {"version": version, "weight": weight}
    if args.shadow:
        version, percent = _version_weight(args.shadow, "--shadow", default=100.0)
        policy["shadow"] = {"version": version, "percent": percent}
    if args.arm:
        arms = dict(_version_weight(a, "--arm") for a in args.arm)
        policy["experiment"] = {"name": args.experiment, "arms": arms}
    if args.rule:
        policy["rules"] = [parse_rule(r) for r in args.rule]
    return policy


def rollout_body(args: argparse.Namespace) -> dict[str, Any]:
    """``{"version", "steps"?}``; without --steps the gateway's plan applies."""
    body: dict[str, Any] = {"version": args.version}
    if args.steps is None:
        if args.min_requests is not None or args.window is not None:
            raise UsageError("--min-requests and --window shape the steps: give --steps too (e.g. --steps 10,50,100)")
        return body
    steps = []
    for raw in args.steps.split(","):
        step: dict[str, Any] = {"weight": _weight(raw.strip(), "--steps")}
        if args.min_requests is not None:
            step["min_requests"] = args.min_requests
        if args.window is not None:
            step["window_s"] = args.window
        steps.append(step)
    body["steps"] = steps
    return body


def register_body(args: argparse.Namespace) -> dict[str, Any]:
    """The folder as an absolute path: the gateway (usually on this machine) reads it."""
    body: dict[str, Any] = {"source": os.path.abspath(args.source)}
    if args.version:
        body["version"] = args.version
    if args.notes:
        body["notes"] = args.notes
    return body


def reason_body(args: argparse.Namespace) -> dict[str, Any]:
    return {"reason": args.reason} if getattr(args, "reason", None) else {}


# --- commands -----------------------------------------------------------------------------------


def cmd_models_list(args: argparse.Namespace) -> int:
    records = as_dict(client(args, "gateway").get(f"{ADMIN}/models"), "models").get("models") or []
    if args.json:
        _print_json(records)
    else:
        out(admin_render.registry_table(records) if records else ["no model is registered"])
    return 0


def cmd_models_show(args: argparse.Namespace) -> int:
    rec = as_dict(client(args, "gateway").get(_model(args.model)), "the model")
    if args.json:
        _print_json(rec)
    else:
        out(admin_render.model_lines(rec))
    return 0


def cmd_models_register(args: argparse.Namespace) -> int:
    body = register_body(args)
    # Loading in Triton can take a while: wait as long as the gateway does for it.
    reply = client(args, "gateway").fetch(
        "POST", f"{_model(args.model)}/versions", body, timeout=max(args.timeout, 150)
    )
    rec = as_dict(reply.body, "the registered model")
    if args.json:
        _print_json(rec)
        return 0
    version = args.version or Path(body["source"]).name
    meta = (rec.get("versions") or {}).get(version, {})
    print(f"registered {args.model} version {version} ({meta.get('semver', '?')}), loaded in Triton; no traffic yet")
    out(admin_render.versions_table(rec))
    return 0


def cmd_models_retire(args: argparse.Namespace) -> int:
    rec = as_dict(client(args, "gateway").delete(f"{_model(args.model)}/versions/{quote(args.version)}"), "the model")
    if args.json:
        _print_json(rec)
    else:
        print(f"retired {args.model} version {args.version}; Triton unloaded it")
    return 0


def cmd_traffic_set(args: argparse.Namespace) -> int:
    gateway = client(args, "gateway")
    current = None
    if not args.stable and not args.file:
        current = (as_dict(gateway.get(_model(args.model)), "the model").get("policy") or {}).get("stable")
    rec = as_dict(gateway.put(f"{_model(args.model)}/traffic", traffic_body(args, current)), "the model")
    if args.json:
        _print_json(rec)
    else:
        out([f"traffic policy of {args.model}:", *admin_render.policy_lines(rec.get("policy"))])
    return 0


def cmd_rollout_start(args: argparse.Namespace) -> int:
    rollout = as_dict(client(args, "gateway").post(f"{_model(args.model)}/rollout", rollout_body(args)), "the rollout")
    if args.json:
        _print_json(rollout)
    else:
        out(admin_render.rollout_lines(rollout))
    return 0


def cmd_rollout_status(args: argparse.Namespace) -> int:
    status = as_dict(client(args, "gateway").get(f"{_model(args.model)}/rollout"), "the rollout")
    if args.json:
        _print_json(status)
        return 0
    current = status.get("current")
    live = _live_analysis(args, current)
    if live is not None and isinstance(current, dict):
        # The registry keeps analyses as verdicts change; the monitor has this evaluation's.
        current = {**current, "analysis": [*(current.get("analysis") or []), live]}
    lines = admin_render.rollout_lines(current)
    history = status.get("history") or []
    if history:
        lines += ["", "finished rollouts (newest first)", *admin_render.history_table(history)]
    out(lines)
    return 0


def _live_analysis(args: argparse.Namespace, current: object) -> dict[str, Any] | None:
    """The monitor's latest analysis of ``current`` when it is running and the monitor answers; else None."""
    if not isinstance(current, dict) or current.get("state") != "running":
        return None
    try:
        rows = as_dict(client(args, "monitor").get("/v1/rollouts"), "/v1/rollouts").get("rollouts") or []
    except ApiError:
        return None  # the registry's analysis is shown instead
    for row in rows:
        rollout, analysis = row.get("rollout") or {}, row.get("analysis")
        if rollout.get("id") == current.get("id") and isinstance(analysis, dict):
            return analysis
    return None


def _rollout_action(action: str) -> Command:
    def run(args: argparse.Namespace) -> int:
        path = f"{_model(args.model)}/rollout:{action}"
        rollout = as_dict(client(args, "gateway").post(path, reason_body(args)), "the rollout")
        if args.json:
            _print_json(rollout)
        else:
            out(admin_render.rollout_lines(rollout))
        return 0

    return run


def cmd_promote(args: argparse.Namespace) -> int:
    body = {"version": args.version} if args.version else {}
    rec = as_dict(client(args, "gateway").post(f"{_model(args.model)}:promote", body), "the model")
    if args.json:
        _print_json(rec)
    else:
        print(f"{args.model}: version {(rec.get('policy') or {}).get('stable')} is stable")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    rec = as_dict(client(args, "gateway").post(f"{_model(args.model)}:rollback", reason_body(args)), "the model")
    if args.json:
        _print_json(rec)
    else:
        print(f"{args.model}: all traffic to stable version {(rec.get('policy') or {}).get('stable')}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    query: dict[str, str | int] = {"limit": args.limit}
    if args.model:
        query["model"] = args.model
    entries = as_dict(client(args, "gateway").get(f"{ADMIN}/audit", query=query), "audit").get("entries") or []
    if args.json:
        _print_json(entries)
    else:
        out(admin_render.audit_table(entries) if entries else ["no audit entries"])
    return 0


# --- options ------------------------------------------------------------------------------------


def _count(raw: str) -> int:
    if not raw.isdigit() or int(raw) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number above 0, got {raw!r}")
    return int(raw)


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {raw!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {raw}")
    return value


def _group(parent: argparse.ArgumentParser, name: str, add_globals: AddGlobals, *, required: bool = True) -> AddCommand:
    """Subcommands under ``name`` (``rollout start``, ...), each with the global options and ``--json``."""
    sub = parent.add_subparsers(dest=f"{name}_command", metavar="SUBCOMMAND", required=required)
    # ``models --json`` exists already: a subcommand's --json then only overrides when given.
    json_default: Any = argparse.SUPPRESS if name == "models" else False

    def add(action: str, func: Command, action_help: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(action, help=action_help, description=action_help)
        add_globals(p)
        p.add_argument("--json", action="store_true", default=json_default, help="print the gateway's JSON")
        p.set_defaults(func=func, label=f"{name} {action}")
        return p

    return add


def add_models_commands(parent: argparse.ArgumentParser, stats: Command, add_globals: AddGlobals) -> None:
    """``models list|show|register|retire|stats`` under the existing ``models`` command."""
    add = _group(parent, "models", add_globals, required=False)
    add("list", cmd_models_list, "registered models: stable version, active versions, traffic, rollout")
    p = add("show", cmd_models_show, "one model: versions (semver, state, sha256), metadata, policy, rollout")
    p.add_argument("model")
    p = add("register", cmd_models_register, "register a version folder (with metadata.yaml) and load it")
    p.add_argument("model")
    p.add_argument("source", help="the version folder; the gateway must be able to read it")
    p.add_argument("--version", metavar="V", help="the Triton version number (default: the folder's name)")
    p.add_argument("--notes", metavar="TEXT", help="notes stored with the version")
    p = add("retire", cmd_models_retire, "retire a version: Triton unloads it (refused while it takes traffic)")
    p.add_argument("model")
    p.add_argument("version")
    add("stats", stats, "live traffic per model version (ready, share, latency) from the monitor")


def add_commands(command: AddCommand, add_globals: AddGlobals) -> None:
    """``traffic``, ``rollout``, ``promote``, ``rollback`` and ``audit``."""
    p = command("traffic", _needs("traffic", "set"), "set a model's traffic policy")
    add = _group(p, "traffic", add_globals)
    p = add("set", cmd_traffic_set, "replace the traffic policy (refused while a rollout runs)")
    p.add_argument("model")
    p.add_argument("--stable", metavar="V", help="the stable version (default: the current one)")
    p.add_argument("--canary", metavar="V=WEIGHT", help="a canary taking WEIGHT percent")
    p.add_argument("--shadow", metavar="V[=PERCENT]", help="mirror PERCENT (default 100) of requests to V")
    p.add_argument("--arm", metavar="V=WEIGHT", action="append", default=[], help="an experiment arm (repeat)")
    p.add_argument("--experiment", metavar="NAME", help="the experiment the --arm options form")
    p.add_argument(
        "--rule",
        metavar="NAME:V:COND",
        action="append",
        default=[],
        help="route to V when COND holds: max_tokens=N and/or min_inflight=N, comma separated (repeat)",
    )
    p.add_argument("--file", metavar="POLICY", help="the whole policy from a YAML or JSON file")

    p = command("rollout", _needs("rollout", "start, status, pause, resume or abort"), "progressive canary rollouts")
    add = _group(p, "rollout", add_globals)
    p = add("start", cmd_rollout_start, "start rolling out VERSION (canary steps checked by the monitor)")
    p.add_argument("model")
    p.add_argument("version")
    p.add_argument("--steps", metavar="W,W,...", help="canary weights in percent (default: the gateway's plan)")
    p.add_argument("--min-requests", metavar="N", type=_count, help="canary requests each step needs")
    p.add_argument("--window", metavar="S", type=_seconds, help="seconds each step is observed")
    p = add("status", cmd_rollout_status, "the current rollout, its latest analysis and the finished ones")
    p.add_argument("model")
    for action, text in (
        ("pause", "hold the rollout at its step"),
        ("resume", "continue a paused rollout"),
        ("abort", "stop the rollout; all traffic to stable"),
    ):
        p = add(action, _rollout_action(action), text)
        p.add_argument("model")
        if action != "resume":
            p.add_argument("--reason", metavar="TEXT", help="why, for the audit log")

    p = command("promote", cmd_promote, "make a version stable now (default: the rollout's canary)")
    p.add_argument("model")
    p.add_argument("version", nargs="?")
    p.add_argument("--json", action="store_true", help="print the gateway's JSON")

    p = command("rollback", cmd_rollback, "all traffic to the stable version now (canary, experiment, rules off)")
    p.add_argument("model")
    p.add_argument("--reason", metavar="TEXT", help="why, for the audit log")
    p.add_argument("--json", action="store_true", help="print the gateway's JSON")

    p = command("audit", cmd_audit, "the audit log: admin actions and rollout decisions, oldest first")
    p.add_argument("--model", metavar="M", help="only entries about this model")
    p.add_argument("--limit", metavar="N", type=_count, default=50, help="the newest N entries (default 50)")
    p.add_argument("--json", action="store_true", help="print the gateway's JSON")


def _needs(name: str, choices: str) -> Command:
    def run(_: argparse.Namespace) -> int:
        raise UsageError(f"{name} needs a subcommand: {choices}")

    return run
