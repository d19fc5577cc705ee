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

#: Messages a stage's subscription holds waiting, unless LOOM_STAGE_QUEUE says otherwise.
STAGE_QUEUE = 2048


def service_field(service: str, name: str, default: Any, description: str) -> Any:
    """A field read from ``LOOM_<SERVICE>_<NAME>``."""
    env = f"LOOM_{service.upper()}_{name.upper()}"
    return Field(default=default, validation_alias=AliasChoices(env), description=description)


class CommonSettings(BaseSettings):
    """Settings shared by all six services."""

    model_config = SettingsConfigDict(env_prefix="LOOM_", extra="ignore", populate_by_name=True)

    nats_url: str = Field("nats://127.0.0.1:4222", description="NATS server URL(s), comma separated.")
    nats_user: str = Field(
        "",
        description="NATS user this service logs in as (deploy/nats/loom.conf has one per service, allowed only "
        "its own subjects). Empty: no user (or the user:password of LOOM_NATS_URL).",
    )
    nats_password: str = Field("", repr=False, description="Password of LOOM_NATS_USER.")
    nats_creds: str = Field(
        "", description="NATS credentials file (user JWT and NKey seed) instead of a user and password."
    )
    nats_tls_ca: str = Field(
        "",
        description="PEM CA bundle to verify the NATS server's certificate against; setting it (or "
        "LOOM_NATS_TLS_CERT) turns TLS on. Empty: plaintext, or the system's roots for tls:// URLs.",
    )
    nats_tls_cert: str = Field(
        "", description="PEM client certificate for NATS servers that verify clients (with LOOM_NATS_TLS_KEY)."
    )
    nats_tls_key: str = Field("", repr=False, description="PEM private key of LOOM_NATS_TLS_CERT.")
    nats_ping_interval_s: float = Field(
        5.0,
        gt=0,
        description="Seconds between client PINGs to the NATS server; after LOOM_NATS_MAX_OUTSTANDING_PINGS "
        "unanswered the client reconnects to another node (a silently partitioned node is left within about 15 s).",
    )
    nats_max_outstanding_pings: int = Field(
        3, ge=1, description="Unanswered PINGs before the NATS connection counts as dead and reconnects."
    )
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

    js_replicas: int = Field(
        1, ge=1, le=5, description="Replicas of the JetStream streams and buckets Loom makes (3 on a NATS cluster)."
    )
    durable: bool = Field(True, description="Also take durable-lane work (JetStream loom.work.*) besides core NATS.")
    durable_max_deliver: int = Field(
        8, ge=1, description="Tries of one durable message before it goes to the dead-letter stream LOOM_DLQ."
    )
    durable_backoff_s: float = Field(
        1.0, gt=0, description="First pause before a durable message that failed transiently is tried again."
    )
    durable_backoff_max_s: float = Field(
        30.0, gt=0, description="Longest pause between tries (full jitter: a random pause up to 1, 2, 4, ... s)."
    )
    durable_ack_wait_s: float = Field(
        10.0,
        gt=0,
        description="A durable message whose replica stops reporting progress (it crashed) is delivered again "
        "after this long; live work reports progress every third of it.",
    )
    durable_attempt_s: float = Field(
        60.0, gt=0, description="Longest one try of a durable message may take, queueing included (a hung call)."
    )
    durable_concurrency: int = Field(64, ge=1, description="Durable messages one stage handles at once.")
    results_ttl_s: float = Field(86_400.0, gt=0, description="How long durable results stay readable (GetResult).")

    # Each service overrides these two with LOOM_<SERVICE>_GRPC_PORT / _HTTP_PORT.
    grpc_port: int = Field(0, description="gRPC port (health and the service's API).")
    http_port: int = Field(0, description="HTTP port (/metrics, /healthz, /readyz).")

    stage_queue: int = Field(
        STAGE_QUEUE,
        ge=0,
        description="Messages a stage's subscription (preprocess, inference, postprocess, fusion) may hold waiting "
        "(and 4 KiB per message in bytes); beyond it the NATS client drops them, counted in "
        "loom_nats_slow_consumer_drops_total, rather than grow memory. 0: the client's default (512k, 128 MiB).",
    )
