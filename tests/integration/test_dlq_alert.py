"""Dead letters on the running mesh: the monitor counts LOOM_DLQ per stage, fires LoomDeadLetters (P2),
``loomctl dlq`` lists and replays them, and the alert resolves once the stream is empty again.

The session mesh's monitor evaluates every second (tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from typing import Any

import nats
import pytest

from services.common import durable
from services.common.launch.mesh import Mesh
from services.common.pb.loom.v1 import gateway_pb2
from tests.media import sentence
from tests.support import TEST_API_KEY, eventually, http_json, metric
from tools.loomctl.__main__ import main as loomctl

pytestmark = pytest.mark.integration

ALERT = "LoomDeadLetters"


def alerts(mesh: Mesh, stage: str, state: str = "active") -> list[dict[str, Any]]:
    status, body = http_json(f"{mesh.monitor_http}/v1/alerts?state={state}")
    assert status == 200, body
    return [a for a in body["alerts"] if a["name"] == ALERT and a["labels"].get("stage") == stage]


async def _publish(url: str, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> int:
    nc = await nats.connect(url)
    try:
        ack = await nc.jetstream().publish(subject, payload, headers=headers)
        return int(ack.seq)
    finally:
        await nc.close()


async def _delete(url: str, seq: int) -> None:
    nc = await nats.connect(url)
    try:
        await nc.jetstream().delete_msg(durable.DLQ_STREAM, seq)
    finally:
        await nc.close()


def run_loomctl(mesh: Mesh, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = loomctl(["--gateway", mesh.gateway_http, "--monitor", mesh.monitor_http, *argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_a_dead_letter_fires_the_alert_and_replaying_it_answers_the_request_and_resolves_it(
    mesh: Mesh, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOOM_API_KEY", TEST_API_KEY)  # loomctl's credential: the tests' admin key
    # A stage of its own, so that letters other tests leave behind do not count here.
    stage = f"alerttest_{uuid.uuid4().hex[:8]}"
    request_id = f"dlq-{uuid.uuid4().hex[:12]}"
    req = gateway_pb2.PredictRequest(request_id=request_id)
    req.inputs["text"].text = sentence(random.Random(6), 8)
    headers = {
        durable.DLQ_REASON: "not acknowledged after 5 deliveries (test)",
        durable.DLQ_SUBJECT: durable.request_subject("embed"),
        durable.DLQ_STREAM_HDR: durable.REQ_STREAM,
        durable.DLQ_SEQ: "0",
        durable.DLQ_DELIVERIES: "6",
        durable.DLQ_MSG_ID: request_id,
    }
    seq = asyncio.run(_publish(mesh.nats_url, durable.dlq_subject(stage), req.SerializeToString(), headers))

    eventually(lambda: metric(mesh.monitor_http, "loom_dlq_messages", stage=stage) == 1.0, timeout=15)
    (alert,) = eventually(lambda: alerts(mesh, stage), timeout=15)
    assert alert["severity"] == "P2" and alert["value"] == 1.0
    assert alert["summary"].startswith(f"1 message in the dead-letter stream (stage {stage}); inspect with")

    code, text = run_loomctl(mesh, capsys, "alerts")
    assert code == 0 and ALERT in text and stage in text, text
    code, text = run_loomctl(mesh, capsys, "dlq", "list", "--stage", stage, "--json")
    assert code == 0, text
    (listed,) = json.loads(text)
    assert (listed["seq"], listed["subject"], listed["deliveries"]) == (seq, "loom.req.embed", 6)
    code, text = run_loomctl(mesh, capsys, "dlq", "list", "--stage", stage)
    assert code == 0 and "1 dead letter;" in text and "not acknowledged after 5 deliveries" in text, text

    code, text = run_loomctl(mesh, capsys, "dlq", "replay", str(seq))
    assert code == 0 and text.startswith(f"{seq}  back to loom.req.embed"), text
    # The request starts over with fresh tries and is answered; the stage's letters are gone.
    code, text = run_loomctl(mesh, capsys, "result", request_id, "--wait", "60")
    assert code == 0 and f"request  {request_id}   DONE" in text, text
    eventually(lambda: metric(mesh.monitor_http, "loom_dlq_messages", stage=stage) == 0.0, timeout=15)
    eventually(lambda: not alerts(mesh, stage), timeout=15)
    (resolved,) = [a for a in alerts(mesh, stage, state="all") if a["state"] == "resolved"]
    assert resolved["resolved_unix_ms"] >= resolved["started_unix_ms"]


def test_garbage_on_loom_req_is_dead_lettered_by_the_gateway_and_counted_by_the_monitor(mesh: Mesh) -> None:
    def ingress() -> float:
        return metric(mesh.monitor_http, "loom_dlq_messages", stage="ingress")

    before = ingress()
    origin = asyncio.run(_publish(mesh.nats_url, durable.request_subject("embed"), b"\xff\x00 not a protobuf"))

    def ours() -> dict[str, Any] | None:
        status, body = http_json(f"{mesh.gateway_http}/v1/admin/dlq?stage=ingress")
        assert status == 200, body
        hits = [d for d in body["dead_letters"] if d["origin_seq"] == origin]
        return hits[0] if hits else None

    letter = eventually(ours, timeout=30)
    eventually(lambda: ingress() == before + 1, timeout=15)
    (alert,) = eventually(lambda: alerts(mesh, "ingress"), timeout=15)
    assert alert["value"] >= 1.0 and "stage ingress" in alert["summary"]
    asyncio.run(_delete(mesh.nats_url, letter["seq"]))  # leave the stream as it was
    eventually(lambda: ingress() == before, timeout=15)
    if before == 0:
        eventually(lambda: not alerts(mesh, "ingress"), timeout=15)
