from __future__ import annotations

from services.common.settings import CommonSettings, service_field


class GatewaySettings(CommonSettings):
    """Gateway settings (``LOOM_GATEWAY_*``)."""

    grpc_port: int = service_field("gateway", "grpc_port", 50051, "gRPC port: loom.v1.Gateway and health.")
    http_port: int = service_field("gateway", "http_port", 8080, "HTTP port: /v1 API, /metrics, /healthz.")
    default_timeout_ms: int = service_field(
        "gateway", "default_timeout_ms", 5000, "Deadline when neither the request nor the pipeline sets one."
    )
    max_timeout_ms: int = service_field("gateway", "max_timeout_ms", 60000, "Largest deadline a caller may ask for.")
    max_body_bytes: int = service_field(
        "gateway", "max_body_bytes", 1024 * 1024, "Largest request body (HTTP) or message (gRPC) accepted."
    )
    max_text_chars: int = service_field("gateway", "max_text_chars", 20000, "Longest text input accepted.")
