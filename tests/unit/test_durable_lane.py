"""The durable lane's pure rules: subject twins, hop ids, backoff, idempotency ids, fused records."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import nats.errors
import pytest
from nats.js.errors import NotFoundError as JsNotFound
from prometheus_client import REGISTRY

from services.common import durable, envelope
from services.common.bus import Bus
from services.common.errors import InvalidArgument, Unavailable
from services.common.events import TelemetryPublisher
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.pb.loom.v1 import gateway_pb2
from services.common.pipelines import PipelineRegistry
from services.common.stage import StageRunner
from services.fusion.collector import Pending
from services.fusion.durable import DurableFusion, to_result
from services.gateway import convert
from services.gateway.core import GatewayCore, PredictCall
from services.gateway.durable import DurableFront, request_id_for
from services.gateway.settings import GatewaySettings

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


# --- ack only after the next hop is stored (fakes of JetStream's client side) -----------------------


@dataclass
class FakeJs:
    """``js.publish`` that stores (and records) or fails like a stream without a leader."""

    fail: bool = False
    published: list[tuple[str, bytes, dict[str, str]]] = field(default_factory=list)

    async def publish(self, subject: str, payload: bytes, *, headers: dict[str, str], timeout: float) -> Any:
        if self.fail:
            raise nats.errors.TimeoutError
        self.published.append((subject, payload, headers))
        return SimpleNamespace(duplicate=False, seq=len(self.published))


class FakeKv:
    """A results bucket that holds nothing yet and takes every put."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}

    async def get(self, key: str) -> Any:
        raise JsNotFound

    async def put(self, key: str, value: bytes) -> int:
        self.values[key] = value
        return len(self.values)

    async def create(self, key: str, value: bytes) -> int:
        return await self.put(key, value)


class FakeMsg:
    def __init__(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        self.subject, self.data, self.headers = subject, data, headers or {}
        self.metadata = SimpleNamespace(
            num_delivered=1, sequence=SimpleNamespace(stream=7), stream="LOOM_WORK", timestamp=dt.datetime.now(dt.UTC)
        )
        self.acked = self.naked = 0

    async def ack(self) -> None:
        self.acked += 1

    async def nak(self, delay: float | None = None) -> None:
        self.naked += 1


def _bus(service: str, js: FakeJs) -> Bus:
    bus = Bus(service)
    bus._js = js  # type: ignore[assignment]  # the lane reads bus.js only
    return bus


def _work_part(slip: list[str], *, deadline_ms: int | None = None) -> pb.Part:
    deadline = envelope.now_ms() + 60_000 if deadline_ms is None else deadline_ms
    return pb.Part(
        request_id="r-lane", part_id="text", pipeline="embed", text="hello", slip=slip, deadline_unix_ms=deadline
    )


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _runner(js: FakeJs, calls: list[str]) -> StageRunner:
    async def handle(part: pb.Part) -> dict[str, float]:
        calls.append(part.part_id)
        return {}

    return StageRunner(_bus("preprocess", js), "preprocess", "loom.pre.text", handle, lane=durable.LaneSettings())


async def test_a_stage_whose_next_hop_is_not_stored_leaves_the_part_unacked_to_come_back() -> None:
    js, calls = FakeJs(fail=True), list[str]()
    msg: Any = FakeMsg(
        "loom.work.pre.text", _work_part(["loom.pre.text", "loom.infer.minilm", "loom.fuse.0"]).SerializeToString()
    )
    with pytest.raises(Unavailable, match="did not store"):
        await _runner(js, calls).on_work(msg)
    assert calls == ["text"] and msg.acked == 0 and msg.naked == 0

    js.fail = False  # delivered again, stored this time: then acked, once
    await _runner(js, calls).on_work(msg)
    assert msg.acked == 1 and [subject for subject, _, _ in js.published] == ["loom.work.infer.minilm"]


async def test_a_durable_part_with_an_empty_routing_slip_is_dead_lettered_with_the_reason() -> None:
    js, calls = FakeJs(), list[str]()
    letters = _sample("loom_dead_letters_total", service="preprocess", stage="pre_text")
    msg: Any = FakeMsg("loom.work.pre.text", _work_part(["loom.pre.text"]).SerializeToString())
    await _runner(js, calls).on_work(msg)
    [(subject, payload, headers)] = js.published
    assert subject == "loom.dlq.pre_text" and payload == msg.data
    assert "empty routing slip" in headers[durable.DLQ_REASON] and msg.acked == 1
    assert _sample("loom_dead_letters_total", service="preprocess", stage="pre_text") == letters + 1


async def test_a_durable_part_past_its_deadline_goes_on_as_deadline_exceeded_without_being_worked() -> None:
    js, calls = FakeJs(), list[str]()
    labels = {"service": "preprocess", "stage": "loom.pre.text"}
    drops = _sample("loom_deadline_drops_total", **labels)
    durations = _sample("loom_stage_duration_seconds_count", **labels, pipeline="embed", model="", version="")
    part = _work_part(["loom.pre.text", "loom.infer.minilm", "loom.fuse.0"], deadline_ms=envelope.now_ms() - 1)
    msg: Any = FakeMsg("loom.work.pre.text", part.SerializeToString())
    await _runner(js, calls).on_work(msg)
    [(subject, payload, _)] = js.published
    forwarded = pb.Part.FromString(payload)
    assert subject == "loom.work.fuse.0" and forwarded.error.code == "DEADLINE_EXCEEDED"  # straight to fusion
    assert calls == [] and msg.acked == 1 and "preprocess" not in forwarded.timings_ms
    assert _sample("loom_deadline_drops_total", **labels) == drops + 1
    assert _sample("loom_stage_duration_seconds_count", **labels, pipeline="embed", model="", version="") == durations


async def test_fusion_leaves_a_part_unacked_when_its_answer_is_not_published() -> None:
    js = FakeJs(fail=True)
    bus = _bus("fusion", js)
    fusion = DurableFusion(bus, durable.LaneSettings(), PipelineRegistry(), TelemetryPublisher(bus, "fusion"))
    fusion.results._kv = FakeKv()  # type: ignore[assignment]
    part = _work_part(["loom.fuse.0"])
    part.part_ids.append("text")
    part.output.text.model = "minilm"
    msg: Any = FakeMsg("loom.work.fuse.0", part.SerializeToString())
    try:
        with pytest.raises(Unavailable, match="did not store"):
            await fusion.on_part(msg)
        assert msg.acked == 0 and fusion.active == 0

        js.fail = False
        labels = {"service": "fusion", "stage": "loom.fuse", "pipeline": "embed", "model": "", "version": ""}
        before = _sample("loom_stage_duration_seconds_count", **labels)
        await fusion.on_part(msg)
        assert msg.acked == 1 and [subject for subject, _, _ in js.published] == ["loom.res.embed"]
        assert _sample("loom_stage_duration_seconds_count", **labels) == before + 1
    finally:
        await bus.close()


async def test_the_ingress_leaves_a_request_unacked_when_its_parts_are_not_stored() -> None:
    js = FakeJs(fail=True)
    bus = _bus("gateway", js)
    front = DurableFront(bus, GatewayCore(bus, GatewaySettings(), PipelineRegistry()), None, durable.LaneSettings())
    front.results._kv = FakeKv()  # type: ignore[assignment]
    req = gateway_pb2.PredictRequest(pipeline="embed", request_id="r-ingress")
    req.inputs["text"].text = "hello"
    msg: Any = FakeMsg("loom.req.embed", req.SerializeToString(), {durable.MSG_ID: "r-ingress"})
    with pytest.raises(Unavailable, match="did not store"):
        await front.on_request(msg)
    assert msg.acked == 0

    js.fail = False
    await front.on_request(msg)
    assert msg.acked == 1 and [subject for subject, _, _ in js.published] == ["loom.work.pre.text"]
