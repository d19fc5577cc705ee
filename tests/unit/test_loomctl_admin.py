"""loomctl's lifecycle commands: options into request bodies, tables from records, and the calls they make."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from services.common.registry.schema import ModelRecord
from tools.loomctl import admin, admin_render, common
from tools.loomctl.__main__ import build_parser, main

pytestmark = pytest.mark.unit

SHA_A = "a" * 12 + "0" * 52
SHA_B = "b" * 12 + "1" * 52
SHA_C = "c" * 12 + "2" * 52

ANALYSIS = {
    "at_unix_ms": 1_767_225_660_000,
    "step": 1,
    "verdict": "wait",
    "canary_requests": 120,
    "stable_requests": 980,
    "checks": [
        {"name": "error_rate", "ok": True, "value": 0.004, "threshold": 0.01, "detail": "canary 0.4% vs stable 0.0%"},
        {"name": "latency_p95", "ok": False, "value": 1.9, "threshold": 1.5, "detail": "p95 38 ms vs 20 ms"},
        {"name": "requests", "ok": False, "value": 120, "threshold": 200, "detail": "needs 200"},
    ],
}
ROLLOUT = {
    "id": "3f2a9c0e8b7d",
    "model": "minilm",
    "version": "2",
    "baseline": "1",
    "steps": [{"weight": 10, "min_requests": 200, "window_s": 300}, {"weight": 50}, {"weight": 100}],
    "step": 1,
    "state": "running",
    "started_by": "ops@host",
    "started_at_unix_ms": 1_767_225_600_000,
    "step_started_at_unix_ms": 1_767_225_630_000,
    "analysis": [ANALYSIS],
}
# A record as the gateway serves it (validated by the registry's own schema below).
RECORD: dict[str, Any] = {
    "name": "minilm",
    "versions": {
        "1": {
            "version": "1",
            "semver": "1.0.0",
            "artifacts": {"model.py": SHA_A, "model.onnx": SHA_B},
            "training_data": "sentence-transformers/all-MiniLM-L6-v2 (1B pairs)",
            "metrics": {"stsb_spearman": 0.82},
            "created_by": "export.py",
            "created_at": "2025-01-31T12:00:00Z",
            "source": "/repo/deploy/triton/minilm/1",
        },
        "2": {
            "version": "2",
            "semver": "2.0.0",
            "artifacts": {"model.onnx": SHA_C},
            "notes": "fp32 export",
            "source": "/repo/deploy/triton/minilm/2",
        },
        "3": {"version": "3", "semver": "0.9.0", "state": "retired", "retired_at": "2025-02-01T00:00:00Z"},
    },
    "policy": {"stable": "1", "canary": {"version": "2", "weight": 50}, "shadow": None, "experiment": None},
    "rollout": ROLLOUT,
    "history": [],
    "updated_at_unix_ms": 1_767_225_630_000,
}


def parse(*argv: str) -> Any:
    return build_parser({"USER": "ops"}).parse_args(list(argv))


# --- options into bodies ------------------------------------------------------------------------


def test_record_fixture_is_a_valid_registry_record() -> None:
    ModelRecord.model_validate(RECORD)


def test_traffic_flags_become_a_policy() -> None:
    args = parse("traffic", "set", "minilm", "--canary", "2=10", "--shadow", "3", "--rule", "short:1:max_tokens=16")
    assert admin.traffic_body(args, current_stable="1") == {
        "stable": "1",
        "canary": {"version": "2", "weight": 10.0},
        "shadow": {"version": "3", "percent": 100.0},
        "rules": [{"name": "short", "version": "1", "max_tokens": 16}],
    }
    args = parse(
        "traffic", "set", "minilm", "--stable", "2", "--experiment", "ab", "--arm", "1=30", "--arm", "2=70",
        "--shadow", "3=5", "--rule", "busy:1:min_inflight=8,max_tokens=32",
    )  # fmt: skip
    assert admin.traffic_body(args, current_stable="1") == {
        "stable": "2",
        "shadow": {"version": "3", "percent": 5.0},
        "experiment": {"name": "ab", "arms": {"1": 30.0, "2": 70.0}},
        "rules": [{"name": "busy", "version": "1", "min_inflight": 8, "max_tokens": 32}],
    }


def test_traffic_policy_from_a_file(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("stable: '1'\ncanary: {version: '2', weight: 25}\n")
    assert admin.traffic_body(parse("traffic", "set", "m", "--file", str(policy)), None) == {
        "stable": "1",
        "canary": {"version": "2", "weight": 25},
    }
    with pytest.raises(admin.UsageError, match="give it alone"):
        admin.traffic_body(parse("traffic", "set", "m", "--file", str(policy), "--canary", "2=5"), None)
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(admin.UsageError, match="expected a mapping"):
        admin.traffic_body(parse("traffic", "set", "m", "--file", str(tmp_path / "list.yaml")), None)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "say what to set"),
        (["--canary", "2"], "expected VERSION=WEIGHT"),
        (["--canary", "2=lots"], "'lots' is not a number"),
        (["--arm", "1=50", "--arm", "2=50"], "needs both --experiment"),
        (["--experiment", "ab"], "needs both --experiment"),
        (["--experiment", "ab", "--arm", "1=50", "--canary", "2=5"], "either a canary or an experiment"),
        (["--rule", "short:1"], "NAME:VERSION:max_tokens=N"),
        (["--rule", "short:1:tokens=3"], "max_tokens=N or min_inflight=N"),
        (["--rule", "short:1:max_tokens=many"], "must be a whole number"),
    ],
)
def test_bad_traffic_flags_say_what_is_wrong(argv: list[str], message: str) -> None:
    with pytest.raises(admin.UsageError, match=message):
        admin.traffic_body(parse("traffic", "set", "minilm", *argv), current_stable="1")


def test_rollout_register_and_reason_bodies(tmp_path: Path) -> None:
    assert admin.rollout_body(parse("rollout", "start", "minilm", "2")) == {"version": "2"}
    args = parse("rollout", "start", "minilm", "2", "--steps", "5, 25,100", "--min-requests", "50", "--window", "30")
    assert admin.rollout_body(args) == {
        "version": "2",
        "steps": [{"weight": w, "min_requests": 50, "window_s": 30.0} for w in (5.0, 25.0, 100.0)],
    }
    with pytest.raises(admin.UsageError, match="give --steps too"):
        admin.rollout_body(parse("rollout", "start", "minilm", "2", "--window", "30"))
    with pytest.raises(admin.UsageError, match="not a number"):
        admin.rollout_body(parse("rollout", "start", "minilm", "2", "--steps", "10,half"))
    folder = tmp_path / "7"
    body = admin.register_body(parse("models", "register", "minilm", str(folder), "--version", "2", "--notes", "n"))
    assert body == {"source": str(folder), "version": "2", "notes": "n"}
    assert admin.reason_body(parse("rollback", "minilm", "--reason", "p95 up")) == {"reason": "p95 up"}
    assert admin.reason_body(parse("rollout", "resume", "minilm")) == {}


@pytest.mark.parametrize(
    "argv",
    [
        ["models", "show"],
        ["traffic"],
        ["traffic", "set"],
        ["rollout"],
        ["rollout", "start", "minilm"],
        ["rollout", "start", "minilm", "2", "--min-requests", "0"],
        ["audit", "--limit", "-3"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "usage: loomctl" in capsys.readouterr().err


# --- rendering ----------------------------------------------------------------------------------


def test_models_show_lists_versions_with_short_sha_metadata_policy_and_rollout() -> None:
    lines = admin_render.model_lines(RECORD)
    text = "\n".join(lines)
    header = next(i for i, line in enumerate(lines) if line.startswith("VERSION"))
    assert lines[header].split() == ["VERSION", "SEMVER", "STATE", "ROLE", "ARTIFACT", "SHA256"]
    assert lines[header + 1].split() == ["1", "1.0.0", "active", "stable", "model.onnx", "b" * 12]
    assert lines[header + 2].split() == ["model.py", "a" * 12]  # the version's other artifact, same row group
    assert lines[header + 3].split() == ["2", "2.0.0", "active", "canary", "50%", "model.onnx", "c" * 12]
    assert lines[header + 4].split() == ["3", "0.9.0", "retired", "-", "-", "-"]
    assert SHA_A not in text  # whole digests only with --json
    for part in ("training data", "stsb_spearman=0.82", "fp32 export", "/repo/deploy/triton/minilm/2"):
        assert part in text
    assert "canary        2 at 50%" in text
    assert "rollout 3f2a9c0e8b7d: version 2 over 1, running at step 2/3" in text
    assert "10% -> [50%] -> 100%" in text
    assert "analysis      wait" in text and "120 canary / 980 stable requests" in text
    check = next(line for line in lines if "latency_p95" in line).split()
    assert check[:4] == ["latency_p95", "FAIL", "1.9", "1.5"]
    long = admin_render.metadata_lines("1", {"semver": "1.0.0", "notes": "word " * 60}, width=80)
    assert len(long) > 3 and all(len(line) <= 80 for line in long)
    assert long[1].startswith("  notes         word") and long[2].startswith(" " * 16 + "word")


def test_registry_table_and_policy_roles() -> None:
    lines = admin_render.registry_table([RECORD, {**RECORD, "name": "ocr", "rollout": None, "policy": {"stable": "1"}}])
    assert lines[0].split() == ["MODEL", "STABLE", "ACTIVE", "RETIRED", "TRAFFIC", "ROLLOUT", "UPDATED"]
    assert "minilm  1 (1.0.0)  1,2     3" in lines[1]
    assert "canary 2 at 50%" in lines[1] and "running v2 step 2/3 (50%)" in lines[1]
    assert "all to stable" in lines[2] and "  -  " in lines[2]
    policy = {
        "stable": "1",
        "shadow": {"version": "3", "percent": 10},
        "experiment": {"name": "ab", "arms": {"1": 50, "2": 50}},
        "rules": [{"name": "short", "version": "2", "max_tokens": 16}],
    }
    assert admin_render.roles(policy) == {
        "1": ["stable", "arm ab 50%"],
        "2": ["arm ab 50%", "rule short"],
        "3": ["shadow 10%"],
    }
    assert "  rule          short: max_tokens <= 16 -> 2" in admin_render.policy_lines(policy)


def test_rollout_history_and_audit_tables() -> None:
    finished = {**ROLLOUT, "state": "rolled_back", "reason": "latency_p95 failed", "finished_at_unix_ms": 1}
    lines = admin_render.rollout_lines(finished)
    assert "rolled_back" in lines[0] and "step" not in lines[0] and "[" not in lines[1]
    assert any("reason        latency_p95 failed" in line for line in lines)
    history = admin_render.history_table([finished, {**finished, "id": "newer", "state": "succeeded"}])
    assert [line.split()[0] for line in history] == ["ID", "newer", "3f2a9c0e8b7d"]
    entries = [
        {"seq": 7, "time": "2026-01-01T00:00:00.000Z", "actor": "ops@host", "action": "model.register",
         "target": "minilm/2", "result": "ok", "details": {"semver": "2.0.0", "artifacts": {"model.onnx": SHA_C}}},
        {"seq": 8, "time": "2026-01-01T00:01:00.000Z", "actor": "anonymous", "action": "rollout.start",
         "target": "minilm", "result": "refused", "details": {"error": "version 1 is already stable"}},
    ]  # fmt: skip
    lines = admin_render.audit_table(entries)
    assert lines[0].split() == ["SEQ", "TIME", "ACTOR", "ACTION", "TARGET", "RESULT", "DETAILS"]
    assert lines[1].split()[:6] == ["7", "2026-01-01T00:00:00.000Z", "ops@host", "model.register", "minilm/2", "ok"]
    assert '{"semver":"2.0.0"}' in lines[1] and SHA_C not in lines[1]
    assert lines[2].endswith("refused  version 1 is already stable")


# --- the calls ----------------------------------------------------------------------------------


@dataclass
class Gateway:
    url: str
    answers: dict[tuple[str, str], tuple[int, Any]]
    calls: list[tuple[str, str, Any, dict[str, str]]] = field(default_factory=list)


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    answers: dict[tuple[str, str], tuple[int, Any]] = {}
    calls: list[tuple[str, str, Any, dict[str, str]]] = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            size = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(size) if size else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            calls.append((self.command, self.path, json.loads(raw) if raw else None, headers))
            status, body = answers.get(
                (self.command, self.path.split("?")[0]),
                (404, {"error": {"code": "NOT_FOUND", "message": f"model 'nope' is not registered ({self.path})"}}),
            )
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _answer

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


def test_commands_call_the_admin_api_with_the_credential(
    gateway: Gateway, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOOM_API_KEY", "loom_key-of-alice")
    base = "/v1/admin/models/minilm"
    gateway.answers[("GET", base)] = (200, RECORD)
    gateway.answers[("PUT", f"{base}/traffic")] = (200, RECORD)
    gateway.answers[("POST", f"{base}/rollout:abort")] = (200, {**ROLLOUT, "state": "aborted"})
    gateway.answers[("DELETE", f"{base}/versions/3")] = (200, RECORD)
    g = ["--gateway", gateway.url]
    assert main([*g, "models", "show", "minilm"]) == 0
    assert "rollout 3f2a9c0e8b7d" in capsys.readouterr().out
    assert main([*g, "models", "show", "minilm", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["versions"]["1"]["artifacts"]["model.py"] == SHA_A  # whole digest
    assert main([*g, "traffic", "set", "minilm", "--shadow", "2=20"]) == 0  # stable: read from the record
    assert main([*g, "rollout", "abort", "minilm", "--reason", "p95"]) == 0
    assert main([*g, "models", "retire", "minilm", "3"]) == 0
    calls = [(m, p, b) for m, p, b, _ in gateway.calls]
    assert calls[2:] == [
        ("GET", base, None),
        ("PUT", f"{base}/traffic", {"stable": "1", "shadow": {"version": "2", "percent": 20.0}}),
        ("POST", f"{base}/rollout:abort", {"reason": "p95"}),
        ("DELETE", f"{base}/versions/3", None),
    ]
    assert {h.get("authorization") for *_, h in gateway.calls} == {"Bearer loom_key-of-alice"}
    assert all("x-loom-actor" not in h for *_, h in gateway.calls)  # the gateway names the actor itself


def test_the_credential_comes_from_the_environment_or_make_runs_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".loom").mkdir()
    (tmp_path / ".loom" / "dev-api-key").write_text("loom_from-the-file\n")
    assert common.api_key({"LOOM_API_KEY": "jwt.a.b", "LOOM_DEV_API_KEY": "dev"}, tmp_path) == "jwt.a.b"
    assert common.api_key({"LOOM_DEV_API_KEY": " loom_dev "}, tmp_path) == "loom_dev"
    assert common.api_key({}, tmp_path) == "loom_from-the-file"
    monkeypatch.setattr(common, "ROOT", tmp_path / "elsewhere")
    assert common.api_key({}, tmp_path / "nowhere") == ""


def test_refused_credentials_say_what_to_do(
    gateway: Gateway, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOOM_API_KEY", "loom_wrong")
    gateway.answers[("GET", "/v1/admin/models")] = (
        401,
        {"error": {"code": "UNAUTHENTICATED", "message": "unknown API key"}},
    )
    assert main(["--gateway", gateway.url, "models", "list"]) == 1
    err = capsys.readouterr().err
    assert "HTTP 401 UNAUTHENTICATED: unknown API key" in err and "set LOOM_API_KEY" in err
    message = "'ci' (roles: predict) may not call PUT /v1/admin/models/{model}/traffic: it needs the role admin"
    gateway.answers[("GET", "/v1/admin/models/minilm")] = (
        403,
        {"error": {"code": "PERMISSION_DENIED", "message": message}},
    )
    assert main(["--gateway", gateway.url, "models", "show", "minilm"]) == 1
    err = capsys.readouterr().err
    assert f"HTTP 403 PERMISSION_DENIED: {message}" in err and "roles do not allow" in err


def test_server_refusals_print_the_message_and_exit_1(gateway: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--gateway", gateway.url, "models", "show", "nope"]) == 1
    assert "loomctl models show: the gateway answered HTTP 404 NOT_FOUND: model 'nope'" in capsys.readouterr().err
    gateway.answers[("POST", "/v1/admin/models/minilm/rollout")] = (
        412,
        {"error": {"code": "FAILED_PRECONDITION", "message": "version 1 is already stable for 'minilm'"}},
    )
    assert main(["--gateway", gateway.url, "rollout", "start", "minilm", "1"]) == 1
    err = capsys.readouterr().err
    assert "HTTP 412 FAILED_PRECONDITION: version 1 is already stable for 'minilm'" in err


def test_predict_sends_the_route_key_and_audit_the_query(gateway: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    gateway.answers[("POST", "/v1/pipelines/embed:predict")] = (200, {"request_id": "r", "topics": []})
    gateway.answers[("GET", "/v1/admin/audit")] = (200, {"entries": []})
    assert main(["--gateway", gateway.url, "predict", "embed", "--text", "hi", "--route-key", "user-42", "-q"]) == 0
    assert gateway.calls[0][3].get("x-loom-route-key") == "user-42"
    assert main(["--gateway", gateway.url, "audit", "--model", "minilm", "--limit", "5"]) == 0
    assert gateway.calls[1][1] == "/v1/admin/audit?limit=5&model=minilm"
    assert "no audit entries" in capsys.readouterr().out
