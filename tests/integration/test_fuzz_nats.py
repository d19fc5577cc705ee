"""Garbage on the bus: every subject a Loom service consumes survives whatever a publisher sends.

Hypothesis generates fixed (derandomized) corpora: random bytes, truncated and bit-flipped valid
messages (protobuf or JSON), a string field carrying invalid UTF-8 (a wrong wire type for the
schema), made-up JSON documents and one huge text field. They go onto the session mesh's
``loom.req.embed`` (the durable ingress, JetStream), ``loom.pre.text`` (a stage, core NATS),
``loom.work.pre.text`` (the same stage's durable twin), ``loom.fb.<pipeline>`` (the monitor's
feedback, protobuf or JSON, as requests), ``loom.tel.gateway`` (the monitor's telemetry) and
``loom.models.control`` (inference's JSON model control, as requests). The last four are sent as
the ``gateway`` user, who may publish them (deploy/nats/loom.conf). Then: every process still
runs, a normal predict still answers, no service's log holds a Traceback, every undecodable ingress
message is dead-lettered, no durable answer or control reply to a fuzz request says INTERNAL, and
every feedback request is answered.

Nothing here may change what other tests on the session mesh read: payloads that would decode to a
real pipeline or model (a control request could unload a served version) are left out of the corpora.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import nats
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from services.common import durable, subjects
from services.common.errors import NATS_ERROR_CODE, LoomError
from services.common.launch.mesh import SERVICES, Mesh
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.pb.loom.v1 import gateway_pb2, monitor_pb2
from services.common.triton_server import repository_models
from services.inference.control import parse_request
from services.monitor.service import _parse_feedback
from tests.fuzzlog import recording
from tests.support import eventually, http_json, metric, predict_http

pytestmark = pytest.mark.integration

PER_SUBJECT = 100
REPLICAS = tuple(f"{s}-0" for s in SERVICES)
#: Error codes no client payload may earn (HTTP statuses for NATS service-error headers).
BAD_CODES = {"INTERNAL", "UNKNOWN", "DATA_LOSS"}
HUGE = 256 * 1024  # under NATS' 1 MB max_payload: the point is a large field, not a refused publish


def _request(text: str = "fuzzing the ingress") -> bytes:
    req = gateway_pb2.PredictRequest(pipeline="embed", timeout_ms=5000)
    req.inputs["text"].text = text
    return req.SerializeToString()


VALID_REQUEST = _request()
VALID_PART = pb.Part(
    request_id="fuzz-part", part_id="text", pipeline="embed", slip=[subjects.pre("text")], text="fuzz"
).SerializeToString()


def _damaged(valid: bytes) -> st.SearchStrategy[bytes]:
    """A valid message cut short, with one byte flipped."""

    def cut(args: tuple[int, int, int]) -> bytes:
        end, at, flip = args
        data = bytearray(valid[:end])
        if data:
            data[at % len(data)] ^= flip
        return bytes(data)

    return st.tuples(st.integers(0, len(valid)), st.integers(0, 1000), st.integers(0, 255)).map(cut)


#: field 1 (``pipeline``, a string) carrying bytes that are not UTF-8: the wrong type on the wire.
NOT_UTF8 = st.binary(min_size=1, max_size=32).map(lambda b: b"\x0a" + bytes([len(b) + 1]) + b"\xff" + b)
GARBAGE = st.one_of(st.binary(max_size=1024), NOT_UTF8)


def _corpus(strategy: st.SearchStrategy[bytes], n: int) -> list[bytes]:
    """``n`` hypothesis-generated payloads, the same every run."""
    out: list[bytes] = []

    @settings(
        max_examples=n,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(payload: bytes) -> None:
        out.append(payload)

    collect()
    return out


def _harmless_part(data: bytes) -> bool:
    """Keep a stage payload only if it cannot send the stage anywhere but its own subject.

    A decodable Part with a made-up slip would have preprocess publish to a subject its NATS user
    may not use (the mesh fixture fails on any refused publish), and a made-up pipeline would reach
    the monitor's per-pipeline windows that other tests read.
    """
    try:
        part = pb.Part.FromString(data)
    except DecodeError:
        return True
    return set(part.slip) <= {subjects.pre("text")} and part.pipeline in ("", "embed")


async def _publish(url: str, ingress: list[bytes], stage: list[bytes], results: list[bytes]) -> list[int]:
    """Publish both corpora; return the stream sequences of the ingress payloads that do not decode.

    The durable answers (``loom.res.embed``) are collected into ``results`` while the subscription lives.
    """
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()

        async def answered(msg: Any) -> None:
            results.append(msg.data)

        await nc.subscribe(durable.result_subject("embed"), cb=answered)
        undecodable = []
        for payload in ingress:
            ack = await js.publish(durable.request_subject("embed"), payload)
            try:
                gateway_pb2.PredictRequest.FromString(payload)
            except DecodeError:
                undecodable.append(ack.seq)
        for payload in stage:
            await nc.publish(subjects.pre("text"), payload)
        await nc.flush()
        await asyncio.sleep(8)  # the decodable requests' answers (their deadline is 5 s at most)
        return undecodable
    finally:
        await nc.close()


def _log_sizes(mesh: Mesh) -> dict[str, int]:
    return {r: (mesh.workdir / "logs" / f"{r}.log").stat().st_size for r in REPLICAS}


def _still_serving(mesh: Mesh, before: dict[str, int]) -> None:
    """Every replica runs, a predict answers, and none logged a Traceback since ``before``."""
    status, answer = predict_http(mesh.gateway_http, "still answering after the garbage")
    assert status == 200, answer
    assert len(answer["outputs"]["text"]["embedding"]) == 384
    for replica, size in before.items():
        assert mesh.services[replica].running(), f"{replica} died on the garbage"
        # An exception in a NATS callback does not end the process, only shows in its log.
        with (mesh.workdir / "logs" / f"{replica}.log").open("rb") as log:
            log.seek(size)
            written = log.read().decode("utf-8", "replace")
        assert "Traceback" not in written, f"{replica} raised on the garbage:\n{written[-3000:]}"


def test_garbage_on_the_bus_is_dead_lettered_or_dropped(mesh: Mesh) -> None:
    ingress = [*_corpus(GARBAGE | _damaged(VALID_REQUEST), PER_SUBJECT), _request("x" * HUGE)]
    stage = [p for p in _corpus(GARBAGE | _damaged(VALID_PART), PER_SUBJECT) if _harmless_part(p)]
    before = _log_sizes(mesh)
    results: list[bytes] = []
    with recording("nats-ingress-and-stage") as seen:
        undecodable = asyncio.run(_publish(mesh.nats_url, ingress, stage, results))
        seen["ingress undecodable"] = len(undecodable)
        seen["stage (loom.pre.text)"] = len(stage)
        answers = [gateway_pb2.Result.FromString(r) for r in results]
        for r in answers:
            seen[f"ingress answered {gateway_pb2.Result.State.Name(r.state)} {r.error.code}".strip()] += 1
        seen["ingress decodable, no answer"] = len(ingress) - len(undecodable) - len(answers)
    print(f"\nfuzz-nats: ingress={len(ingress)} (undecodable {len(undecodable)}) stage={len(stage)}")
    assert undecodable, "the corpus should hold undecodable requests"
    assert answers, "the decodable fuzz requests should have been answered"
    bad = [(r.request_id, r.error.code, r.error.message) for r in answers if r.error.code in BAD_CODES]
    assert not bad, bad[:10]

    def dead_lettered() -> Any:
        status, body = http_json(f"{mesh.gateway_http}/v1/admin/dlq?stage=ingress&limit=1000")
        assert status == 200, body
        seen = {d["origin_seq"] for d in body["dead_letters"] if "undecodable" in d["reason"]}
        return set(undecodable) <= seen or None

    eventually(dead_lettered, timeout=60)
    _still_serving(mesh, before)


# --- the monitor's and inference's subjects, and the durable stage ----------------------------------

FB_PIPELINE = "fuzz-feedback"  # a pipeline nobody serves: no test reads its accuracy window
NO_MODEL = "fuzz-no-such-model"
VALID_FEEDBACK = monitor_pb2.Feedback(pipeline=FB_PIPELINE, request_id="fuzz-1", label="x").SerializeToString()
VALID_FEEDBACK_JSON = json.dumps({"pipeline": FB_PIPELINE, "request_id": "fuzz-1", "correct": True}).encode()
VALID_EVENT = pb.TelemetryEvent(
    service="fuzz", stage="gateway", pipeline="fuzz-telemetry", request_id="fuzz-1", duration_ms=3.0, code="OK"
).SerializeToString()
VALID_CONTROL = json.dumps({"model": NO_MODEL, "versions": ["1"]}).encode()
VALID_DURABLE_PART = pb.Part(
    request_id="fuzz-work", part_id="text", pipeline="embed", slip=[subjects.pre("text")], text="fuzz"
).SerializeToString()
JSON_VALUES = (
    st.none() | st.booleans() | st.integers() | st.text(max_size=12) | st.lists(st.text(max_size=4), max_size=3)
)
FEEDBACK_JSON = st.dictionaries(
    st.sampled_from(["pipeline", "request_id", "label", "correct", "source"]) | st.text(max_size=6), JSON_VALUES
).map(lambda d: json.dumps(d).encode())
CONTROL_JSON = st.fixed_dictionaries(
    {}, optional={"model": st.text(max_size=12) | JSON_VALUES, "versions": JSON_VALUES | st.lists(st.integers(-2, 9))}
).map(lambda d: json.dumps(d).encode())


def _names(mesh: Mesh) -> tuple[set[str], set[str]]:
    """The pipelines the mesh serves and the models of its repository: names no fuzz payload may use."""
    status, body = http_json(f"{mesh.gateway_http}/v1/pipelines")
    assert status == 200, body
    return set(body["pipelines"]), set(repository_models(mesh.model_repository))


def _corpora(pipelines: set[str], models: set[str]) -> dict[str, list[bytes]]:
    def feedback_ok(data: bytes) -> bool:
        try:
            return _parse_feedback(data).pipeline not in pipelines
        except ValueError:
            return True

    def event_ok(data: bytes) -> bool:
        try:
            event = pb.TelemetryEvent.FromString(data)
        except DecodeError:
            return True
        return event.pipeline not in pipelines and event.model not in models and event.service not in SERVICES

    def control_ok(data: bytes) -> bool:
        try:
            return parse_request(data)[0] not in models
        except LoomError:
            return True

    fb = GARBAGE | _damaged(VALID_FEEDBACK) | _damaged(VALID_FEEDBACK_JSON) | FEEDBACK_JSON
    return {
        subjects.feedback(FB_PIPELINE): [p for p in _corpus(fb, PER_SUBJECT) if feedback_ok(p)],
        subjects.telemetry("gateway"): [
            p for p in _corpus(GARBAGE | _damaged(VALID_EVENT), PER_SUBJECT) if event_ok(p)
        ],
        subjects.model_query("control"): [
            p for p in _corpus(GARBAGE | _damaged(VALID_CONTROL) | CONTROL_JSON, PER_SUBJECT) if control_ok(p)
        ],
        durable.work_subject(subjects.pre("text")): [
            p for p in _corpus(GARBAGE | _damaged(VALID_DURABLE_PART), PER_SUBJECT) if _harmless_part(p)
        ],
    }


async def _send(mesh: Mesh, corpora: dict[str, list[bytes]], seen: Counter[str]) -> list[str]:
    """Send every corpus as the gateway user; tally the replies; return the replies that are wrong."""
    nc = await nats.connect(mesh.nats_env("gateway")["LOOM_NATS_URL"], inbox_prefix=b"_INBOX.gateway")
    wrong = []
    try:
        js = nc.jetstream()
        for subject, payloads in corpora.items():
            kind = subject.split(".")[1]
            for payload in payloads:
                if kind == "tel":
                    await nc.publish(subject, payload)
                    seen["tel published"] += 1
                elif kind == "work":
                    await js.publish(subject, payload)
                    seen["work published"] += 1
                else:  # fb and models: a request, answered
                    reply = await nc.request(subject, payload, timeout=10)
                    code = (reply.headers or {}).get(NATS_ERROR_CODE, "")
                    if kind == "fb":
                        result = json.loads(reply.data)["result"]
                        seen[f"fb {result}"] += 1
                        if result not in ("invalid", "unknown_request", "duplicate", "joined"):
                            seen["fb other"] += 1
                    else:
                        seen[f"control {code or 'OK'}"] += 1
                        if not code or code.startswith("5"):
                            wrong.append(f"{subject} {payload[:60]!r}: {code or reply.data[:80]!r}")
        # The monitor still takes telemetry: a last valid event shows up in its counter.
        await nc.publish(subjects.telemetry("gateway"), VALID_EVENT)
        await nc.flush()
    finally:
        await nc.close()
    return wrong


def test_garbage_on_feedback_telemetry_model_control_and_work_subjects(mesh: Mesh) -> None:
    pipelines, models = _names(mesh)
    corpora = _corpora(pipelines, models)
    assert all(len(c) >= PER_SUBJECT // 2 for c in corpora.values()), {s: len(c) for s, c in corpora.items()}
    probe = {"service": "fuzz", "stage": "gateway", "pipeline": "fuzz-telemetry", "code": "OK"}
    events = metric(mesh.monitor_http, "loom_monitor_events_total", **probe)
    before = _log_sizes(mesh)
    with recording("nats-monitor-inference-work", per_subject={s: len(c) for s, c in corpora.items()}) as seen:
        wrong = asyncio.run(_send(mesh, corpora, seen))
    print(f"\nfuzz-nats: {dict(seen)}")
    assert not wrong, "\n".join(wrong[:10])
    assert seen["fb other"] == 0, dict(seen)
    assert eventually(lambda: metric(mesh.monitor_http, "loom_monitor_events_total", **probe) > events or None)
    _still_serving(mesh, before)
