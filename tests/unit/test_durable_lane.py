"""The durable lane's pure rules: subject twins, hop ids, backoff, idempotency ids, fused records."""

from __future__ import annotations

import pytest

from services.common import durable
from services.common.errors import InvalidArgument
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.pb.loom.v1 import gateway_pb2
from services.fusion.collector import Pending
from services.fusion.durable import to_result
from services.gateway import convert
from services.gateway.core import PredictCall
from services.gateway.durable import request_id_for

pytestmark = pytest.mark.unit


def test_every_stage_subject_has_a_durable_twin_and_a_consumer_named_after_it() -> None:
    assert durable.work_subject("loom.pre.text") == "loom.work.pre.text"
    assert durable.work_subject("loom.fuse.3") == "loom.work.fuse.3"
    assert durable.consumer_name("loom.work.infer.minilm") == "infer_minilm"
    assert durable.consumer_name("loom.work.fuse.>") == "fuse"
    assert durable.request_subject("content") == "loom.req.content"
    assert durable.result_subject("content") == "loom.res.content"
    with pytest.raises(ValueError):
        durable.work_subject("other.pre.text")


def test_hop_ids_differ_along_the_slip_so_a_repeated_hop_is_dropped_and_a_new_one_is_not() -> None:
    ids = {durable.part_msg_id("r1", "text", n) for n in (3, 2, 1)}
    assert len(ids) == 3
    assert durable.part_msg_id("r1", "text", 2) == durable.part_msg_id("r1", "text", 2)
    assert durable.part_msg_id("r1", "text", 2) != durable.part_msg_id("r1", "image", 2)


def test_backoff_is_jittered_and_capped() -> None:
    backoff = durable.LaneSettings(max_deliver=10, backoff_s=0.5, backoff_max_s=4.0).backoff
    waits = [backoff.delay(attempt) for attempt in range(1, 10) for _ in range(50)]
    assert all(0.0 <= w <= 4.0 for w in waits)
    assert len({round(w, 6) for w in waits}) > 100  # random, not a fixed schedule
    assert max(backoff.delay(1) for _ in range(200)) <= 0.5


def test_the_same_key_of_the_same_tenant_names_the_same_request() -> None:
    a = request_id_for("acme", "order-17")
    assert a == request_id_for("acme", "order-17")
    assert a != request_id_for("other", "order-17")
    assert a != request_id_for("acme", "order-18")
    assert len(a) <= 64 and a.startswith("ik-")
    for bad in ("", "has space", "x" * 129, "tab\t"):
        with pytest.raises(InvalidArgument):
            request_id_for("acme", bad)


def test_a_call_survives_the_trip_through_its_wire_form() -> None:
    call = PredictCall(
        pipeline="content",
        inputs={"text": "hello", "image": b"\x89PNG"},
        timeout_ms=9000,
        request_id="r-1",
        content_types={"image": "image/png"},
        bypass_cache=True,
    )
    back = convert.call_from_proto(convert.call_to_proto(call), None)
    assert (back.inputs, back.timeout_ms, back.request_id, back.content_types, back.bypass_cache) == (
        call.inputs,
        9000,
        "r-1",
        {"image": "image/png"},
        True,
    )


def _part(part_id: str, *, error: str = "") -> pb.Part:
    part = pb.Part(request_id="r-9", part_id=part_id, pipeline="content", part_ids=["image", "text"])
    if error:
        part.error.code, part.error.message = error, "broken"
    else:
        part.output.text.model = "minilm"
    return part


def test_a_fused_durable_answer_is_done_partial_or_failed() -> None:
    whole = Pending("r-9", "content", "", ["image", "text"], 0, {"image": _part("image"), "text": _part("text")})
    done = to_result(whole, None, "acme")
    assert done.state == gateway_pb2.Result.DONE and done.tenant == "acme"
    assert set(done.response.outputs) == {"image", "text"} and not done.response.degraded

    half = Pending("r-9", "content", "", ["image", "text"], 0, {"image": _part("image", error="UNAVAILABLE")})
    half.parts["text"] = _part("text")
    partial = to_result(half, None, "")
    assert partial.state == gateway_pb2.Result.DONE and partial.response.degraded
    assert list(partial.response.missing) == ["image"]

    both = {"image": _part("image", error="INVALID_ARGUMENT"), "text": _part("text", error="INVALID_ARGUMENT")}
    failed = to_result(Pending("r-9", "content", "", ["image", "text"], 0, both), None, "")
    assert failed.state == gateway_pb2.Result.FAILED and failed.error.code == "INVALID_ARGUMENT"


def test_the_result_document_shows_the_answer_only_when_there_is_one() -> None:
    pending = gateway_pb2.Result(request_id="r", state=gateway_pb2.Result.PENDING, pipeline="embed")
    assert convert.result_to_json(pending) == {
        "request_id": "r",
        "state": "PENDING",
        "pipeline": "embed",
        "accepted_unix_ms": 0,
    }
    failed = gateway_pb2.Result(request_id="r", state=gateway_pb2.Result.FAILED, pipeline="embed")
    failed.error.code, failed.error.message = "INVALID_ARGUMENT", "bad"
    body = convert.result_to_json(failed)
    assert body["state"] == "FAILED" and body["error"]["code"] == "INVALID_ARGUMENT" and "response" not in body
