"""loomctl's durable-lane commands: submit (and --wait), result, dlq list and dlq replay, against a fake gateway."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tools.loomctl import durable
from tools.loomctl.__main__ import main

pytestmark = pytest.mark.unit

Answer = tuple[int, Any] | Callable[[], tuple[int, Any]]
T0 = 1_767_225_600_000
RID = "ik-4b1d0c9a7e"
ANSWER = {
    "request_id": RID,
    "trace_id": "e9fb5b4f62cf17c170613e262cbe97b5",
    "pipeline": "embed",
    "outputs": {
        "text": {"model": "minilm", "model_version": "1", "labels": [{"label": "sports", "score": 0.21}]},
    },
    "timings_ms": {"gateway_total": 20.6},
}
PENDING = {"request_id": RID, "state": "PENDING", "pipeline": "embed", "accepted_unix_ms": T0}
DONE = {**PENDING, "state": "DONE", "finished_unix_ms": T0 + 1250, "response": ANSWER}
FAILED = {
    **PENDING,
    "state": "FAILED",
    "finished_unix_ms": T0 + 40,
    "error": {"code": "INVALID_ARGUMENT", "message": "unknown input(s) ['image']", "service": "gateway"},
}
LETTERS = [
    {
        "seq": 7,
        "stage": "ingress",
        "subject": "loom.req.embed",
        "reason": "undecodable loom.v1.PredictRequest",
        "origin_stream": "LOOM_REQ",
        "origin_seq": 41,
        "deliveries": 1,
        "size": 17,
        "preview_b64": "/wAgbm90",
    },
    {
        "seq": 12,
        "stage": "infer_minilm",
        "subject": "loom.work.infer.minilm",
        "reason": "not acknowledged after 5 deliveries " + "x" * 200,
        "origin_stream": "LOOM_WORK",
        "origin_seq": 90,
        "deliveries": 6,
        "size": 900,
        "preview_b64": "",
    },
]


@dataclass
class Gateway:
    url: str
    answers: dict[tuple[str, str], Answer]
    calls: list[tuple[str, str, Any, dict[str, str]]] = field(default_factory=list)


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    answers: dict[tuple[str, str], Answer] = {}
    calls: list[tuple[str, str, Any, dict[str, str]]] = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            size = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(size) if size else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            calls.append((self.command, self.path, json.loads(raw) if raw else None, headers))
            answer = answers.get(
                (self.command, self.path.split("?")[0]),
                (404, {"error": {"code": "NOT_FOUND", "message": f"nothing at {self.path}"}}),
            )
            status, body = answer() if callable(answer) else answer
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _answer

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield Gateway(f"http://127.0.0.1:{httpd.server_address[1]}", answers, calls)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture(autouse=True)
def _quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "120")
    monkeypatch.setenv("LOOM_API_KEY", "loom_key-of-ci")
    monkeypatch.delenv("LOOM_GATEWAY_URL", raising=False)
    monkeypatch.setattr(durable, "POLL_FIRST_S", 0.01)


def sequence(*answers: tuple[int, Any]) -> Callable[[], tuple[int, Any]]:
    """Answers in turn, the last one for ever after."""
    left = list(answers)
    return lambda: left.pop(0) if len(left) > 1 else left[0]


# --- rendering ----------------------------------------------------------------------------------


def test_result_lines_show_state_times_and_the_answer_or_the_error() -> None:
    done = durable.result_lines(DONE, T0 + 5000)
    assert done[0] == f"request  {RID}   DONE   pipeline embed"
    assert done[1] == "accepted 2026-01-01 00:00:00.000 UTC, answered 1.25 s later"
    assert done[2:] == [
        "trace    e9fb5b4f62cf17c170613e262cbe97b5",
        "text     minilm v1  labels sports 0.21",
        "took     20.6 ms",
    ]
    pending = durable.result_lines(PENDING, T0 + 65_000)
    assert pending[1] == "accepted 2026-01-01 00:00:00.000 UTC (1m05s ago); not answered yet"
    failed = durable.result_lines(FAILED, T0)
    assert failed[-1] == "error    INVALID_ARGUMENT (gateway): unknown input(s) ['image']"


def test_dlq_table_right_aligns_numbers_clips_reasons_and_says_how_to_replay() -> None:
    lines = durable.dlq_table(LETTERS)
    assert lines[0].split() == ["SEQ", "STAGE", "SUBJECT", "DELIVERIES", "REASON"]
    assert lines[1].split()[:4] == ["7", "ingress", "loom.req.embed", "1"]
    assert lines[2].split()[:4] == ["12", "infer_minilm", "loom.work.infer.minilm", "6"]
    assert lines[1].index(" 7") < lines[2].index("12") + 1  # numbers end in one column
    assert lines[2].endswith("…") and len(lines[2].split("  ")[-1].strip()) == durable.REASON_WIDTH
    assert lines[-1].startswith("2 dead letters; send one back with: loomctl dlq replay <seq>")


# --- submit and result --------------------------------------------------------------------------


def test_submit_prints_the_id_and_sends_the_key_route_and_credential(
    gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    accepted = {"request_id": RID, "duplicate": False, "result": f"/v1/results/{RID}"}
    gateway.answers[("POST", "/v1/pipelines/embed:submit")] = (202, accepted)
    argv = ["--gateway", gateway.url, "submit", "embed", "--text", "hi", "lang=en", "--idempotency-key", "order-42"]
    assert main([*argv, "--route-key", "user-7", "--timeout-ms", "90000"]) == 0
    assert capsys.readouterr().out == f"{RID}\n"
    method, path, body, headers = gateway.calls[0]
    assert (method, path) == ("POST", "/v1/pipelines/embed:submit")
    assert body == {"inputs": {"text": "hi", "lang": "en"}, "timeout_ms": 90000}
    assert headers["idempotency-key"] == "order-42" and headers["x-loom-route-key"] == "user-7"
    assert headers["authorization"] == "Bearer loom_key-of-ci"
    gateway.answers[("POST", "/v1/pipelines/embed:submit")] = (202, {**accepted, "duplicate": True})
    assert main([*argv, "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["duplicate"] is True
    assert f"{RID} was accepted before: nothing new was queued" in captured.err


def test_submit_wait_polls_until_answered_and_prints_the_answer(
    gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway.answers[("POST", "/v1/pipelines/embed:submit")] = (202, {"request_id": RID, "duplicate": False})
    gateway.answers[("GET", f"/v1/results/{RID}")] = sequence((200, PENDING), (200, PENDING), (200, DONE))
    assert main(["--gateway", gateway.url, "submit", "embed", "--text", "hi", "--wait"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{RID}\nrequest  {RID}   DONE") and "minilm v1" in out
    assert [c[1] for c in gateway.calls].count(f"/v1/results/{RID}") == 3


def test_submit_wait_exits_1_when_failed_or_still_pending(gateway: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    gateway.answers[("POST", "/v1/pipelines/embed:submit")] = (202, {"request_id": RID, "duplicate": False})
    gateway.answers[("GET", f"/v1/results/{RID}")] = (200, FAILED)
    assert main(["--gateway", gateway.url, "submit", "embed", "--text", "hi", "--wait", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["error"]["code"] == "INVALID_ARGUMENT"
    gateway.answers[("GET", f"/v1/results/{RID}")] = (200, PENDING)
    argv = ["--gateway", gateway.url, "submit", "embed", "--text", "hi", "--wait", "--wait-timeout", "0.2"]
    assert main(argv) == 1
    assert f"still PENDING after 0.2 s; later: loomctl result {RID}" in capsys.readouterr().err


def test_result_shows_json_or_lines_and_waits_through_a_404(
    gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway.answers[("GET", f"/v1/results/{RID}")] = (200, DONE)
    assert main(["--gateway", gateway.url, "result", RID, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == DONE
    gateway.answers[("GET", f"/v1/results/{RID}")] = (200, PENDING)
    assert main(["--gateway", gateway.url, "result", RID]) == 0  # PENDING without --wait is an answer
    assert "not answered yet" in capsys.readouterr().out
    missing = (404, {"error": {"code": "NOT_FOUND", "message": f"no durable request {RID!r}"}})
    gateway.answers[("GET", f"/v1/results/{RID}")] = missing
    assert main(["--gateway", gateway.url, "result", RID]) == 1
    assert f"HTTP 404 NOT_FOUND: no durable request '{RID}'" in capsys.readouterr().err
    # Published on NATS: no record until the ingress took it.
    gateway.answers[("GET", f"/v1/results/{RID}")] = sequence(missing, (200, PENDING), (200, DONE))
    assert main(["--gateway", gateway.url, "result", RID, "--wait", "10"]) == 0
    assert "DONE" in capsys.readouterr().out


# --- dead letters -------------------------------------------------------------------------------


def test_dlq_list_passes_stage_and_limit_and_prints_a_table(
    gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway.answers[("GET", "/v1/admin/dlq")] = (200, {"dead_letters": LETTERS})
    assert main(["--gateway", gateway.url, "dlq", "list", "--stage", "ingress", "--limit", "5"]) == 0
    assert gateway.calls[0][1] == "/v1/admin/dlq?limit=5&stage=ingress"
    assert "loom.work.infer.minilm" in capsys.readouterr().out
    assert main(["--gateway", gateway.url, "dlq", "list", "--json"]) == 0
    assert gateway.calls[1][1] == "/v1/admin/dlq?limit=100"
    assert json.loads(capsys.readouterr().out) == LETTERS
    gateway.answers[("GET", "/v1/admin/dlq")] = (200, {"dead_letters": []})
    assert main(["--gateway", gateway.url, "dlq", "list", "--stage", "fuse"]) == 0
    assert capsys.readouterr().out == "no dead letters from stage fuse\n"


def test_dlq_replay_sends_each_letter_back_and_reports_the_ones_that_failed(
    gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway.answers[("POST", "/v1/admin/dlq/7:replay")] = (200, LETTERS[0])
    gateway.answers[("POST", "/v1/admin/dlq/12:replay")] = (200, LETTERS[1])
    assert main(["--gateway", gateway.url, "dlq", "replay", "7", "99", "12"]) == 1
    captured = capsys.readouterr()
    assert [c[1] for c in gateway.calls] == [
        "/v1/admin/dlq/7:replay",
        "/v1/admin/dlq/99:replay",
        "/v1/admin/dlq/12:replay",
    ]
    assert captured.out.splitlines()[0] == "7  back to loom.req.embed  (was: undecodable loom.v1.PredictRequest)"
    assert captured.out.splitlines()[1].startswith("12  back to loom.work.infer.minilm")
    assert "loomctl dlq replay: 99: the gateway answered HTTP 404 NOT_FOUND" in captured.err
    assert main(["--gateway", gateway.url, "dlq", "replay", "7", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [LETTERS[0]]
    refused = (403, {"error": {"code": "PERMISSION_DENIED", "message": "it needs the role admin"}})
    gateway.answers[("GET", "/v1/admin/dlq")] = refused
    assert main(["--gateway", gateway.url, "dlq", "list"]) == 1
    assert "roles do not allow" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["dlq"],
        ["dlq", "replay"],
        ["dlq", "replay", "seven"],
        ["dlq", "replay", "0"],
        ["dlq", "list", "--limit", "0"],
        ["result"],
        ["result", RID, "--wait", "0"],
        ["submit"],
        ["submit", "embed", "--text", "hi", "--wait-timeout", "-1"],
        ["submit", "embed", "--text", "hi", "--timeout-ms", "soon"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "usage: loomctl" in capsys.readouterr().err


def test_submit_without_inputs_says_what_to_give(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", "embed"]) == 2
    assert "loomctl submit: error: give at least one input" in capsys.readouterr().err
