"""Triton's own OpenTelemetry spans join a request's trace at the monitor (OTLP/HTTP JSON).

The mesh leaves Triton's tracing off by default (LOOM_TRITON_TRACES=1 turns it
on; see README). Here a second, single-model Triton traces one request into the
session mesh's monitor.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from services.common.launch.mesh import ROOT, Mesh
from services.common.launch.procs import free_port
from services.common.triton_server import TritonServer
from tests.support import TEST_API_KEY, eventually, http_json

pytestmark = pytest.mark.integration


@pytest.fixture
def traced_triton(mesh: Mesh, tmp_path: Path) -> Iterator[TritonServer]:
    srv = TritonServer(
        ROOT / "deploy" / "triton",
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        workdir=tmp_path / "triton",
        log_file=tmp_path / "triton.log",
        model_control_mode="explicit",
        load_models=["minilm"],
        trace_otlp_url=f"127.0.0.1:{mesh.ports['monitor_http']}/v1/traces",
        trace_service_name="triton",
        trace_api_key=TEST_API_KEY,  # the monitor's span ingest needs credentials
        log_verbose=1,  # one request: cheap, and a failed span export leaves its trace in triton.log
    )
    srv.start()
    try:
        srv.wait_ready(timeout=90)
        yield srv
    finally:
        srv.close()


def test_triton_spans_continue_the_callers_trace(mesh: Mesh, traced_triton: TritonServer) -> None:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    ids = np.array([[101, 2023, 2003, 1037, 3231, 102]], dtype=np.int64)
    inputs = []
    for name, arr in (
        ("input_ids", ids),
        ("attention_mask", np.ones_like(ids)),
        ("token_type_ids", np.zeros_like(ids)),
    ):
        tensor = grpcclient.InferInput(name, list(arr.shape), "INT64")
        tensor.set_data_from_numpy(arr)
        inputs.append(tensor)
    client = grpcclient.InferenceServerClient(traced_triton.grpc_url)
    result = client.infer("minilm", inputs, headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})
    assert result.as_numpy("embedding").shape == (1, 384)

    def joined() -> dict[str, Any]:
        status, trace = http_json(f"{mesh.monitor_http}/v1/traces/{trace_id}")
        assert status == 200, (trace, f"Triton's log: {traced_triton.log_file}")
        names = {s["name"] for s in trace["spans"] if s["service"] == "triton"}
        assert {"InferRequest", "compute"} <= names, names
        return trace

    trace = eventually(joined, timeout=30, interval=0.5)
    spans = {s["span_id"]: s for s in trace["spans"]}
    root = next(s for s in trace["spans"] if s["name"] == "InferRequest")
    # Triton's request span is the child of the caller's span (not exported here, so it is a root).
    assert root["parent_id"] == parent_id and root["depth"] == 0
    compute = next(s for s in trace["spans"] if s["name"] == "compute")
    chain = []
    span = compute
    while span["parent_id"] in spans:
        span = spans[span["parent_id"]]
        chain.append(span["name"])
    assert chain[-1] == "InferRequest"
