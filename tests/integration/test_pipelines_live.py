"""Pipeline specs change at run time, and fusion scales out without changing answers."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import yaml

from services.common.launch.mesh import Mesh
from tests import media
from tests.support import http_json, metric, predict_http, predict_inputs

pytestmark = pytest.mark.integration


def put_spec(mesh: Mesh, name: str, spec: Any) -> tuple[int, Any]:
    return http_json(f"{mesh.gateway_http}/v1/pipelines/{name}", raw=yaml.safe_dump(spec).encode(), method="PUT")


def test_a_spec_changed_in_kv_applies_to_the_next_request_and_a_bad_one_is_refused(mesh: Mesh) -> None:
    status, original = http_json(f"{mesh.gateway_http}/v1/pipelines/embed")
    assert status == 200 and original["fusion"]["strategy"] == "attach"
    assert predict_http(mesh.gateway_http, "a football match")[1]["topics"] == []
    changed = copy.deepcopy(original)
    changed["fusion"] = {"strategy": "weighted", "top_k": 2}
    try:
        status, body = put_spec(mesh, "embed", changed)
        assert status == 200 and body["revision"] > 0, body
        # Fusion (another process) follows the KV watch: the very next answer is fused.
        status, answer = predict_http(mesh.gateway_http, "a football match")
        assert status == 200 and len(answer["topics"]) == 2 and answer["topics"][0]["label"] == "sports", answer

        broken = copy.deepcopy(original)
        broken["inputs"]["text"]["stages"] = ["pre.text", "loom.infer.minilm"]
        status, body = put_spec(mesh, "embed", broken)
        assert status == 400 and "not of the form" in body["error"]["message"], body
        # The old (changed) spec keeps serving.
        assert len(predict_http(mesh.gateway_http, "a football match")[1]["topics"]) == 2

        # A new pipeline is served as soon as it is stored.
        shout = {
            "name": "shout",
            "inputs": {"words": {"modality": "text", "stages": ["pre.text", "infer.minilm", "post.embed"]}},
        }
        assert put_spec(mesh, "shout", shout)[0] == 200
        status, answer = http_json(
            f"{mesh.gateway_http}/v1/pipelines/shout:predict", {"inputs": {"words": "hello there"}}
        )
        assert status == 200 and answer["outputs"]["words"]["labels"], answer
    finally:
        assert put_spec(mesh, "embed", original)[0] == 200
    assert predict_http(mesh.gateway_http, "a football match")[1]["topics"] == []


def comparable(body: dict[str, Any]) -> dict[str, Any]:
    """What must not depend on where fusion ran: outputs, topics, completeness (not ids or timings)."""
    out = {"degraded": body["degraded"], "missing": body["missing"], "topics": [], "outputs": {}}
    out["topics"] = [(t["label"], round(t["score"], 3)) for t in body["topics"]]
    text = body["outputs"].get("text", {})
    out["outputs"]["labels"] = [(x["label"], round(x["score"], 3)) for x in text.get("labels", [])]
    audio = body["outputs"].get("audio", {})
    out["outputs"]["speech"] = [
        (round(s["start_s"], 2), round(s["end_s"], 2)) for s in audio.get("speech_segments", [])
    ]
    return out


def test_two_fusion_replicas_answer_exactly_like_one(mesh: Mesh) -> None:
    wav, _, _ = media.speech_wav("Fusion replicas must agree.", lead_silence_s=0.5, tail_silence_s=0.5)
    topics = ["football", "stock markets", "rain tomorrow", "a new phone", "a concert", "a recipe for bread"]
    requests = [{"text": f"{topics[i % len(topics)]} number {i}", "audio": wav} for i in range(200)]

    def run_all() -> list[dict[str, Any]]:
        def one(inputs: dict[str, str | bytes]) -> dict[str, Any]:
            status, body = predict_inputs(mesh.gateway_http, "content", inputs, timeout_ms=30000, bypass_cache=True)
            assert status == 200, body
            return body

        with ThreadPoolExecutor(32) as pool:
            return list(pool.map(one, requests))

    single = run_all()
    assert all(not b["degraded"] and set(b["outputs"]) == {"text", "audio"} for b in single)

    # Replace the one fusion replica by two that split the partitions between them.
    mesh.stop_replica("fusion-0")
    urls = {}
    try:
        for index in (0, 1):
            replica = f"fusion-{index}of2"
            _, ports = mesh.start_replica(
                "fusion", replica, overrides={"LOOM_FUSION_REPLICA_INDEX": str(index), "LOOM_FUSION_REPLICA_COUNT": "2"}
            )
            urls[replica] = f"http://127.0.0.1:{ports['http']}"
        double = run_all()
        for one_replica, two_replicas in zip(single, double, strict=True):
            assert comparable(two_replicas) == comparable(one_replica)
        # Both replicas really took a share of the requests.
        for url in urls.values():
            assert metric(url, "loom_messages_total", direction="in") > 0
    finally:
        for replica in urls:
            mesh.stop_replica(replica)
        mesh.start_service("fusion")
        mesh.wait_serving("fusion-0", mesh.ports["fusion_grpc"])
