"""loomctl's durable-lane commands: ``submit``, ``result`` and ``dlq list|replay``.

``submit`` hands a request to the gateway's durable lane (``POST
/v1/pipelines/{p}:submit``) and prints its id at once: the request is stored by
JetStream and runs even if the caller goes away. ``--wait`` then polls ``GET
/v1/results/{id}`` until the request is no longer PENDING. ``dlq`` reads and
replays the dead letters the lane gave up on (``/v1/admin/dlq``, role admin).
The rendering functions are pure, so they are tested without a server.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from tools.loomctl import render
from tools.loomctl.admin import AddCommand, AddGlobals, _group, _needs
from tools.loomctl.client import ApiError, JsonClient
from tools.loomctl.common import EXIT_FAILED, as_dict, client, out, quote
from tools.loomctl.inputs import add_input_options, request_inputs

#: The IETF draft's retry-safety header; the same key (per tenant) always names the same request.
IDEMPOTENCY_HEADER = "Idempotency-Key"
ROUTE_KEY_HEADER = "x-loom-route-key"
#: Polling GET /v1/results: quick at first (embed answers in milliseconds), then no more than every 2 s.
POLL_FIRST_S, POLL_MAX_S, POLL_GROWTH = 0.1, 2.0, 1.5
#: Longest ``--wait`` by default: the gateway's default deadline of a durable request (10 min) and a margin.
DEFAULT_WAIT_S = 630.0
REASON_WIDTH = 90
PENDING, DONE, FAILED = "PENDING", "DONE", "FAILED"


# --- rendering (pure) ---------------------------------------------------------------------------


def result_lines(result: Mapping[str, Any], now_ms: float) -> list[str]:
    """A durable request for people: its state and times, then the answer (as ``predict`` prints it) or its error."""
    state = str(result.get("state", "?"))
    accepted, finished = result.get("accepted_unix_ms"), result.get("finished_unix_ms")
    lines = [f"request  {result.get('request_id', '-')}   {state}   pipeline {result.get('pipeline', '-')}"]
    if state == PENDING:
        since = f" ({render.ago(now_ms - float(accepted))} ago)" if accepted else ""
        lines.append(f"accepted {render.utc(accepted)}{since}; not answered yet")
    elif accepted and finished:
        took = (float(finished) - float(accepted)) / 1000
        lines.append(f"accepted {render.utc(accepted)}, answered {took:.2f} s later")
    error = result.get("error")
    if isinstance(error, Mapping):
        where = f" ({error['service']})" if error.get("service") else ""
        lines.append(f"error    {error.get('code', '?')}{where}: {error.get('message', '')}")
    response = result.get("response")
    if isinstance(response, dict):
        if response.get("trace_id"):
            lines.append(f"trace    {response['trace_id']}")
        # Less the summary's own first line: the request id is on ours already.
        lines += render.answer_summary(response).splitlines()[1:]
    return lines


def dlq_table(letters: Sequence[Mapping[str, Any]]) -> list[str]:
    """Dead letters oldest first: where each was going, how often it was tried and why it died."""
    rows = [
        (
            str(d.get("seq", "?")),
            str(d.get("stage", "")),
            str(d.get("subject", "")),
            str(d.get("deliveries", "")),
            render.clip(str(d.get("reason", "")), REASON_WIDTH),
        )
        for d in letters
    ]
    lines = render.table(("SEQ", "STAGE", "SUBJECT", "DELIVERIES", "REASON"), rows, right=(0, 3))
    noun = "letter" if len(letters) == 1 else "letters"
    return [*lines, "", f"{len(letters)} dead {noun}; send one back with: loomctl dlq replay <seq> [<seq> ...]"]


# --- the calls ----------------------------------------------------------------------------------


def _result_path(request_id: str) -> str:
    return f"/v1/results/{quote(request_id)}"


def wait_for_result(gateway: JsonClient, request_id: str, wait_s: float) -> dict[str, Any]:
    """The result once it is no longer PENDING, or the last one seen when ``wait_s`` runs out.

    A 404 counts as not yet while time is left: a request published on NATS has no
    record until the gateway's ingress has taken it.
    """
    path = _result_path(request_id)
    deadline = time.monotonic() + wait_s
    pause = POLL_FIRST_S
    while True:
        try:
            result = as_dict(gateway.get(path), path)
            if result.get("state") != PENDING or time.monotonic() >= deadline:
                return result
        except ApiError as exc:
            if exc.status != 404 or time.monotonic() >= deadline:
                raise
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(POLL_MAX_S, pause * POLL_GROWTH)


def _show_result(args: argparse.Namespace, result: dict[str, Any], waited_s: float | None = None) -> int:
    """Exit 0 when answered or PENDING; 1 when FAILED, or still PENDING after a wait."""
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        out(result_lines(result, time.time() * 1000))
    state = result.get("state")
    if state == PENDING and waited_s is not None:
        rid = result.get("request_id", "")
        print(f"{rid} is still PENDING after {waited_s:g} s; later: loomctl result {rid}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_FAILED if state == FAILED else 0


def cmd_submit(args: argparse.Namespace) -> int:
    gateway = client(args, "gateway")
    body: dict[str, Any] = {"inputs": request_inputs(args)}
    if args.timeout_ms:
        body["timeout_ms"] = args.timeout_ms
    if args.request_id:
        body["request_id"] = args.request_id
    if args.bypass_cache:
        body["bypass_cache"] = True
    headers = {}
    if args.idempotency_key:
        headers[IDEMPOTENCY_HEADER] = args.idempotency_key
    if args.route_key:
        headers[ROUTE_KEY_HEADER] = args.route_key
    path = f"/v1/pipelines/{quote(args.pipeline)}:submit"
    accepted = as_dict(gateway.post(path, body, headers=headers or None), "submit")
    request_id = str(accepted.get("request_id", ""))
    if accepted.get("duplicate"):
        print(f"{request_id} was accepted before: nothing new was queued", file=sys.stderr)
    if not args.wait:
        print(json.dumps(accepted, indent=2) if args.json else request_id)
        return 0
    if not args.json:
        print(request_id, flush=True)  # the id first: a caller that gives up waiting can still fetch it
    return _show_result(args, wait_for_result(gateway, request_id, args.wait_timeout), args.wait_timeout)


def cmd_result(args: argparse.Namespace) -> int:
    gateway = client(args, "gateway")
    if args.wait:
        return _show_result(args, wait_for_result(gateway, args.request_id, args.wait), args.wait)
    path = _result_path(args.request_id)
    return _show_result(args, as_dict(gateway.get(path), path))


def cmd_dlq_list(args: argparse.Namespace) -> int:
    query: dict[str, str | int] = {"limit": args.limit}
    if args.stage:
        query["stage"] = args.stage
    body = as_dict(client(args, "gateway").get("/v1/admin/dlq", query=query), "the dead letters")
    letters = body.get("dead_letters") or []
    if args.json:
        print(json.dumps(letters, indent=2))
    else:
        where = f" from stage {args.stage}" if args.stage else ""
        out(dlq_table(letters) if letters else [f"no dead letters{where}"])
    return 0


def cmd_dlq_replay(args: argparse.Namespace) -> int:
    """Each letter back to its subject; one that fails does not stop the others (exit 1 at the end)."""
    gateway = client(args, "gateway")
    replayed, failed = [], 0
    for seq in args.seq:
        try:
            letter = as_dict(gateway.post(f"/v1/admin/dlq/{seq}:replay", {}), "the replay")
        except ApiError as exc:
            print(f"loomctl dlq replay: {seq}: {exc}", file=sys.stderr)
            failed += 1
            continue
        replayed.append(letter)
        if not args.json:
            print(f"{seq}  back to {letter.get('subject', '?')}  (was: {render.clip(str(letter.get('reason')), 60)})")
    if args.json:
        print(json.dumps(replayed, indent=2))
    return EXIT_FAILED if failed else 0


# --- options ------------------------------------------------------------------------------------


def _positive_int(raw: str) -> int:
    if not raw.isdigit() or int(raw) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number above 0, got {raw!r}")
    return int(raw)


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {raw!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {raw}")
    return value


def _millis(raw: str) -> int:
    if not raw.isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number of milliseconds, got {raw!r}")
    return int(raw)


def add_commands(command: AddCommand, add_globals: AddGlobals) -> None:
    """``submit``, ``result`` and ``dlq list|replay``."""
    p = command("submit", cmd_submit, "hand a request to the durable lane and print its id (--wait: and its answer)")
    p.add_argument("pipeline")
    add_input_options(p)
    p.add_argument("--idempotency-key", metavar="K", help="retry-safe: the same key always names the same request")
    p.add_argument("--timeout-ms", metavar="N", type=_millis, default=0, help="deadline (0: the gateway's, 10 min)")
    p.add_argument("--request-id", metavar="ID", help="the id to give the request (default: the gateway's)")
    p.add_argument("--bypass-cache", action="store_true", help="skip the inference cache")
    p.add_argument("--route-key", metavar="KEY", help="sticky routing key: the same key reaches the same model version")
    p.add_argument("--wait", action="store_true", help="poll until answered and print the answer like predict")
    p.add_argument(
        "--wait-timeout", metavar="S", type=_seconds, default=DEFAULT_WAIT_S, help="give up waiting after S s"
    )
    p.add_argument("--json", action="store_true", help="print the gateway's JSON (with --wait: the result)")

    p = command("result", cmd_result, "the state of a submitted request, and its answer once there is one")
    p.add_argument("request_id")
    p.add_argument("--wait", metavar="S", type=_seconds, help="poll up to S s while it is PENDING (or not found)")
    p.add_argument("--json", action="store_true", help="print the gateway's JSON")

    p = command("dlq", _needs("dlq", "list or replay"), "dead letters: durable messages the lane gave up on")
    add = _group(p, "dlq", add_globals)
    p = add("list", cmd_dlq_list, "the newest dead letters, oldest first: stage, subject, deliveries, reason")
    p.add_argument("--stage", metavar="S", help="only this stage's letters (ingress, pre_text, infer_minilm, ...)")
    p.add_argument("--limit", metavar="N", type=_positive_int, default=100, help="at most N letters (default 100)")
    p = add("replay", cmd_dlq_replay, "send letters back to the subject they were bound for, with fresh tries")
    p.add_argument("seq", nargs="+", type=_positive_int, help="the letters' sequence numbers (dlq list)")
