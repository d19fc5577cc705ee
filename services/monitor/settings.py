from __future__ import annotations

from typing import Any

from pydantic import field_validator

from services.common.auth import AuthSettings
from services.common.settings import service_field
from services.monitor.capacity import STAGE_SERVICES


def _f(name: str, default: Any, description: str) -> Any:
    return service_field("monitor", name, default, description)


class MonitorSettings(AuthSettings):
    """Monitor settings (``LOOM_MONITOR_*``)."""

    grpc_port: int = service_field("monitor", "grpc_port", 50056, "gRPC port: health and the OTLP trace receiver.")
    http_port: int = service_field(
        "monitor", "http_port", 8090, "HTTP port: dashboard, JSON API, OTLP/HTTP /v1/traces, /metrics."
    )
    window: int = _f("window", 2048, "Latency samples kept per stage for percentiles.")
    eval_interval_s: float = _f("eval_interval_s", 5.0, "How often signals and alert rules are evaluated.")
    triton_url: str = _f("triton_url", "127.0.0.1:8000", "Triton's HTTP endpoint (readiness, repository index).")
    triton_metrics_url: str = _f(
        "triton_metrics_url", "http://127.0.0.1:8002/metrics", "Triton's Prometheus endpoint, re-exposed here."
    )
    triton_grace_s: float = _f(
        "triton_grace_s", 120.0, "After the monitor starts, how long Triton may take to come up before P1 alerts."
    )
    models: str = _f("models", "minilm,ocr,vad", "Models that must always serve (P1 alert when not READY).")
    telemetry_buffer: int = _f(
        "telemetry_buffer", 10_000, "Telemetry events queued for the monitor; beyond it they are dropped and counted."
    )
    drift_reference: int = _f("drift_reference", 1000, "Values per feature captured as the drift baseline.")
    drift_window: int = _f("drift_window", 1000, "Recent values per feature compared with the baseline (PSI).")
    drift_min_samples: int = _f("drift_min_samples", 100, "Fewest recent values for a PSI.")
    drift_baseline_file: str = _f("drift_baseline_file", "", "Load drift baselines from this JSON file at start.")
    accuracy_window: int = _f("accuracy_window", 200, "Recent feedback per model version for accuracy.")
    accuracy_min_samples: int = _f("accuracy_min_samples", 20, "Fewest feedback samples for an accuracy alert.")
    accuracy_bucket_s: float = _f(
        "accuracy_bucket_s", 10.0, "Width of one point of the accuracy, precision and recall series over time."
    )
    feedback_buffer: int = _f(
        "feedback_buffer", 10_000, "Feedback messages queued for the monitor; beyond it they are dropped and counted."
    )
    answers: int = _f("answers", 50_000, "Answers remembered for joining feedback by request_id.")
    traces_max: int = _f("traces_max", 2000, "Traces kept (least recently updated evicted first).")
    spans_max: int = _f("spans_max", 100_000, "Spans kept over all traces.")
    spans_per_trace: int = _f("spans_per_trace", 512, "Spans kept per trace.")
    slo_short_s: int = _f("slo_short_s", 300, "Short burn-rate window.")
    slo_long_s: int = _f("slo_long_s", 3600, "Long burn-rate window.")
    latency_p1_ms: float = _f("latency_p1_ms", 3000.0, "P1 when a pipeline's p95 over 60 s exceeds this.")
    drift_alert: float = _f("drift_alert", 0.2, "P2 when a feature's PSI exceeds this.")
    accuracy_drop_points: float = _f("accuracy_drop_points", 5.0, "P2 when accuracy drops more points than this.")
    accuracy_drop_p1_points: float = _f(
        "accuracy_drop_p1_points", 10.0, "P1 (same alert, LoomAccuracyDrop) when accuracy drops more points than this."
    )
    burn_rate: float = _f("burn_rate", 14.4, "Warning when both burn-rate windows exceed this.")
    saturation: float = _f("saturation", 0.8, "Warning when CPU/GPU utilisation stays above this for 5 min.")
    alert_webhook_url: str = _f(
        "alert_webhook_url",
        "",
        "POST fired/resolved alerts here (Alertmanager webhook format; a URL ending in "
        "/api/v2/alerts gets Alertmanager's API format).",
    )
    webhook_pending: int = _f(
        "webhook_pending", 16, "Alert webhook POSTs in flight at once; beyond it new ones are dropped and counted."
    )
    rollout_enabled: bool = _f(
        "rollout_enabled", True, "Run the rollout controller: judge running rollouts, advance, promote, roll back."
    )
    rollback_alert_hold_s: float = _f(
        "rollback_alert_hold_s", 900.0, "How long LoomRolloutRolledBack fires after an automatic rollback."
    )
    rollout_min_output_samples: int = _f(
        "rollout_min_output_samples", 200, "Output scores per version before a rollout's output PSI counts."
    )
    version_samples: int = _f(
        "version_samples", 2000, "Output scores and shadow agreements kept per model version (and feature)."
    )
    memory_limit_mb: int = _f(
        "memory_limit_mb", 512, "The memory the monitor is sized for with the buffer limits above (documented bound)."
    )
    capacity_window_s: float = _f(
        "capacity_window_s", 60.0, "Window of the arrival rate and service time behind loom_desired_replicas."
    )
    capacity_concurrency: dict[str, float] = _f(
        "capacity_concurrency",
        {},
        'Items one replica of a stage handles at once, a JSON map such as {"inference": 8}; stages not named keep '
        "their defaults (gateway 64, preprocess 2, inference 4, postprocess 1, fusion 16).",
    )
    capacity_target_utilization: float = _f(
        "capacity_target_utilization", 0.7, "Share of that concurrency loom_desired_replicas plans to use, in (0, 1]."
    )
    capacity_min_replicas: int = _f("capacity_min_replicas", 1, "Fewest replicas loom_desired_replicas asks for.")
    capacity_max_replicas: int = _f("capacity_max_replicas", 20, "Most replicas loom_desired_replicas asks for.")

    @field_validator("capacity_concurrency")
    @classmethod
    def _concurrency(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = set(value) - set(STAGE_SERVICES)
        if unknown:
            raise ValueError(f"unknown stage services {sorted(unknown)}; known: {', '.join(STAGE_SERVICES)}")
        if any(not v > 0 for v in value.values()):
            raise ValueError("every concurrency must be > 0")
        return value
