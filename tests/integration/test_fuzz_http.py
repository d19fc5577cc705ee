"""Schemathesis over the gateway's OpenAPI document: no client mistake may earn a 5xx.

Every operation of services/gateway/openapi.yaml gets a bounded, derandomized run of schema-driven
cases, valid ones (``positive``) and schema-violating ones (``negative``), sent with the admin key
to the session mesh. The check is schemathesis' own ``not_a_server_error``; the counts
(operations, cases, status histogram) are printed and written to ``fuzz-http.json`` in the test's
temporary folder so a run can be compared with the last one.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok

from services.common.launch.mesh import Mesh
from tests.support import bearer

pytestmark = pytest.mark.integration

OPENAPI = Path(__file__).resolve().parents[2] / "services" / "gateway" / "openapi.yaml"
EXAMPLES = 15  # per operation and generation mode: the whole run stays well under 90 s on 2 cores

# Operations that change state the other tests on the session mesh rely on (model versions,
# traffic, rollouts, the served pipelines, the dead-letter queue): fuzzing them here could register a
# version, shift traffic or replay a letter under another test's feet. test_admin_api.py and
# test_durable.py exercise their validation on purpose-built meshes.
STATEFUL = {
    ("PUT", "/v1/pipelines/{pipeline}"),
    ("POST", "/v1/admin/models/{model}/versions"),
    ("DELETE", "/v1/admin/models/{model}/versions/{version}"),
    ("PUT", "/v1/admin/models/{model}/traffic"),
    ("POST", "/v1/admin/models/{model}/rollout"),
    ("POST", "/v1/admin/models/{model}/rollout:pause"),
    ("POST", "/v1/admin/models/{model}/rollout:resume"),
    ("POST", "/v1/admin/models/{model}/rollout:abort"),
    ("POST", "/v1/admin/models/{model}:promote"),
    ("POST", "/v1/admin/models/{model}:rollback"),
    ("POST", "/v1/admin/dlq/{seq}:replay"),
    # Feedback moves the monitor's accuracy window, which test_monitor*.py read on this mesh.
    ("POST", "/v1/feedback"),
}


def _operations() -> list[Any]:
    schema = schemathesis.openapi.from_path(OPENAPI)
    ops = []
    for result in schema.get_all_operations():
        if not isinstance(result, Ok):
            raise result.err()  # an operation schemathesis cannot read is a broken document
        ops.append(result.ok())
    return [op for op in ops if (op.method.upper(), op.path) not in STATEFUL]


def _fuzz(op: Any, mode: GenerationMode, base_url: str, session: requests.Session, seen: Counter[int]) -> None:
    auth = bearer()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        # Our key replaces whatever Authorization the case made up: an unauthenticated case would only
        # ever test the 401 path.
        # (an x-api-key the case made up is dropped for the same reason).
        headers = {k: v for k, v in (case.headers or {}).items() if k.lower() not in ("x-api-key", "authorization")}
        case.headers = {**headers, **auth}
        response = case.call(base_url=base_url, session=session, headers=auth, timeout=30)
        seen[response.status_code] += 1
        case.validate_response(response, checks=[not_a_server_error], headers=auth)

    run()


def test_no_server_errors_for_any_operation(mesh: Mesh, tmp_path: Path) -> None:
    started = time.monotonic()
    statuses: Counter[int] = Counter()
    per_op: dict[str, dict[str, int]] = {}
    failures: list[str] = []
    unsatisfiable: list[str] = []
    ops = _operations()
    with requests.Session() as session:
        for op in ops:
            seen: Counter[int] = Counter()
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                # Collect them all: one report names every failing operation.
                try:
                    _fuzz(op, mode, mesh.gateway_http, session, seen)
                except Unsatisfiable:
                    # No parameters and no body (GET /healthz): there is no way to break the schema.
                    unsatisfiable.append(f"{op.method.upper()} {op.path} [{mode.value}]")
                except (Exception, BaseExceptionGroup) as exc:  # schemathesis' FailureGroup is a BaseExceptionGroup
                    failures.append(f"{op.method.upper()} {op.path} [{mode.value}]: {str(exc)[:600]}")
            per_op[f"{op.method.upper()} {op.path}"] = {str(k): v for k, v in sorted(seen.items())}
            statuses.update(seen)
    elapsed = time.monotonic() - started
    report = {
        "operations": len(ops),
        "skipped_stateful": len(STATEFUL),
        "cases": sum(statuses.values()),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "per_operation": per_op,
        "seconds": round(elapsed, 1),
        "no_negative_cases": unsatisfiable,
        "failures": failures,
    }
    (tmp_path / "fuzz-http.json").write_text(json.dumps(report, indent=2))
    print(f"\nfuzz-http: {json.dumps({k: v for k, v in report.items() if k != 'per_operation'})}")
    assert not failures, "\n\n".join(failures)
    assert not any(code >= 500 for code in statuses)
