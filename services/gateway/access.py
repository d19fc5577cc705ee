"""Who may call what on the gateway: its access table (``services/common/access.py`` enforces it).

The runtime adds the health checks (open) and ``/metrics`` (viewer) to every
service's table; a route or method missing here is admin-only. Refusals under
``/v2`` take KServe's error shape (``{"error": "<message>"}``), so tritonclient
shows the reason.
"""

from __future__ import annotations

from services.common.access import ADMIN, CALLER, OPEN, PREDICT, READ, Access, AccessTable

__all__ = ["ADMIN", "CALLER", "OPEN", "PREDICT", "READ", "TABLE", "grpc_access", "http_access"]

# The dead-letter routes (/v1/admin/dlq, also to read: messages hold callers' inputs) stay admin-only.
HTTP: dict[tuple[str, str], Access] = {
    ("GET", "/openapi.yaml"): CALLER,
    ("GET", "/asyncapi.yaml"): CALLER,
    ("POST", "/v1/pipelines/{pipeline}:predict"): PREDICT,
    ("POST", "/v1/pipelines/{pipeline}:submit"): PREDICT,
    ("GET", "/v1/results/{request_id}"): PREDICT,
    ("GET", "/v1/pipelines"): READ,
    ("GET", "/v1/pipelines/{pipeline}"): READ,
    ("POST", "/v1/feedback"): PREDICT,
    ("GET", "/v1/admin/models"): READ,
    ("GET", "/v1/admin/models/{model}"): READ,
    ("GET", "/v1/admin/models/{model}/rollout"): READ,
    ("GET", "/v1/admin/audit"): READ,
    ("GET", "/v2"): CALLER,
    ("GET", "/v2/health/live"): CALLER,
    ("GET", "/v2/health/ready"): CALLER,
    ("GET", "/v2/models/{model}"): CALLER,
    ("GET", "/v2/models/{model}/versions/{version}"): CALLER,
    ("GET", "/v2/models/{model}/ready"): CALLER,
    ("GET", "/v2/models/{model}/versions/{version}/ready"): CALLER,
    ("POST", "/v2/models/{model}/infer"): PREDICT,
    ("POST", "/v2/models/{model}/versions/{version}/infer"): PREDICT,
    ("POST", "/v2/repository/index"): CALLER,
}

_KSERVE = "/inference.GRPCInferenceService/"
GRPC: dict[str, Access] = {
    "/loom.v1.Gateway/Predict": PREDICT,
    "/loom.v1.Gateway/Submit": PREDICT,
    "/loom.v1.Gateway/GetResult": PREDICT,
    "/loom.v1.Admin/ListModels": READ,
    "/loom.v1.Admin/GetModel": READ,
    "/loom.v1.Admin/GetRollout": READ,
    "/loom.v1.Admin/ListAudit": READ,
    **{_KSERVE + m: CALLER for m in ("ServerLive", "ServerReady", "ServerMetadata", "ModelReady", "ModelMetadata")},
    _KSERVE + "RepositoryIndex": CALLER,
    _KSERVE + "ModelInfer": PREDICT,
}


TABLE = AccessTable(HTTP, GRPC, plain_errors=("/v2",))
#: The table as the gateway serves it, with the runtime's routes (/metrics closed, the default).
SERVED = TABLE.served()


def http_access(method: str, route: str) -> Access:
    """What ``method`` on the route ``route`` (its canonical path, e.g. ``/v2/models/{model}``) needs, as served."""
    return SERVED.http_access(method, route)


def grpc_access(method: str) -> Access:
    """What a gRPC method (``/package.Service/Method``) needs, as served."""
    return SERVED.grpc_access(method)
