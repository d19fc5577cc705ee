"""The Prometheus metrics every Loom service exports (one process registry)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

MESSAGES = Counter(
    "loom_messages_total", "NATS messages handled, by direction (in/out).", ["service", "subject", "direction"]
)
STAGE_DURATION = Histogram(
    "loom_stage_duration_seconds",
    "Time a stage spent on one message.",
    ["service", "stage", "pipeline", "model", "version"],
    buckets=LATENCY_BUCKETS,
)
ERRORS = Counter("loom_errors_total", "Errors raised while handling work, by code.", ["service", "code"])
DEADLINE_DROPS = Counter(
    "loom_deadline_drops_total", "Work dropped because its deadline had passed.", ["service", "stage"]
)
SLOW_CONSUMER_DROPS = Counter(
    "loom_nats_slow_consumer_drops_total",
    "Messages the NATS client dropped because a subscription's queue was full.",
    ["service", "subject"],
)
TELEMETRY_DROPPED = Counter(
    "loom_telemetry_dropped_total", "Telemetry events dropped because the send queue was full.", ["service"]
)
INFLIGHT = Gauge("loom_inflight", "Messages or requests being handled now.", ["service"])
READY = Gauge("loom_ready", "1 when the service is ready to take work.", ["service"])

# Gateway.
REQUESTS = Counter("loom_requests_total", "Requests answered by the gateway.", ["pipeline", "code", "protocol"])
REQUEST_DURATION = Histogram(
    "loom_request_duration_seconds",
    "End-to-end latency seen by the gateway.",
    ["pipeline", "protocol"],
    buckets=LATENCY_BUCKETS,
)
AUTH_FAILURES = Counter(
    "loom_auth_failures_total",
    "Calls the gateway refused (UNAUTHENTICATED, PERMISSION_DENIED), by reason; every one, audited or not.",
    ["reason"],
)
AUTH_AUDIT_SUPPRESSED = Counter(
    "loom_auth_audit_suppressed_total",
    "Refused calls not written to the audit log because their source, or all sources together, hit the rate limit.",
)

# Durable lane.
DURABLE = Counter(
    "loom_durable_messages_total",
    "Durable-lane messages handled, by outcome: accepted, forwarded, retried, rejected, answered, duplicate.",
    ["service", "stage", "outcome"],
)
DEAD_LETTERS = Counter(
    "loom_dead_letters_total", "Messages moved to the LOOM_DLQ stream, by stage.", ["service", "stage"]
)

# Faults: retries of idempotent steps (services/common/retry.py).
RETRIES = Counter(
    "loom_retries",
    "Retries of idempotent steps after a transient failure (Triton inference, NATS requests met by no responders).",
    ["service", "step"],
)

# Gateway admission control (services/gateway/admission.py); its calls in flight: loom_inflight{service="gateway"}.
ADMISSION_REJECTED = Counter(
    "loom_admission_rejected",
    "Calls the gateway refused with RESOURCE_EXHAUSTED (HTTP 429): at its in-flight limit (inflight, admin_inflight) "
    "or the tenant over its rate (rate).",
    ["reason", "tenant"],
)
