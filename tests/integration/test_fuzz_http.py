"""Schemathesis over both OpenAPI documents (gateway, monitor): no client mistake may earn a 5xx.

Every operation of services/gateway/openapi.yaml and services/monitor/openapi.yaml gets a bounded,
derandomized run of schema-driven cases, valid ones (``positive``) and schema-violating ones
(``negative``), sent with the admin key to the session mesh. The check is schemathesis' own
``not_a_server_error``; the counts (operations, cases, status histogram) are printed and written to
``.artifacts/fuzz/http-*.json`` (tests/fuzzlog.py).

The operations that change state (STATEFUL) run on the session mesh too, not on a mesh of their
own: a second mesh (Triton and six services) costs a minute or two of the two cores every other
test shares, and what they could damage is only what they name. So their path parameters name
things nobody has (a model, a pipeline, a dead letter), which the handler must still validate, and a
case whose body would change something real (a real pipeline's feedback, loading drift baselines) is
counted as skipped, not sent.
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
from tests.fuzzlog import record
from tests.support import bearer

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
OPENAPI = ROOT / "services" / "gateway" / "openapi.yaml"
MONITOR_OPENAPI = ROOT / "services" / "monitor" / "openapi.yaml"
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


#: What the stateful operations' path parameters name: nothing that exists (a PUT makes a new pipeline).
SAFE_PATH = {"model": "fuzz-no-such-model", "version": "7", "seq": "999999999", "pipeline": "fuzz-put"}
#: Names no case body may carry when it goes to a stateful operation.
REAL = ("embed", "content", "classify", "minilm")


def _unsafe(op: Any, case: Any) -> bool:
    """Whether ``case`` could change state another test reads (then it is skipped, and counted)."""
    body = case.body if isinstance(case.body, dict) else None
    if body is None:
        return False
    if (op.method.upper(), op.path) == ("POST", "/v1/drift/baseline"):
        # load: replaces the baselines; capture of every pipeline (or a real one): new baselines.
        return body.get("action") == "load" or (
            body.get("action") == "capture" and body.get("pipeline") in (None, *REAL)
        )
    return any(f'"{name}"' in json.dumps(body, default=str) for name in REAL)


def _operations(path: Path = OPENAPI, stateful: bool = False) -> list[Any]:
    schema = schemathesis.openapi.from_path(path)
    ops = []
    for result in schema.get_all_operations():
        if not isinstance(result, Ok):
            raise result.err()  # an operation schemathesis cannot read is a broken document
        ops.append(result.ok())
    return [op for op in ops if ((op.method.upper(), op.path) in STATEFUL) == stateful]


def _fuzz(
    op: Any, mode: GenerationMode, base_url: str, session: requests.Session, seen: Counter[str], safe: bool = False
) -> None:
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
        if safe:
            if _unsafe(op, case):
                seen["skipped (would change state)"] += 1
                return
            case.path_parameters = {k: SAFE_PATH.get(k, v) for k, v in (case.path_parameters or {}).items()}
        response = case.call(base_url=base_url, session=session, headers=auth, timeout=30)
        seen[str(response.status_code)] += 1
        case.validate_response(response, checks=[not_a_server_error], headers=auth)

    run()


def _run(name: str, ops: list[Any], base_url: str, safe: bool = False) -> None:
    started = time.monotonic()
    statuses: Counter[str] = Counter()
    per_op: dict[str, dict[str, int]] = {}
    failures: list[str] = []
    unsatisfiable: list[str] = []
    with requests.Session() as session:
        for op in ops:
            seen: Counter[str] = Counter()
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                # Collect them all: one report names every failing operation.
                try:
                    _fuzz(op, mode, base_url, session, seen, safe)
                except Unsatisfiable:
                    # No parameters and no body (GET /healthz): there is no way to break the schema.
                    unsatisfiable.append(f"{op.method.upper()} {op.path} [{mode.value}]")
                except (Exception, BaseExceptionGroup) as exc:  # schemathesis' FailureGroup is a BaseExceptionGroup
                    failures.append(f"{op.method.upper()} {op.path} [{mode.value}]: {str(exc)[:600]}")
            per_op[f"{op.method.upper()} {op.path}"] = dict(sorted(seen.items()))
            statuses.update(seen)
    report = {
        "operations": len(ops),
        "seconds": round(time.monotonic() - started, 1),
        "no_negative_cases": unsatisfiable,
        "failures": failures,
        "per_operation": per_op,
    }
    record(name, statuses, **report)
    print(
        f"\n{name}: {json.dumps({'statuses': statuses, **{k: v for k, v in report.items() if k != 'per_operation'}})}"
    )
    assert ops and sum(statuses.values()) > len(ops)
    assert not failures, "\n\n".join(failures)
    assert not any(code[0] == "5" for code in statuses)


def test_no_server_errors_for_any_operation(mesh: Mesh) -> None:
    _run("http-gateway", _operations(), mesh.gateway_http)


def test_no_server_errors_for_the_stateful_operations_on_names_nobody_uses(mesh: Mesh) -> None:
    ops = _operations(stateful=True)
    assert len(ops) == len(STATEFUL)
    _run("http-gateway-stateful", ops, mesh.gateway_http, safe=True)


def test_no_server_errors_for_any_monitor_operation(mesh: Mesh) -> None:
    _run("http-monitor", _operations(MONITOR_OPENAPI), mesh.monitor_http, safe=True)
