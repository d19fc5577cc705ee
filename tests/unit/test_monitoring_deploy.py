"""deploy/monitoring: the Prometheus config and rules pass promtool, the dashboard and the collector
config use only the metrics and endpoints Loom really has."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
RULES = MONITORING / "rules" / "loom-alerts.yml"
RULE_TESTS = MONITORING / "rules" / "loom-alerts.test.yml"
PROMETHEUS = MONITORING / "prometheus.yml"
DASHBOARD = MONITORING / "grafana" / "loom-dashboard.json"
COLLECTOR = MONITORING / "otel-collector.yaml"

# The alerts the monitor raises itself (the contract); deploy/ must define the same names and severities.
CONTRACT_ALERTS = {
    "LoomModelUnavailable": "P1",
    "LoomHighLatency": "P1",
    "LoomDriftHigh": "P2",
    "LoomAccuracyDrop": "P2",
    "LoomSLOBurn": "warning",
    "LoomResourceSaturation": "warning",
    "LoomMonitorDropping": "warning",
    "LoomRolloutRolledBack": "P2",
    "LoomDeadLetters": "P2",
}
# Alerts only deploy/ defines (the monitor does not raise them): they read the services' own metrics.
DEPLOY_ALERTS = {"LoomBreakerOpen": "warning", "LoomAuditStreamFilling": "warning"}
ALERTS = {**CONTRACT_ALERTS, **DEPLOY_ALERTS}

# Every metric name Loom, its monitor and Triton export (the contract's list), plus Prometheus' own.
_HISTOGRAMS = ("loom_stage_duration_seconds", "loom_request_duration_seconds", "loom_inference_batch_size")
KNOWN_METRICS = {
    "loom_drift_psi",
    "loom_accuracy",
    "loom_precision",
    "loom_recall",
    "loom_accuracy_drop_points",
    "loom_feedback_total",
    "loom_slo_burn_rate",
    "loom_pipeline_latency_seconds",
    "loom_model_ready",
    "loom_triton_up",
    "loom_alerts_active",
    "loom_alert_transitions_total",
    "loom_monitor_dropped_total",
    "loom_audit_stream_fill_ratio",
    "loom_audit_skipped_total",
    "loom_monitor_buffer_items",
    "loom_monitor_buffer_limit",
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_cpu_utilization",
    "nv_cpu_memory_used_bytes",
    "nv_gpu_utilization",
    "nv_gpu_memory_used_bytes",
    "loom_messages_total",
    "loom_errors_total",
    "loom_deadline_drops_total",
    "loom_inflight",
    "loom_ready",
    "loom_requests_total",
    "loom_inference_cache_requests_total",
    "loom_telemetry_dropped_total",
    "loom_subscription_pending",
    "loom_nats_slow_consumer_drops_total",
    "loom_rollout_decisions_total",
    "loom_rollout_step",
    "loom_route_total",
    "loom_shadow_total",
    "loom_dlq_messages",
    "loom_breaker_state",
    "loom_breaker_transitions_total",
    "loom_retries_total",
    "ALERTS",
    "up",
} | {f"{name}{suffix}" for name in _HISTOGRAMS for suffix in ("_bucket", "_count", "_sum")}

_PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
_PROMQL_KEYWORDS |= {"group_left", "group_right", "inf", "nan"}
# A number or duration (0.95, 1e3, 5m) or an identifier, with whether a "(" follows (a function call).
_TOKEN = re.compile(r"\d+(?:\.\d+)?(?:[eE][+-]?\d+)?[a-z]*|[A-Za-z_:][A-Za-z0-9_:]*(?=\s*(\(?))")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, labels, keywords or numbers)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in _TOKEN.finditer(text):
        token = match.group(0)
        if token[0].isdigit() or match.group(1) == "(" or token.lower() in _PROMQL_KEYWORDS:
            continue
        names.add(token)
    return names


def test_metric_name_parser() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (pipeline, le) (rate(loom_request_duration_seconds_bucket{le="0.5",'
        'pipeline=~"$pipeline"}[$__rate_interval]))) > 3 and on (pipeline) up{job="x"} == 0 or vector(1e3)'
    )
    assert metric_names(expr) == {"loom_request_duration_seconds_bucket", "up"}
    assert metric_names("a / ignoring (version) group_left sum by (model) (b) unless c offset 5m") == {"a", "b", "c"}


def promtool(*args: str, cwd: Path = ROOT) -> str:
    """Runs promtool and returns its output; fails the test (never skips) when promtool is missing."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: run `make debs` (tools/debian_deps.sh installs the prometheus package)")
    done = subprocess.run([path, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(RULES)["groups"] for rule in group["rules"] if "alert" in rule]


def dashboard_panels() -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return [p for p in panels if p["type"] != "row"]


# ------------------------------------------------------------------------------------------ rules


def test_rules_pass_promtool_check() -> None:
    assert "SUCCESS" in promtool("check", "rules", str(RULES.relative_to(ROOT)))


def test_rules_pass_their_promtool_unit_tests() -> None:
    assert "SUCCESS" in promtool("test", "rules", str(RULE_TESTS.relative_to(ROOT)))


def test_every_contract_alert_exists_with_its_severity() -> None:
    severities: dict[str, set[str]] = {}
    for rule in alert_rules():
        severities.setdefault(rule["alert"], set()).add(rule["labels"]["severity"])
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
    expected = {name: {severity} for name, severity in ALERTS.items()}
    expected["LoomAccuracyDrop"] = {"P2", "P1"}  # one alert, severity by size: > 5 points P2, > 10 points P1
    assert severities == expected


def test_saturation_alert_names_its_resource() -> None:
    resources = {r["labels"]["resource"] for r in alert_rules() if r["alert"] == "LoomResourceSaturation"}
    assert resources == {"cpu", "gpu"}


def test_rules_use_only_known_metrics() -> None:
    rules = [rule for group in load_yaml(RULES)["groups"] for rule in group["rules"]]
    recorded = {rule["record"] for rule in rules if "record" in rule}
    for rule in rules:
        unknown = metric_names(rule["expr"]) - KNOWN_METRICS - recorded
        assert not unknown, f"{rule.get('alert') or rule.get('record')} uses unknown metrics {unknown}"


def test_each_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in load_yaml(RULE_TESTS)["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert fired == set(ALERTS), f"no firing case for {set(ALERTS) - fired}"
    assert quiet == set(ALERTS), f"no quiet case for {set(ALERTS) - quiet}"


# ------------------------------------------------------------------------------------- prometheus


def test_prometheus_config_passes_promtool_check(tmp_path: Path) -> None:
    # promtool checks that the scrape key file exists: a copy of the folder, with a stand-in for make run's key.
    shutil.copytree(MONITORING, tmp_path / MONITORING.relative_to(ROOT))
    (tmp_path / ".loom").mkdir()
    (tmp_path / ".loom" / "dev-api-key").write_text("loom_stand-in-key\n")
    output = promtool("check", "config", str(PROMETHEUS.relative_to(ROOT)), cwd=tmp_path)
    assert "1 rule files found" in output


def test_prometheus_scrapes_the_six_services_and_triton() -> None:
    config = load_yaml(PROMETHEUS)
    targets = {
        job["job_name"]: [t for static in job["static_configs"] for t in static["targets"]]
        for job in config["scrape_configs"]
    }
    assert targets == {
        "gateway": ["localhost:8080"],
        "preprocess": ["localhost:9102"],
        "inference": ["localhost:9103"],
        "postprocess": ["localhost:9104"],
        "fusion": ["localhost:9105"],
        "monitor": ["localhost:8090"],
        "triton": ["localhost:8002"],
    }
    assert config["rule_files"] == ["rules/loom-alerts.yml"]
    keys = {job["job_name"]: job.get("authorization", {}).get("credentials_file") for job in config["scrape_configs"]}
    assert keys == {**dict.fromkeys(set(targets) - {"triton"}, "../../.loom/dev-api-key"), "triton": None}
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["localhost:9093"]


def test_kubernetes_example_is_a_valid_config(tmp_path: Path) -> None:
    lines = PROMETHEUS.read_text().splitlines()
    begin, end = lines.index("  # BEGIN kubernetes example"), lines.index("  # END kubernetes example")
    example = "\n".join(line.replace("  # ", "  ", 1) for line in lines[begin + 1 : end])
    job = yaml.safe_load(example)[0]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    assert "job" in {relabel.get("target_label") for relabel in job["relabel_configs"]}
    # Debian's promtool is built without Kubernetes discovery, so check the relabelling on a static job.
    del job["kubernetes_sd_configs"]
    (tmp_path / "viewer-key").write_text("loom_stand-in-key\n")
    job["authorization"]["credentials_file"] = str(tmp_path / "viewer-key")  # promtool checks that it exists
    job["static_configs"] = [{"targets": ["10.0.0.1:8080"]}]
    config = load_yaml(PROMETHEUS)
    config["scrape_configs"] = [job]
    (tmp_path / "rules").mkdir()
    shutil.copy(RULES, tmp_path / "rules" / RULES.name)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    promtool("check", "config", "prometheus.yml", cwd=tmp_path)


# -------------------------------------------------------------------------------------- dashboard


def test_dashboard_uses_a_templated_datasource_and_a_pipeline_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["pipeline"]["type"] == "query"
    assert "loom_requests_total" in variables["pipeline"]["query"]
    assert 36 <= dashboard["schemaVersion"] <= 41


def test_every_dashboard_panel_queries_known_metrics() -> None:
    used: set[str] = set()
    panels = dashboard_panels()
    assert len(panels) >= 15
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            names = metric_names(target["expr"])
            assert names, f"{panel['title']}: no metric in {target['expr']}"
            assert names <= KNOWN_METRICS, f"{panel['title']}: unknown metrics {names - KNOWN_METRICS}"
            used |= names
    wanted = {"loom_drift_psi", "loom_accuracy", "loom_precision", "loom_recall", "loom_requests_total"}
    wanted |= {"loom_request_duration_seconds_bucket", "loom_stage_duration_seconds_bucket"}
    wanted |= {"nv_inference_request_success"}
    wanted |= {"nv_inference_queue_duration_us", "loom_model_ready", "nv_gpu_utilization", "nv_cpu_utilization"}
    wanted |= {"nv_gpu_memory_used_bytes", "loom_monitor_dropped_total", "loom_monitor_buffer_items", "ALERTS"}
    assert wanted <= used, f"dashboard lacks {wanted - used}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    exprs = [t["expr"] for p in dashboard_panels() for t in p["targets"]]
    grafana = {"$__rate_interval": "1m", "$pipeline": ".*"}
    rules = []
    for i, expr in enumerate(exprs):
        for variable, value in grafana.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert f"SUCCESS: {len(exprs)} rules found" in promtool("check", "rules", str(path))


def test_drift_panel_colours_the_psi_bands() -> None:
    drift = [p for p in dashboard_panels() if any("loom_drift_psi" in t["expr"] for t in p["targets"])]
    assert drift
    for panel in drift:
        steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
        assert [s["value"] for s in steps] == [None, 0.1, 0.2], panel["title"]
        assert len({s["color"] for s in steps}) == 3, panel["title"]


def test_pipeline_variable_filters_pipeline_panels() -> None:
    for panel in dashboard_panels():
        for target in panel["targets"]:
            expr = target["expr"]
            if "loom_requests_total" in expr or "loom_request_duration_seconds" in expr or "loom_drift_psi" in expr:
                assert 'pipeline=~"$pipeline"' in expr, f"{panel['title']}: {expr}"


# ------------------------------------------------------------------------------------ otel collector


def test_collector_fans_traces_out_to_jaeger_and_the_monitor() -> None:
    config = load_yaml(COLLECTOR)
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"].endswith(":4317")
    assert protocols["http"]["endpoint"].endswith(":4318")
    traces = config["service"]["pipelines"]["traces"]
    assert traces["receivers"] == ["otlp"]
    assert traces["processors"][0] == "memory_limiter", "memory_limiter must come first"
    assert "batch" in traces["processors"]
    endpoints = {name: config["exporters"][name]["endpoint"] for name in traces["exporters"]}
    assert "monitor:50056" in endpoints.values(), endpoints
    assert "jaeger:4317" in endpoints.values(), endpoints
    # The monitor's span ingest needs a key with the role predict.
    assert config["exporters"]["otlp/loom-monitor"]["headers"] == {"x-api-key": "${env:LOOM_SPAN_KEY}"}
    for name in traces["exporters"]:
        assert config["exporters"][name]["tls"]["insecure"] is True
    for kind in ("receivers", "processors", "exporters"):
        assert set(traces[kind]) <= set(config[kind]), f"undefined {kind}"
