"""Settings every service shares, read from ``LOOM_*`` environment variables.

Each service subclasses :class:`CommonSettings` with its own fields; its ports
are named ``LOOM_<SERVICE>_GRPC_PORT`` / ``LOOM_<SERVICE>_HTTP_PORT`` so one
environment can describe the whole mesh. Settings are built once, in a
service's ``__main__``, and passed down by constructor.
"""

from __future__ import annotations

from typing import Any

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def service_field(service: str, name: str, default: Any, description: str) -> Any:
    """A field read from ``LOOM_<SERVICE>_<NAME>``."""
    env = f"LOOM_{service.upper()}_{name.upper()}"
    return Field(default=default, validation_alias=AliasChoices(env), description=description)


class CommonSettings(BaseSettings):
    """Settings shared by all six services."""

    model_config = SettingsConfigDict(env_prefix="LOOM_", extra="ignore", populate_by_name=True)

    nats_url: str = Field("nats://127.0.0.1:4222", description="NATS server URL(s), comma separated.")
    bind_host: str = Field("127.0.0.1", description="Address the gRPC and HTTP servers listen on.")
    log_level: str = Field("INFO", description="Python log level.")
    traces_file: str = Field(
        "",
        description="Append finished spans as JSON lines to this file (used by tests; "
        "OTEL_EXPORTER_OTLP_ENDPOINT sends OTLP instead).",
    )
    otlp_endpoint: str = Field(
        "http://127.0.0.1:50056",
        description="OTLP/gRPC endpoint for spans when OTEL_EXPORTER_OTLP_ENDPOINT is not set: the Loom monitor. "
        "Empty: no OTLP export.",
    )
    drain_grace_s: float = Field(10.0, description="On SIGTERM, how long in-flight work may take to finish.")
    max_inflight: int = Field(256, description="Messages one subscription handles concurrently.")
    telemetry_queue: int = Field(
        10_000, description="Telemetry events waiting to be sent; beyond it they are dropped and counted."
    )
    fusion_partitions: int = Field(
        4, description="Number of fusion partitions (loom.fuse.<n>); the same value on every service."
    )
    replica_id: str = Field("", description="Distinguishes replicas of one service in logs and spans.")
    pipelines_bucket: str = Field("loom_pipelines", description="JetStream KV bucket holding the pipeline specs.")
    models_bucket: str = Field(
        "loom_models", description="JetStream KV bucket of the model registry (versions, traffic policy, rollouts)."
    )
    blob_bucket: str = Field("loom_blobs", description="JetStream object store for claim-checked inputs and tensors.")
    blob_ttl_s: float = Field(600.0, description="Unfetched claim-checked blobs are removed after this long.")
    claim_check_bytes: int = Field(
        0, description="Messages above this size park their large fields in the object store; 0: max_payload - 64 KiB."
    )

    # Each service overrides these two with LOOM_<SERVICE>_GRPC_PORT / _HTTP_PORT.
    grpc_port: int = Field(0, description="gRPC port (health and the service's API).")
    http_port: int = Field(0, description="HTTP port (/metrics, /healthz, /readyz).")
