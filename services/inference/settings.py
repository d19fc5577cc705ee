"""Inference settings (``LOOM_INFERENCE_*``): Triton, micro-batching and the result cache."""

from __future__ import annotations

from services.common.auth import AuthSettings
from services.common.settings import service_field


class InferenceSettings(AuthSettings):
    """Inference settings (``LOOM_INFERENCE_*``)."""

    grpc_port: int = service_field("inference", "grpc_port", 50053, "gRPC port (health).")
    http_port: int = service_field("inference", "http_port", 9103, "HTTP port (/metrics, /healthz, /readyz).")
    triton_url: str = service_field("inference", "triton_url", "127.0.0.1:8001", "Triton gRPC address host:port.")
    models: list[str] = service_field(
        "inference",
        "models",
        ["minilm", "ocr", "vad"],
        "Models served, as a JSON list; each gets loom.infer.<model> and answers on loom.models.*.",
    )
    reconnect_backoff_ms: int = service_field(
        "inference", "reconnect_backoff_ms", 1000, "Longest wait between reconnects to Triton after it went away."
    )
    model_refresh_s: float = service_field(
        "inference",
        "model_refresh_s",
        30.0,
        "How often Triton's max_batch_size and ready version are re-read per model (every second while unknown).",
    )

    # Micro-batching.
    max_batch_size: int = service_field(
        "inference",
        "max_batch_size",
        16,
        "Most parts sent to Triton in one request; a model's own smaller max_batch_size caps it. 1 = no batching.",
    )
    max_batch_delay_ms: float = service_field(
        "inference",
        "max_batch_delay_ms",
        2.0,
        "Longest wait, from a batch's first part, for more parts before the batch goes to Triton.",
    )
    batch_when_busy_only: bool = service_field(
        "inference",
        "batch_when_busy_only",
        True,
        "Send a part at once when no batch of its model is running; wait for company only while one is.",
    )
    pad_models: list[str] = service_field(
        "inference",
        "pad_models",
        ["minilm"],
        "Models whose 1-D inputs of different lengths may share a batch, right-padded with zeros "
        "(harmless where an attention mask marks the padding).",
    )
    unbatched_models: list[str] = service_field(
        "inference",
        "unbatched_models",
        ["ocr"],
        "Models that take one item per request because each item's outputs have their own length "
        "(ocr: one row per line found); never micro-batched here, Triton's dynamic batcher still groups them.",
    )

    # Result cache (a JetStream KV bucket).
    cache_enabled: bool = service_field(
        "inference", "cache_enabled", True, "Answer repeated inputs from the result cache."
    )
    cache_bucket: str = service_field(
        "inference", "cache_bucket", "loom_cache", "JetStream KV bucket of the result cache (created if missing)."
    )
    cache_ttl_s: float = service_field(
        "inference", "cache_ttl_s", 600.0, "How long a cached result lives (the bucket's max age; set at creation)."
    )
    cache_max_value_bytes: int = service_field(
        "inference", "cache_max_value_bytes", 512 * 1024, "Results larger than this are not cached."
    )
    cache_timeout_ms: float = service_field(
        "inference",
        "cache_timeout_ms",
        100.0,
        "Longest wait for a cache lookup; a slower KV counts as an error and the part goes to Triton.",
    )

    # Model lifecycle: the registry, Triton model control and shadow traffic.
    model_repository: str = service_field(
        "inference",
        "model_repository",
        "",
        "Triton's model repository, for logs only: Triton reads it, this service never does.",
    )
    control_timeout_s: float = service_field(
        "inference",
        "control_timeout_s",
        110.0,
        "Longest wait for Triton to load a model's versions (loom.models.control; the admin API waits 120 s).",
    )
    control_hold_s: float = service_field(
        "inference",
        "control_hold_s",
        120.0,
        "After a loom.models.control request, how long its versions stand before the registry's active "
        "versions are enforced again (the admin API loads a version first, then registers it).",
    )
    shadow_max_inflight: int = service_field(
        "inference",
        "shadow_max_inflight",
        256,
        "Most shadow copies in flight at once (they are micro-batched like callers' parts); more are dropped, "
        'counted in loom_shadow_total{result="dropped"}, so a slow shadow version never builds an unbounded queue.',
    )
    shadow_timeout_s: float = service_field(
        "inference",
        "shadow_timeout_s",
        10.0,
        "Longest wait for a shadow version's answer before it counts as an error.",
    )

    # Faults: circuit breakers and retries around Triton (services/inference/breaker.py, services/common/retry.py).
    breaker_enabled: bool = service_field(
        "inference",
        "breaker_enabled",
        True,
        "Put a circuit breaker around each model version's Triton calls (fail fast with UNAVAILABLE while open).",
    )
    breaker_failures: int = service_field(
        "inference",
        "breaker_failures",
        5,
        "Triton calls of one model version failing in a row (unreachable, UNAVAILABLE, not ready, timeout) "
        "that open its breaker; client errors never count.",
    )
    breaker_reset_s: float = service_field(
        "inference",
        "breaker_reset_s",
        10.0,
        "How long an open breaker fails fast before it lets calls through again to probe (half-open).",
    )
    retry_attempts: int = service_field(
        "inference",
        "retry_attempts",
        3,
        "Tries of a Triton inference that fails because Triton is unreachable, the first included (1 = no retry); "
        "never past the earliest deadline of the batch.",
    )
    retry_base_ms: float = service_field(
        "inference",
        "retry_base_ms",
        25.0,
        "Full-jitter backoff between those tries: the n-th pause is drawn from [0, min(max, base * 2^(n-1))).",
    )
    retry_max_ms: float = service_field(
        "inference", "retry_max_ms", 500.0, "The widest range a pause between Triton retries is drawn from."
    )
