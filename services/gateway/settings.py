from __future__ import annotations

from itertools import pairwise
from pathlib import Path

from pydantic import field_validator

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

    @field_validator("rollout_steps")
    @classmethod
    def _steps(cls, steps: list[float]) -> list[float]:
        if not steps or any(not 0 < w <= 100 for w in steps):
            raise ValueError("rollout_steps must be a non-empty list of weights in (0, 100]")
        if any(b <= a for a, b in pairwise(steps)):
            raise ValueError("rollout_steps must be strictly increasing")
        return steps
