from __future__ import annotations

from services.common.settings import CommonSettings, service_field


class GatewaySettings(CommonSettings):
    """Gateway settings (``LOOM_GATEWAY_*``)."""

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
