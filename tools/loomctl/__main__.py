"""``loomctl``: options, one function per subcommand, exit codes (0 ok, 1 failed, 2 usage)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Mapping
from typing import Any

from tools.loomctl import admin, durable, render
from tools.loomctl.client import ApiError
from tools.loomctl.common import EXIT_FAILED, EXIT_USAGE, Command, UsageError, as_dict, client, out, quote
from tools.loomctl.inputs import add_input_options, request_inputs

DEFAULT_GATEWAY = "http://127.0.0.1:8080"
DEFAULT_MONITOR = "http://127.0.0.1:8090"
WAIT_POLL_S = 0.25
#: Requests with the same key reach the same model version (canary, experiment arms).
ROUTE_KEY_HEADER = "x-loom-route-key"


def _number(raw: str, *, zero_ok: bool) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {raw!r}") from None
    if value < 0 or (value == 0 and not zero_ok):
        raise argparse.ArgumentTypeError(f"must be {'0 or more' if zero_ok else 'above 0'}, got {raw}")
    return value


def _positive(raw: str) -> float:
    return _number(raw, zero_ok=False)


def _non_negative(raw: str) -> float:
    return _number(raw, zero_ok=True)


def _millis(raw: str) -> int:
    if not raw.isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number of milliseconds, got {raw!r}")
    return int(raw)


# --- commands -----------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    gateway, monitor = client(args, "gateway"), client(args, "monitor")
    try:
        reply = gateway.fetch("GET", "/readyz", check=False)
        ready = isinstance(reply.body, dict) and reply.body.get("ready") is True
        state = "ready" if ready else f"NOT READY (HTTP {reply.status})"
    except ApiError as exc:
        ready, state = False, f"DOWN ({exc})"
    print(f"gateway  {gateway.base_url}  {state}")
    try:
        dash = as_dict(monitor.get("/v1/dashboard"), "/v1/dashboard")
    except ApiError as exc:
        print(f"monitor  {monitor.base_url}  DOWN ({exc})")
        return EXIT_FAILED
    alerts = dash.get("alerts") or []
    counts = {sev: sum(1 for a in alerts if a.get("severity") == sev) for sev in render.SEVERITY_ORDER}
    detail = ", ".join(f"{n} {sev}" for sev, n in counts.items() if n)
    print(f"monitor  {monitor.base_url}  up, {len(alerts)} active alerts" + (f" ({detail})" if detail else ""))
    print(render.triton_line((dash.get("models") or {}).get("triton")))
    print()
    pipelines = dash.get("pipelines") or []
    out(render.pipelines_table(pipelines) if pipelines else ["no pipeline has had traffic yet"])
    return 0 if ready else EXIT_FAILED


def cmd_predict(args: argparse.Namespace) -> int:
    gateway = client(args, "gateway")
    body: dict[str, Any] = {"inputs": request_inputs(args)}
    if args.timeout_ms:
        body["timeout_ms"] = args.timeout_ms
    if args.request_id:
        body["request_id"] = args.request_id
    if args.bypass_cache:
        body["bypass_cache"] = True
    # The mesh's own deadline ends the call; the socket waits a little longer so that its answer arrives.
    wait_s = max(args.timeout, (args.timeout_ms or 10_000) / 1000 + 2)
    path = f"/v1/pipelines/{quote(args.pipeline)}:predict"
    headers = {ROUTE_KEY_HEADER: args.route_key} if args.route_key else None
    answer = as_dict(gateway.post(path, body, timeout=wait_s, headers=headers), "predict")
    if args.quiet:
        topics = answer.get("topics") or []
        print(answer.get("request_id", "-"), topics[0].get("label", "-") if topics else "-")
    elif args.json:
        print(render.pretty_json(answer))
    else:
        print(render.answer_summary(answer))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    models = as_dict(client(args, "monitor").get("/v1/dashboard"), "/v1/dashboard").get("models") or {}
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    print(render.triton_line(models.get("triton")))
    print()
    versions = models.get("versions") or []
    out(render.models_table(versions) if versions else ["no model version has been seen yet"])
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    monitor = client(args, "monitor")
    path = "/v1/traces/" + quote(args.id)
    deadline = time.monotonic() + args.wait
    while True:
        try:
            doc = as_dict(monitor.get(path), path)
            break
        except ApiError as exc:
            left = deadline - time.monotonic()
            if exc.status != 404:
                raise
            if left <= 0:
                hint = "" if args.wait else " (spans arrive a moment after the answer: try --wait 5)"
                raise ApiError(exc.message + hint, status=404, code=exc.code) from None
            time.sleep(min(WAIT_POLL_S, left))
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    width = max(render.MIN_WIDTH, shutil.get_terminal_size((render.MIN_WIDTH, 24)).columns)
    out(render.waterfall(doc, width))
    return 0


def cmd_alerts(args: argparse.Namespace) -> int:
    state = "all" if args.all else "active"
    body = as_dict(client(args, "monitor").get("/v1/alerts", query={"state": state}), "/v1/alerts")
    alerts = body.get("alerts") or []
    if args.json:
        print(json.dumps(alerts, indent=2))
    elif not alerts:
        print("no alerts" if args.all else "no active alerts")
    else:
        out(render.alerts_table(alerts, time.time() * 1000))
    return 0


def cmd_feedback(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"pipeline": args.pipeline, "request_id": args.request_id}
    if args.label is not None:
        body["label"] = args.label
    else:
        body["correct"] = bool(args.correct)
    answer = client(args, "gateway").post("/v1/feedback", body)
    if isinstance(answer, dict) and answer.get("accepted") is True:
        print(f"feedback on {args.pipeline}/{args.request_id}: accepted")
        return 0
    print(f"feedback on {args.pipeline}/{args.request_id}: not accepted ({json.dumps(answer)})", file=sys.stderr)
    return EXIT_FAILED


def cmd_drift(args: argparse.Namespace) -> int:
    features = as_dict(client(args, "monitor").get("/v1/drift"), "/v1/drift").get("features") or []
    if args.json:
        print(json.dumps(features, indent=2))
    else:
        out(render.drift_table(features) if features else ["no drift data yet"])
    return 0


def cmd_accuracy(args: argparse.Namespace) -> int:
    rows = as_dict(client(args, "monitor").get("/v1/accuracy"), "/v1/accuracy").get("accuracy") or []
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        out(render.accuracy_table(rows) if rows else ["no accuracy yet: it needs feedback (loomctl feedback ...)"])
    return 0


def cmd_keys_new(args: argparse.Namespace) -> int:
    """A new API key, and the record that lets it in (the services store only its sha256)."""
    # The same shape as services.common.auth.generate_api_key; loomctl stays standard-library only.
    key = "loom_" + secrets.token_urlsafe(32)
    record = {
        "id": args.id,
        "sha256": hashlib.sha256(key.encode()).hexdigest(),
        "roles": sorted(set(args.role)),
        "tenant": args.tenant,
    }
    if args.json:
        print(json.dumps({"key": key, "record": record}, indent=2))
        return 0
    print(f"key     {key}")
    print("        give it to the caller now: it is not kept anywhere, only its sha256 is")
    print(f"record  {json.dumps(record)}")
    print("        add it to the JSON list in LOOM_AUTH_KEYS_FILE and restart the gateway")
    return 0


# --- options ------------------------------------------------------------------------------------


def _add_globals(p: argparse.ArgumentParser, defaults: Mapping[str, Any] | None) -> None:
    """The global options; on a subcommand they default to SUPPRESS so they override only when given there."""

    def default(key: str) -> Any:
        return argparse.SUPPRESS if defaults is None else defaults[key]

    shown = "" if defaults is None else ", now %(default)s"
    p.add_argument("--gateway", metavar="URL", default=default("gateway"), help=f"env LOOM_GATEWAY_URL{shown}")
    p.add_argument("--monitor", metavar="URL", default=default("monitor"), help=f"env LOOM_MONITOR_URL{shown}")
    p.add_argument("--timeout", metavar="S", type=_positive, default=default("timeout"), help=f"HTTP timeout, s{shown}")


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    defaults = {
        "gateway": env.get("LOOM_GATEWAY_URL") or DEFAULT_GATEWAY,
        "monitor": env.get("LOOM_MONITOR_URL") or DEFAULT_MONITOR,
        "timeout": 10.0,
    }
    parser = argparse.ArgumentParser(
        prog="loomctl",
        description="Operate a running Loom mesh over HTTP.",
        epilog="Calls to the gateway and the monitor carry the credential in LOOM_API_KEY (an API key or a JWT), "
        "else LOOM_DEV_API_KEY, else the key make run keeps in .loom/dev-api-key; the monitor's reads need the "
        "role viewer. https:// URLs are verified against LOOM_TLS_CA when set.",
    )
    _add_globals(parser, defaults)
    parser.set_defaults(environ=env)  # where the credential and LOOM_TLS_CA are looked up
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, func: Command, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_globals(p, None)
        p.set_defaults(func=func)
        return p

    command("status", cmd_status, "gateway readiness, per-pipeline SLOs, Triton and active alerts")

    p = command("predict", cmd_predict, "send one request through the gateway and print the answer")
    p.add_argument("pipeline")
    add_input_options(p)
    p.add_argument("--timeout-ms", metavar="N", type=_millis, default=0, help="deadline (0: the pipeline's)")
    p.add_argument("--request-id", metavar="ID", help="the id to label the answer with")
    p.add_argument("--bypass-cache", action="store_true", help="skip the inference cache")
    p.add_argument("--route-key", metavar="KEY", help="sticky routing key: the same key reaches the same model version")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the request id and the top topic")
    p.add_argument("--json", action="store_true", help="print the whole answer as JSON")

    p = command(
        "models",
        cmd_models,
        "the model registry (list, show, register, retire); with no subcommand (or stats): live traffic per version",
    )
    p.add_argument("--json", action="store_true", help="print the JSON")
    admin.add_models_commands(p, cmd_models, lambda q: _add_globals(q, None))

    p = command("trace", cmd_trace, "the waterfall of one request: every hop, its service, duration and queue wait")
    p.add_argument("id", help="a request id or a trace id")
    p.add_argument("--json", action="store_true", help="print the monitor's trace document")
    p.add_argument("--wait", metavar="S", type=_non_negative, default=0.0, help="retry this long while not found")

    p = command("alerts", cmd_alerts, "active alerts (--all: resolved ones too)")
    p.add_argument("--all", action="store_true", help="include resolved alerts")
    p.add_argument("--json", action="store_true", help="print the monitor's JSON")

    p = command("feedback", cmd_feedback, "report the true label of an answered request")
    p.add_argument("pipeline")
    p.add_argument("request_id")
    verdict = p.add_mutually_exclusive_group(required=True)
    verdict.add_argument("--label", metavar="L", help="the true label")
    verdict.add_argument("--correct", action="store_true", help="the answer's top label was right")
    verdict.add_argument("--wrong", action="store_true", help="the answer's top label was wrong")

    p = command("drift", cmd_drift, "input and output drift (PSI) per pipeline, model version and feature")
    p.add_argument("--json", action="store_true", help="print the monitor's JSON")

    p = command("accuracy", cmd_accuracy, "accuracy from feedback per pipeline and model version")
    p.add_argument("--json", action="store_true", help="print the monitor's JSON")

    p = command("keys", cmd_keys_new, "make an API key: the key once, and its record for LOOM_AUTH_KEYS_FILE")
    p.add_argument("action", choices=["new"], help="new: a fresh random key")
    p.add_argument("--id", required=True, help="the key's name: the actor in the audit log")
    p.add_argument(
        "--role", action="append", required=True, choices=["predict", "viewer", "admin"], help="repeat for several"
    )
    p.add_argument("--tenant", default="default", help="the caller's tenant (default: default)")
    p.add_argument("--json", action="store_true", help="print the key and the record as JSON")

    admin.add_commands(command, lambda q: _add_globals(q, None))
    durable.add_commands(command, lambda q: _add_globals(q, None))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(os.environ)
    try:
        args, extra = parser.parse_known_args(argv)
        # argparse hands a nargs="*" positional only the values before the first option, so the
        # name=value inputs of ``predict embed --timeout-ms 500 text=hi`` come back as extras.
        if args.command in ("predict", "submit") and not any(e.startswith("-") for e in extra):
            args.inputs += extra
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # argparse: 2 after a usage error, 0 after --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    func: Command = args.func
    name = getattr(args, "label", args.command)  # "models show", "rollout start", ...
    try:
        return func(args)
    except UsageError as exc:
        print(f"loomctl {name}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ApiError as exc:
        print(f"loomctl {name}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
