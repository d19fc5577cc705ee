from __future__ import annotations

from services.common.settings import CommonSettings, service_field


class MonitorSettings(CommonSettings):
    """Monitor settings (``LOOM_MONITOR_*``)."""

    grpc_port: int = service_field("monitor", "grpc_port", 50056, "gRPC port (health).")
    http_port: int = service_field("monitor", "http_port", 8090, "HTTP port: /v1/stats JSON, /metrics, /healthz.")
    window: int = service_field("monitor", "window", 2048, "Latency samples kept per stage for percentiles.")
