from __future__ import annotations

from itertools import pairwise
from pathlib import Path

from limits import parse_many
from pydantic import AliasChoices, Field, field_validator

from services.common.auth import AuthSettings
from services.common.settings import service_field

REPO_ROOT = Path(__file__).resolve().parents[2]


class GatewaySettings(AuthSettings):
    """Gateway settings (``LOOM_GATEWAY_*``, and authentication's ``LOOM_AUTH_*``)."""

    grpc_port: int = service_field(
        "gateway",
        "grpc_port",
        50051,
        "gRPC port: loom.v1.Gateway, inference.GRPCInferenceService (KServe v2) and health.",
    )
    http_port: int = service_field(
        "gateway", "http_port", 8080, "HTTP port: /v1 API, KServe v2 REST under /v2, /metrics, /healthz."
    )
    default_timeout_ms: int = service_field(
        "gateway", "default_timeout_ms", 5000, "Deadline when neither the request nor the pipeline sets one."
    )
    max_timeout_ms: int = service_field("gateway", "max_timeout_ms", 60000, "Largest deadline a caller may ask for.")
    durable_timeout_ms: int = service_field(
        "gateway", "durable_timeout_ms", 600_000, "Deadline of a durable request (Submit) that sets none."
    )
    durable_max_timeout_ms: int = service_field(
        "gateway", "durable_max_timeout_ms", 86_400_000, "Largest deadline a durable request may ask for."
    )
    max_input_bytes: int = service_field(
        "gateway", "max_input_bytes", 20 * 1024 * 1024, "Largest file input (image, audio) accepted, in bytes."
    )
    max_body_bytes: int = service_field(
        "gateway",
        "max_body_bytes",
        28 * 1024 * 1024,
        "Largest request body (HTTP) or message (gRPC) accepted; leaves room for base64 of max_input_bytes.",
    )
    pipelines_dir: str = service_field(
        "gateway",
        "pipelines_dir",
        "",
        "Pipeline specs (*.yaml) stored in KV at start when KV lacks them; default: deploy/pipelines.",
    )
    max_text_chars: int = service_field("gateway", "max_text_chars", 20000, "Longest text input accepted.")
    kserve_models_ttl_s: float = service_field(
        "gateway",
        "kserve_models_ttl_s",
        5.0,
        "KServe v2: how long the inference service's list of served models is reused before it is asked again.",
    )
    # --- the admin API (model registry, traffic, rollouts) ---
    model_repository: str = service_field(
        "gateway",
        "model_repository",
        str(REPO_ROOT / "deploy" / "triton"),
        "Triton's model repository as the gateway sees it: registered versions are copied into it, and at start "
        "every model there with a metadata.yaml but no registry record is registered (its lowest version, stable).",
    )
    control_timeout_s: float = service_field(
        "gateway",
        "control_timeout_s",
        120.0,
        "How long the admin API waits for the inference service to load or unload versions in Triton.",
    )
    rollout_steps: list[float] = service_field(
        "gateway",
        "rollout_steps",
        [10.0, 50.0, 100.0],
        "A rollout's default canary weights in percent (a JSON list, strictly increasing); promoted after the last.",
    )
    rollout_min_requests: int = service_field(
        "gateway", "rollout_min_requests", 200, "Default canary requests a rollout step needs before it may pass."
    )
    rollout_window_s: float = service_field(
        "gateway", "rollout_window_s", 300.0, "Default time a rollout step is observed before it may pass."
    )
    # --- admission control (services/gateway/admission.py) ---
    # Not "max_inflight": CommonSettings has that field (LOOM_MAX_INFLIGHT, per NATS subscription).
    request_max_inflight: int = Field(
        128,
        ge=1,
        validation_alias=AliasChoices("LOOM_GATEWAY_MAX_INFLIGHT"),
        description="Data-plane calls (predict, submit, results, KServe infer and metadata, feedback) in flight at "
        "once; one more is refused at once with RESOURCE_EXHAUSTED (HTTP 429, Retry-After), never queued. 128 on "
        "2 cores: 4x the 32 that saturate embed (~185 req/s), so under 1 s of queue.",
    )
    admin_max_inflight: int = service_field(
        "gateway",
        "admin_max_inflight",
        16,
        "Admin and viewer calls in flight at once: a pool apart from the data plane's, so operators get in "
        "while it is saturated; no rate limit.",
    )
    tenant_rate: str = service_field(
        "gateway",
        "tenant_rate",
        "1000/second",
        "Data-plane calls each tenant may make (per gateway replica), in the notation of the limits library "
        "('200/second', '50/second; 10000/hour'); over it: HTTP 429 / RESOURCE_EXHAUSTED with Retry-After. Empty: "
        "no limit. The default is above what one replica serves here, so it only stops a runaway tenant's floods.",
    )
    tenant_rates: dict[str, str] = service_field(
        "gateway",
        "tenant_rates",
        {},
        'Per-tenant rates overriding tenant_rate, a JSON map: {"acme": "50/second", "batch": ""} (empty: no limit).',
    )

    @field_validator("tenant_rate")
    @classmethod
    def _rate(cls, rate: str) -> str:
        if rate.strip():
            parse_many(rate)  # a rate the limits library cannot read stops the start
        return rate

    @field_validator("tenant_rates")
    @classmethod
    def _rates(cls, rates: dict[str, str]) -> dict[str, str]:
        for tenant, rate in rates.items():
            try:
                if rate.strip():
                    parse_many(rate)
            except ValueError as exc:
                raise ValueError(f"tenant {tenant!r}: {exc}") from None
        return rates

    @field_validator("rollout_steps")
    @classmethod
    def _steps(cls, steps: list[float]) -> list[float]:
        if not steps or any(not 0 < w <= 100 for w in steps):
            raise ValueError("rollout_steps must be a non-empty list of weights in (0, 100]")
        if any(b <= a for a, b in pairwise(steps)):
            raise ValueError("rollout_steps must be strictly increasing")
        return steps
