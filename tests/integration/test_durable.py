"""The durable lane on the running mesh: Submit/GetResult over HTTP and gRPC, NATS publishers,
idempotency, results on ``loom.res.<pipeline>``, and dead letters with their reason and replay."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import signal
import time
import uuid
from typing import Any

import grpc
import nats
import pytest
import yaml
from nats.js.api import DeliverPolicy

from services.common import durable
from services.common.launch.mesh import Mesh
from services.common.pb.loom.v1 import gateway_pb2, gateway_pb2_grpc
from services.common.settings import CommonSettings
from tests.media import sentence, text_image, tone_wav
from tests.support import eventually, gateway_channel, http_json, metric

pytestmark = pytest.mark.integration


def _text(seed: int) -> str:
    return sentence(random.Random(seed), 8)


def _submit(mesh: Mesh, pipeline: str, body: dict[str, Any], **headers: str) -> tuple[int, Any]:
    return http_json(f"{mesh.gateway_http}/v1/pipelines/{pipeline}:submit", body, headers=headers)


def _result(mesh: Mesh, request_id: str, timeout: float = 60.0) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        status, body = http_json(f"{mesh.gateway_http}/v1/results/{request_id}")
        assert status == 200, body
        return body if body["state"] != "PENDING" else None

    return eventually(done, timeout=timeout, interval=0.1)  # type: ignore[no-any-return]


async def _stream_messages(url: str, subject: str) -> list[Any]:
    """Every message the stream holds on ``subject`` right now (an ordered consumer from the start)."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        sub = await js.subscribe(subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
        msgs: list[Any] = []
        while True:
            try:
                msgs.append(await sub.next_msg(timeout=1.0))
            except TimeoutError:
                return msgs
    finally:
        await nc.close()


def test_submit_returns_at_once_and_the_answer_arrives_in_results_and_on_loom_res(mesh: Mesh) -> None:
    timed = {"stage": "gateway.submit", "pipeline": "embed"}
    timed_before = metric(mesh.gateway_http, "loom_stage_duration_seconds_count", **timed)
    status, accepted = _submit(mesh, "embed", {"inputs": {"text": _text(1)}})
    assert status == 202, accepted
    assert metric(mesh.gateway_http, "loom_stage_duration_seconds_count", **timed) == timed_before + 1
    assert accepted["duplicate"] is False and accepted["result"] == f"/v1/results/{accepted['request_id']}"
    body = _result(mesh, accepted["request_id"])
    assert body["state"] == "DONE", body
    assert len(body["response"]["outputs"]["text"]["embedding"]) == 384
    assert body["finished_unix_ms"] >= body["accepted_unix_ms"] > 0
    published = asyncio.run(_stream_messages(mesh.nats_url, durable.result_subject("embed")))
    ours = [gateway_pb2.Result.FromString(m.data) for m in published]
    ours = [r for r in ours if r.request_id == accepted["request_id"]]
    assert len(ours) == 1 and ours[0].state == gateway_pb2.Result.DONE


def test_a_multimodal_request_is_fused_from_parts_that_travel_the_durable_lane_apart(mesh: Mesh) -> None:
    inputs = {
        "text": _text(5),
        "image": {"b64": base64.b64encode(text_image("durable invoice")).decode()},
        "audio": {"b64": base64.b64encode(tone_wav(seconds=1.0)).decode()},
    }
    status, accepted = _submit(mesh, "content", {"inputs": inputs})
    assert status == 202, accepted
    body = _result(mesh, accepted["request_id"], timeout=120)
    assert body["state"] == "DONE" and not body["response"]["degraded"], body
    outputs = body["response"]["outputs"]
    assert set(outputs) == {"text", "image", "audio"}
    assert "durable" in outputs["image"]["text"].lower(), outputs["image"]
    published = asyncio.run(_stream_messages(mesh.nats_url, durable.result_subject("content")))
    assert sum(gateway_pb2.Result.FromString(m.data).request_id == accepted["request_id"] for m in published) == 1


def test_a_durable_request_is_one_trace_found_by_its_request_id(mesh: Mesh) -> None:
    """Submit, ingress, every stage's pull worker and fusion continue one trace, named by the request id."""
    status, accepted = _submit(mesh, "embed", {"inputs": {"text": _text(11)}})
    assert status == 202, accepted
    assert _result(mesh, accepted["request_id"])["state"] == "DONE"
    chain = {"gateway", "preprocess", "inference", "postprocess", "fusion"}

    def joined() -> dict[str, Any] | None:
        status, body = http_json(f"{mesh.monitor_http}/v1/traces/{accepted['request_id']}")
        return body if status == 200 and chain <= set(body["services"]) else None

    trace = eventually(joined, timeout=15, interval=0.5)
    names = [span["name"] for span in trace["spans"]]
    assert any(name.startswith("process loom.work.") for name in names), names


def test_feedback_joins_a_durable_answer(mesh: Mesh) -> None:
    """Fusion reports a durable answer to the monitor, so ground truth for it counts in accuracy."""
    pipeline = "embed_durable_fb"  # its own pipeline: the shared ones' accuracy counts are other tests' business
    status, spec = http_json(f"{mesh.gateway_http}/v1/pipelines/embed")
    assert status == 200, spec
    status, body = http_json(
        f"{mesh.gateway_http}/v1/pipelines/{pipeline}",
        raw=yaml.safe_dump({**spec, "name": pipeline}).encode(),
        method="PUT",
    )
    assert status == 200, body
    try:
        status, accepted = _submit(mesh, pipeline, {"inputs": {"text": _text(12)}})
        assert status == 202, accepted
        answer = _result(mesh, accepted["request_id"])
        assert answer["state"] == "DONE", answer
        label = answer["response"]["outputs"]["text"]["labels"][0]["label"]
        feedback = json.dumps({"pipeline": pipeline, "request_id": accepted["request_id"], "label": label}).encode()

        async def judged() -> str:
            """Feedback as a NATS request, until the monitor has the answer's telemetry (it travels apart)."""
            nc = await nats.connect(mesh.nats_url)
            try:
                async with asyncio.timeout(20):
                    while True:
                        reply = json.loads((await nc.request(f"loom.fb.{pipeline}", feedback, timeout=5)).data)
                        if reply["result"] != "unknown_request":
                            return str(reply["result"])
                        await asyncio.sleep(0.2)
            finally:
                await nc.close()

        assert asyncio.run(judged()) == "joined"

        def counted() -> list[tuple[str, int, float]] | None:
            rows = http_json(f"{mesh.monitor_http}/v1/accuracy")[1]["accuracy"]
            ours = [(r["model"], r["samples"], r["accuracy"]) for r in rows if r["pipeline"] == pipeline]
            return ours or None

        assert eventually(counted, timeout=20, interval=0.5) == [("minilm", 1, 1.0)]
    finally:
        asyncio.run(_delete_spec(mesh.nats_url, pipeline))


async def _delete_spec(url: str, name: str) -> None:
    nc = await nats.connect(url)
    try:
        await (await nc.jetstream().key_value(CommonSettings().pipelines_bucket)).delete(name)
    finally:
        await nc.close()


def test_an_idempotency_key_makes_a_retried_submit_the_same_request(mesh: Mesh) -> None:
    key = f"order-{uuid.uuid4().hex[:8]}"
    first = _submit(mesh, "embed", {"inputs": {"text": _text(2)}}, **{"Idempotency-Key": key})[1]
    again = _submit(mesh, "embed", {"inputs": {"text": _text(2)}}, **{"Idempotency-Key": key})[1]
    assert again["request_id"] == first["request_id"] and again["duplicate"] is True
    assert _result(mesh, first["request_id"])["state"] == "DONE"
    later = _submit(mesh, "embed", {"inputs": {"text": _text(2)}}, **{"Idempotency-Key": key})[1]
    assert later == {**first, "duplicate": True}
    published = asyncio.run(_stream_messages(mesh.nats_url, durable.result_subject("embed")))
    assert sum(gateway_pb2.Result.FromString(m.data).request_id == first["request_id"] for m in published) == 1


def test_grpc_submit_and_get_result(mesh: Mesh) -> None:
    with gateway_channel(mesh.gateway_grpc) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        req = gateway_pb2.PredictRequest(pipeline="embed")
        req.inputs["text"].text = _text(3)
        accepted = stub.Submit(gateway_pb2.SubmitRequest(request=req), timeout=10)

        def answered() -> gateway_pb2.Result | None:
            result = stub.GetResult(gateway_pb2.GetResultRequest(request_id=accepted.request_id), timeout=10)
            return result if result.state != gateway_pb2.Result.PENDING else None

        result = eventually(answered, timeout=60, interval=0.1)
        assert result.state == gateway_pb2.Result.DONE
        assert len(result.response.outputs["text"].text.embedding) == 384
        with pytest.raises(grpc.RpcError) as missing:
            stub.GetResult(gateway_pb2.GetResultRequest(request_id="never-submitted"), timeout=10)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        bad = gateway_pb2.PredictRequest(pipeline="embed")
        bad.inputs["nope"].text = "x"
        with pytest.raises(grpc.RpcError) as invalid:
            stub.Submit(gateway_pb2.SubmitRequest(request=bad), timeout=10)
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def _publish_requests(url: str) -> dict[str, str]:
    """What an event publisher does: PredictRequests on loom.req.<pipeline>; returns ids by case."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        ids = {"good": f"ev-{uuid.uuid4().hex[:12]}", "invalid": f"ev-{uuid.uuid4().hex[:12]}"}
        good = gateway_pb2.PredictRequest(request_id=ids["good"])
        good.inputs["text"].text = _text(4)
        await js.publish(
            durable.request_subject("embed"), good.SerializeToString(), headers={"Nats-Msg-Id": ids["good"]}
        )
        invalid = gateway_pb2.PredictRequest(request_id=ids["invalid"])
        invalid.inputs["image"].text = "not an input of embed"
        await js.publish(durable.request_subject("embed"), invalid.SerializeToString())
        ack = await js.publish(durable.request_subject("embed"), b"\xff\x00 not a protobuf")
        ids["garbage_seq"] = str(ack.seq)
        return ids
    finally:
        await nc.close()


def test_event_publishers_get_answers_typed_errors_and_dead_letters(mesh: Mesh) -> None:
    ids = asyncio.run(_publish_requests(mesh.nats_url))
    assert _result(mesh, ids["good"])["state"] == "DONE"
    failed = _result(mesh, ids["invalid"])
    assert failed["state"] == "FAILED" and failed["error"]["code"] == "INVALID_ARGUMENT", failed

    def dead() -> dict[str, Any] | None:
        status, body = http_json(f"{mesh.gateway_http}/v1/admin/dlq?stage=ingress")
        assert status == 200, body
        hits = [d for d in body["dead_letters"] if d["origin_seq"] == int(ids["garbage_seq"])]
        return hits[0] if hits else None

    letter = eventually(dead, timeout=30)
    assert letter["subject"] == "loom.req.embed" and "undecodable" in letter["reason"]
    status, replayed = http_json(f"{mesh.gateway_http}/v1/admin/dlq/{letter['seq']}:replay", {}, method="POST")
    assert status == 200 and replayed["subject"] == "loom.req.embed", replayed
    # Garbage replayed is garbage again: back in the dead-letter stream under a new sequence.
    again = eventually(
        lambda: (
            [
                d
                for d in http_json(f"{mesh.gateway_http}/v1/admin/dlq?stage=ingress")[1]["dead_letters"]
                if d["seq"] > letter["seq"] and "undecodable" in d["reason"]
            ]
            or None
        ),
        timeout=30,
    )
    assert again
    status, body = http_json(f"{mesh.gateway_http}/v1/admin/dlq?stage=ingress")
    assert letter["seq"] not in [d["seq"] for d in body["dead_letters"]]  # the replayed letter left the queue


def test_a_durable_part_whose_deadline_passes_before_its_stage_fails_unprocessed(mesh: Mesh) -> None:
    """Preprocess frozen past a Submit's deadline: once it thaws it never works the part, and says why."""
    frozen = [proc for name, proc in mesh.services.items() if name.startswith("preprocess") and proc.running()]
    url = mesh.http_url("preprocess")
    drops = metric(url, "loom_deadline_drops_total", stage="loom.pre.text")
    worked = metric(url, "loom_stage_duration_seconds_count", stage="loom.pre.text")
    for proc in frozen:
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGSTOP)
    try:
        status, accepted = _submit(mesh, "embed", {"inputs": {"text": _text(606)}, "timeout_ms": 300})
        assert status == 202, accepted
        time.sleep(1.5)  # well past its 300 ms while nothing can take it
    finally:
        for proc in frozen:
            assert proc.pid is not None
            os.kill(proc.pid, signal.SIGCONT)
    body = _result(mesh, accepted["request_id"])
    assert body["state"] == "FAILED" and body["error"]["code"] == "DEADLINE_EXCEEDED", body
    assert body["error"]["service"] == "preprocess", body
    eventually(lambda: metric(url, "loom_deadline_drops_total", stage="loom.pre.text") >= drops + 1, timeout=10)
    assert metric(url, "loom_stage_duration_seconds_count", stage="loom.pre.text") == worked  # never worked on
    # The stage is itself again: the next request is answered.
    status, accepted = _submit(mesh, "embed", {"inputs": {"text": _text(607)}})
    assert status == 202 and _result(mesh, accepted["request_id"])["state"] == "DONE"
