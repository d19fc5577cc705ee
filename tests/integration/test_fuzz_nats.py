"""Garbage on the bus: the durable ingress and a stage survive whatever a publisher sends.

Hypothesis generates a fixed (derandomized) corpus: random bytes, truncated and bit-flipped
``PredictRequest``/``Part`` messages, a string field carrying invalid UTF-8 (a wrong wire type for
the schema) and one huge text field. It goes onto ``loom.req.embed`` (the durable ingress,
JetStream) and ``loom.pre.text`` (the text preprocess stage, core NATS) of the session mesh. Then:
every process still runs, a normal predict still answers, and every undecodable ingress message
is in the dead-letter queue (``GET /v1/admin/dlq?stage=ingress``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import nats
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from services.common import durable, subjects
from services.common.launch.mesh import Mesh
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.pb.loom.v1 import gateway_pb2
from tests.support import eventually, http_json, predict_http

pytestmark = pytest.mark.integration

PER_SUBJECT = 100
REPLICAS = ("gateway-0", "preprocess-0")
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


async def _publish(url: str, ingress: list[bytes], stage: list[bytes]) -> list[int]:
    """Publish both corpora; return the stream sequences of the ingress payloads that do not decode."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
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
        return undecodable
    finally:
        await nc.close()


def test_garbage_on_the_bus_is_dead_lettered_or_dropped(mesh: Mesh) -> None:
    ingress = [*_corpus(GARBAGE | _damaged(VALID_REQUEST), PER_SUBJECT), _request("x" * HUGE)]
    stage = [p for p in _corpus(GARBAGE | _damaged(VALID_PART), PER_SUBJECT) if _harmless_part(p)]
    logs = {r: mesh.workdir / "logs" / f"{r}.log" for r in REPLICAS}
    before = {r: path.stat().st_size for r, path in logs.items()}
    undecodable = asyncio.run(_publish(mesh.nats_url, ingress, stage))
    print(f"\nfuzz-nats: ingress={len(ingress)} (undecodable {len(undecodable)}) stage={len(stage)}")
    assert undecodable, "the corpus should hold undecodable requests"

    def dead_lettered() -> Any:
        status, body = http_json(f"{mesh.gateway_http}/v1/admin/dlq?stage=ingress&limit=1000")
        assert status == 200, body
        seen = {d["origin_seq"] for d in body["dead_letters"] if "undecodable" in d["reason"]}
        return set(undecodable) <= seen or None

    eventually(dead_lettered, timeout=60)
    status, answer = predict_http(mesh.gateway_http, "still answering after the garbage")
    assert status == 200, answer
    assert len(answer["outputs"]["text"]["embedding"]) == 384
    for replica, path in logs.items():
        assert mesh.services[replica].running(), f"{replica} died on the garbage"
        # An exception in a NATS callback does not end the process, only shows in its log.
        with path.open("rb") as log:
            log.seek(before[replica])
            written = log.read().decode("utf-8", "replace")
        assert "Traceback" not in written, f"{replica} raised on the garbage:\n{written[-3000:]}"
