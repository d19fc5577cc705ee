from __future__ import annotations

from services.common.settings import CommonSettings, service_field


class InferenceSettings(CommonSettings):
    """Inference settings (``LOOM_INFERENCE_*``)."""

    grpc_port: int = service_field("inference", "grpc_port", 50053, "gRPC port (health).")
    http_port: int = service_field("inference", "http_port", 9103, "HTTP port (/metrics, /healthz, /readyz).")
    triton_url: str = service_field("inference", "triton_url", "127.0.0.1:8001", "Triton gRPC address host:port.")
    models: list[str] = service_field(
        "inference", "models", ["minilm"], "Models served, as a JSON list; each gets loom.infer.<model>."
    )
    reconnect_backoff_ms: int = service_field(
        "inference", "reconnect_backoff_ms", 1000, "Longest wait between reconnects to Triton after it went away."
    )
