from __future__ import annotations

from services.common.auth import AuthSettings
from services.common.settings import service_field


class FusionSettings(AuthSettings):
    """Fusion settings (``LOOM_FUSION_*``).

    Parts of one request meet on one partition subject ``loom.fuse.<n>``;
    replica ``i`` of ``count`` owns the partitions ``n`` with ``n % count == i``.
    """

    grpc_port: int = service_field("fusion", "grpc_port", 50055, "gRPC port (health).")
    http_port: int = service_field("fusion", "http_port", 9105, "HTTP port (/metrics, /healthz, /readyz).")
    replica_index: int = service_field("fusion", "replica_index", 0, "This replica's index (0-based).")
    replica_count: int = service_field("fusion", "replica_count", 1, "Number of fusion replicas.")
    deadline_margin_ms: int = service_field(
        "fusion", "deadline_margin_ms", 50, "Answer this long before the deadline with what has arrived."
    )
    remember_s: float = service_field(
        "fusion", "remember_s", 30.0, "How long answered requests are remembered, to drop late duplicates."
    )

    def owned_partitions(self) -> list[int]:
        return [p for p in range(self.fusion_partitions) if p % self.replica_count == self.replica_index]
