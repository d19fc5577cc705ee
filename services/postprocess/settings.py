from __future__ import annotations

from services.common.auth import AuthSettings
from services.common.settings import service_field

DEFAULT_LABELS = {
    "sports": "sports, athletes, games, matches and tournaments",
    "technology": "technology, computers, software, the internet and gadgets",
    "finance": "finance, money, markets, stocks, banks and the economy",
    "politics": "politics, government, elections, laws and diplomacy",
    "health": "health, medicine, doctors, illness and fitness",
    "science": "science, research, physics, biology and space",
    "food": "food, cooking, recipes, restaurants and eating",
    "travel": "travel, holidays, flights, hotels and tourism",
    "music": "music, songs, concerts, instruments and bands",
    "weather": "weather, rain, storms, temperature and climate",
}


class PostprocessSettings(AuthSettings):
    """Postprocess settings (``LOOM_POSTPROCESS_*``)."""

    grpc_port: int = service_field("postprocess", "grpc_port", 50054, "gRPC port (health).")
    http_port: int = service_field("postprocess", "http_port", 9104, "HTTP port (/metrics, /healthz, /readyz).")
    labels: dict[str, str] = service_field(
        "postprocess",
        "labels",
        DEFAULT_LABELS,
        "Zero-shot label set as a JSON object {label: description}; descriptions are embedded at start.",
    )
    top_k: int = service_field("postprocess", "top_k", 3, "Labels returned per answer.")
    text_model: str = service_field("postprocess", "text_model", "minilm", "Model used to embed label descriptions.")
    ocr_min_score: float = service_field(
        "postprocess", "ocr_min_score", 0.5, "OCR lines recognised with a lower confidence are dropped."
    )
    vad_threshold: float = service_field(
        "postprocess", "vad_threshold", 0.5, "Speech probability at which a speech segment starts."
    )
    startup_timeout_s: float = service_field(
        "postprocess", "startup_timeout_s", 300.0, "How long to keep trying to embed the labels at start."
    )
