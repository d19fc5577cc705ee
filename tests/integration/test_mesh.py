"""The whole mesh, end to end: six service processes, nats-server, tritonserver."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as triton

from services.common.launch.mesh import SERVICES, Mesh, grpc_serving
from services.postprocess.labels import l2_normalise
from services.preprocess.text import TextTokenizer
from tests.support import eventually, http_json, metric, predict_grpc, predict_http, read_spans

pytestmark = pytest.mark.integration


def triton_embedding(mesh: Mesh, text: str) -> np.ndarray:
    """The same text straight to Triton, bypassing Loom."""
    tensors, _ = TextTokenizer().encode(text)
    inputs = []
    for name, array in tensors.items():
        inp = triton.InferInput(name, [1, array.shape[0]], "INT64")
        inp.set_data_from_numpy(array[np.newaxis, :])
        inputs.append(inp)
    client = triton.InferenceServerClient(mesh.triton_grpc)
    try:
        result = client.infer("minilm", inputs)
    finally:
        client.close()
    return l2_normalise(result.as_numpy("embedding")[0])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_every_service_reports_serving(mesh: Mesh) -> None:
    for name in SERVICES:
        assert grpc_serving(f"127.0.0.1:{mesh.ports[f'{name}_grpc']}"), name


def test_http_and_grpc_match_triton_directly(mesh: Mesh) -> None:
    text = "The central bank raised interest rates again this quarter."
    expected = triton_embedding(mesh, text)

    status, body = predict_http(mesh.gateway_http, text)
    assert status == 200, body
    out = body["outputs"]["text"]
    assert out["model"] == "minilm" and out["model_version"] == "1"
    assert len(out["embedding"]) == 384
    np.testing.assert_allclose(np.asarray(out["embedding"]), expected, atol=1e-5)
    assert body["degraded"] is False and body["missing"] == []
    assert len(body["trace_id"]) == 32 and body["request_id"]
    assert {"preprocess", "inference", "postprocess", "gateway_total"} <= set(body["timings_ms"])
    assert len(out["labels"]) == 3
    assert out["labels"][0]["label"] == "finance"
    scores = [lb["score"] for lb in out["labels"]]
    assert scores == sorted(scores, reverse=True)

    reply = predict_grpc(mesh.gateway_grpc, text)
    np.testing.assert_allclose(np.asarray(reply.outputs["text"].text.embedding), expected, atol=1e-5)
    assert reply.outputs["text"].text.labels[0].label == "finance"
    assert reply.pipeline == "embed" and len(reply.trace_id) == 32


def test_similar_sentences_score_higher_than_unrelated(mesh: Mesh) -> None:
    def embed(text: str) -> np.ndarray:
        return np.asarray(predict_grpc(mesh.gateway_grpc, text).outputs["text"].text.embedding)

    guitar, plays, market = (
        embed("A man is playing a guitar."),
        embed("Someone plays the guitar."),
        embed("The stock market fell sharply today."),
    )
    assert cosine(guitar, plays) > cosine(guitar, market) + 0.3
    assert abs(np.linalg.norm(guitar) - 1.0) < 1e-4


def test_caller_request_id_is_kept_and_may_be_reused(mesh: Mesh) -> None:
    status, body = predict_http(mesh.gateway_http, "hello there", request_id="my-req_01")
    assert status == 200 and body["request_id"] == "my-req_01"
    # Callers reuse ids (KServe clients send "1"): again, and several at once, all answered.
    with ThreadPoolExecutor(4) as pool:
        again = list(pool.map(lambda i: predict_http(mesh.gateway_http, f"hello {i}", request_id="1"), range(4)))
    assert [(status, body["request_id"]) for status, body in again] == [(200, "1")] * 4


def test_one_request_is_one_trace_across_all_six_processes(mesh: Mesh) -> None:
    status, body = predict_http(mesh.gateway_http, "Tracing one request through the mesh.")
    assert status == 200
    trace_id = body["trace_id"]

    def spans_of_trace() -> list[dict]:
        spans = [s for s in read_spans(mesh.workdir / "traces") if s["trace_id"] == trace_id]
        assert {s["service"] for s in spans} >= set(SERVICES), {s["service"] for s in spans}
        # The monitor's hop: it records the gateway's telemetry for the answer, inside the trace.
        assert any(s["service"] == "monitor" and s["name"] == "monitor record" for s in spans)
        # Exports come in batches per service: wait until no span still waits for its parent.
        ids = {s["span_id"] for s in spans}
        dangling = [s["name"] for s in spans if s["parent_id"] is not None and s["parent_id"] not in ids]
        assert not dangling, f"parents not yet exported for {dangling}"
        return spans

    spans = eventually(spans_of_trace, timeout=15)
    by_id = {s["span_id"]: s for s in spans}
    roots = [s for s in spans if s["parent_id"] is None]
    assert len(roots) == 1 and roots[0]["service"] == "gateway" and roots[0]["kind"] == "SERVER"
    for span in spans:
        if span["parent_id"] is not None:
            assert span["parent_id"] in by_id, f"dangling parent: {span['name']} ({span['service']})"
        if span["kind"] == "CONSUMER":
            parent = by_id[span["parent_id"]]
            assert parent["kind"] == "PRODUCER", span["name"]
            assert (
                parent["attributes"]["messaging.destination.name"] == span["attributes"]["messaging.destination.name"]
            )
            assert span["attributes"]["messaging.system"] == "nats"
    consumers = {(s["service"], s["name"]) for s in spans if s["kind"] == "CONSUMER"}
    assert ("preprocess", "process loom.pre.text") in consumers
    assert ("inference", "process loom.infer.minilm") in consumers
    assert ("postprocess", "process loom.post.embed") in consumers
    assert any(svc == "fusion" and name.startswith("process loom.fuse.") for svc, name in consumers)
    assert ("gateway", "process _INBOX") in consumers
    triton_calls = [s for s in spans if s["kind"] == "CLIENT" and s["name"] == "triton infer minilm"]
    assert len(triton_calls) == 1
    assert by_id[triton_calls[0]["parent_id"]]["name"] == "process loom.infer.minilm"


def test_metrics_move_with_traffic(mesh: Mesh) -> None:
    before = {
        "requests": metric(mesh.gateway_http, "loom_requests_total", pipeline="embed", code="OK", protocol="http"),
        **{name: metric(mesh.http_url(name), "loom_messages_total", service=name, direction="in") for name in SERVICES},
        "monitor_events": metric(mesh.monitor_http, "loom_monitor_events_total", service="inference"),
    }
    for i in range(3):
        assert predict_http(mesh.gateway_http, f"metrics check number {i}")[0] == 200

    def moved() -> bool:
        assert (
            metric(mesh.gateway_http, "loom_requests_total", pipeline="embed", code="OK", protocol="http")
            == before["requests"] + 3
        )
        for name in SERVICES:
            now = metric(mesh.http_url(name), "loom_messages_total", service=name, direction="in")
            assert now >= before[name] + 3, name
        assert (
            metric(mesh.monitor_http, "loom_monitor_events_total", service="inference") >= before["monitor_events"] + 3
        )
        return True

    eventually(moved, timeout=10)
    assert metric(mesh.http_url("inference"), "loom_stage_duration_seconds_count", stage="loom.infer.minilm") >= 3


def test_monitor_serves_per_stage_json(mesh: Mesh) -> None:
    assert predict_http(mesh.gateway_http, "monitor json")[0] == 200

    def has_stages() -> dict:
        status, stats = http_json(f"{mesh.monitor_http}/v1/stats")
        assert status == 200
        stages = {(s["service"], s["stage"]): s for s in stats["stages"]}
        assert ("inference", "loom.infer.minilm") in stages
        assert ("gateway", "gateway") in stages
        return stages

    stages = eventually(has_stages)
    infer = stages[("inference", "loom.infer.minilm")]
    assert infer["count"] >= 1 and infer["p50_ms"] > 0
