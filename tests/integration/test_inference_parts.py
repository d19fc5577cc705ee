"""The inference service as a real process between a real nats-server and a real tritonserver.

Parts with real MiniLM tokens go to ``loom.infer.minilm`` with a routing slip
that ends in the test's own inbox. Checked: concurrent parts are micro-batched
and answer exactly what one-by-one parts answer; a repeated part is a cache
hit; ``bypass_cache`` skips the cache; a bad part fails alone; the
``loom.models.*`` questions answer.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from nats.aio.msg import Msg
from tritonclient.grpc import service_pb2

from services.common import envelope, subjects
from services.common.bus import Bus
from services.common.errors import NotFound
from services.common.launch.mesh import ROOT
from services.common.launch.procs import ManagedProcess
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.tensors import from_numpy, to_numpy
from services.common.triton_server import TritonServer
from services.inference.models_api import MODEL_VERSION_HEADER
from services.preprocess.text import TextTokenizer
from tests.support import metric, read_spans, start_explicit_triton, start_inference_process, start_nats

pytestmark = pytest.mark.integration

MODEL = "minilm"
BUCKET = "loom_cache_test"


@dataclass
class Stack:
    nats_url: str
    http: str  # the inference service's /metrics
    traces: Path  # the inference service writes its spans here


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("inference")
    (workdir / "traces").mkdir()
    nats = start_nats()
    service: ManagedProcess | None = None
    triton: TritonServer | None = None
    try:
        # Explicit model control: only minilm loads, whatever else the repository holds.
        triton = start_explicit_triton(ROOT / "deploy" / "triton", workdir, MODEL, timeout=90)
        service, http_url = start_inference_process(
            workdir,
            nats.url,
            triton.grpc_url,
            LOOM_INFERENCE_MODELS=json.dumps([MODEL, "ocr"]),  # ocr is served but not loaded in Triton
            LOOM_INFERENCE_CACHE_BUCKET=BUCKET,
            LOOM_TRACES_FILE=str(workdir / "traces" / "inference.jsonl"),
        )
        yield Stack(nats.url, http_url, workdir / "traces")
    finally:
        if service is not None:
            print(service.log_tail(40))
            service.stop()
        if triton is not None:
            triton.close()
        nats.stop()


class Client:
    """Sends parts to loom.infer.minilm and collects them from its own inbox."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.inbox = bus.new_inbox()
        self.waiting: dict[str, asyncio.Future[pb.Part]] = {}

    async def start(self) -> None:
        await self.bus.nc.subscribe(self.inbox, cb=self._on_part)

    async def _on_part(self, msg: Msg) -> None:
        part = pb.Part.FromString(msg.data)
        self.waiting.pop(part.part_id).set_result(part)

    def part(self, tensors: dict[str, np.ndarray], *, bypass: bool = False) -> pb.Part:
        part = pb.Part(
            request_id=uuid.uuid4().hex,
            part_id=uuid.uuid4().hex,
            pipeline="test",
            modality="text",
            slip=[subjects.infer(MODEL), self.inbox],
            deadline_unix_ms=envelope.now_ms() + 30_000,
            bypass_cache=bypass,
        )
        for name, array in tensors.items():
            part.tensors[name].CopyFrom(from_numpy(array))
        return part

    async def run(self, *parts: pb.Part) -> list[pb.Part]:
        """Publish all at once (they arrive together), then wait for every answer."""
        loop = asyncio.get_running_loop()
        futures = [self.waiting.setdefault(p.part_id, loop.create_future()) for p in parts]
        for part in parts:
            await self.bus.publish(subjects.infer(MODEL), part.SerializeToString())
        await self.bus.nc.flush()
        return list(await asyncio.wait_for(asyncio.gather(*futures), 30))


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[Client]:
    bus = Bus("test-client")
    await bus.connect(stack.nats_url, timeout=10)
    c = Client(bus)
    await c.start()
    yield c
    await bus.close()


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer()


def embedding(part: pb.Part) -> np.ndarray:
    assert not part.HasField("error"), part.error
    assert part.model == MODEL and part.model_version == "1"
    return to_numpy(part.tensors["embedding"])


def batch_counts(stack: Stack) -> tuple[float, float]:
    """(batches sent to Triton, of which single-part) so far."""
    total = metric(stack.http, "loom_inference_batch_size_count", model=MODEL)
    return total, metric(stack.http, "loom_inference_batch_size_bucket", model=MODEL, le="1.0")


async def test_concurrent_parts_are_batched_and_match_one_by_one(
    stack: Stack, client: Client, tokenizer: TextTokenizer
) -> None:
    texts = [" ".join(f"word{j}" for j in range(2 * i + 1)) + f" sentence {i}." for i in range(16)]
    tensors = [tokenizer.encode(t)[0] for t in texts]
    bypass_before = metric(stack.http, "loom_inference_cache_requests_total", model=MODEL, result="bypass")
    singles = []
    for t in tensors:  # one at a time: each goes to Triton alone
        (answer,) = await client.run(client.part(t, bypass=True))
        assert answer.notes["inference.cache"] == "bypass"
        singles.append(embedding(answer))
    assert singles[0].shape == (384,)

    # Whether a burst meets inside the batch window depends on the CPU being free:
    # a few bursts on a busy 2-core machine make it certain.
    for _ in range(5):
        total, alone = batch_counts(stack)
        answers = await client.run(*(client.part(t, bypass=True) for t in tensors))
        for got, single in zip(answers, singles, strict=True):
            np.testing.assert_allclose(embedding(got), single, atol=1e-4)
        total_after, alone_after = batch_counts(stack)
        if (total_after - total) - (alone_after - alone) > 0:
            break
    else:
        pytest.fail("no batch of more than one part in five bursts of 16")
    assert total_after - total < 16  # 16 parts took fewer Triton requests
    bypass_after = metric(stack.http, "loom_inference_cache_requests_total", model=MODEL, result="bypass")
    assert bypass_after - bypass_before >= 32


async def test_a_repeated_part_is_a_cache_hit(stack: Stack, client: Client, tokenizer: TextTokenizer) -> None:
    tensors, _ = tokenizer.encode(f"cache me if you can {uuid.uuid4().hex}")

    def count(result: str) -> float:
        return metric(stack.http, "loom_inference_cache_requests_total", model=MODEL, result=result)

    hits, misses = count("hit"), count("miss")
    (first,) = await client.run(client.part(tensors))
    assert first.notes["inference.cache"] == "miss"
    assert count("miss") == misses + 1
    # The result is stored in the background, after the answer left: allow it a moment.
    for _ in range(50):
        (again,) = await client.run(client.part(tensors))
        if again.notes["inference.cache"] == "hit":
            break
        await asyncio.sleep(0.05)
    assert again.notes["inference.cache"] == "hit"
    assert count("hit") == hits + 1
    np.testing.assert_array_equal(embedding(again), embedding(first))

    (bypassed,) = await client.run(client.part(tensors, bypass=True))
    assert bypassed.notes["inference.cache"] == "bypass"
    np.testing.assert_allclose(embedding(bypassed), embedding(first), atol=1e-5)

    kv = await client.bus.nc.jetstream().key_value(BUCKET)
    status = await kv.status()
    assert status.ttl == 600 and status.history == 1


async def test_a_bad_part_fails_alone_in_its_batch(stack: Stack, client: Client, tokenizer: TextTokenizer) -> None:
    good = [tokenizer.encode(f"a perfectly fine sentence number {i}")[0] for i in range(6)]
    # Too long for the model (512 tokens at most), yet padding-compatible with its neighbours:
    # it joins their batch and the model rejects the whole request.
    ids = np.full(600, 1000, np.int64)
    ids[0], ids[-1] = 101, 102
    bad = {"input_ids": ids, "attention_mask": np.ones(600, np.int64), "token_type_ids": np.zeros(600, np.int64)}
    parts = [*good[:3], bad, *good[3:]]
    for _ in range(5):
        started_ns = time.time_ns()
        answers = await client.run(*(client.part(t, bypass=True) for t in parts))
        assert answers[3].error.code == "INVALID_ARGUMENT", answers[3].error
        assert "exceeds the model maximum" in answers[3].error.message
        for answer in answers[:3] + answers[4:]:
            assert embedding(answer).shape == (384,)
        if await shared_batch_failed(stack, started_ns):
            break
    else:
        pytest.fail("the bad part never shared a batch in five tries")


async def shared_batch_failed(stack: Stack, since_ns: int) -> bool:
    """Did a Triton call for more than one part fail with INVALID_ARGUMENT (spans are written every 200 ms)?"""
    for _ in range(20):
        for span in read_spans(stack.traces):
            attrs = span["attributes"]
            if (
                span["name"] == f"triton infer {MODEL}"
                and span["start_ns"] >= since_ns
                and attrs.get("loom.batch_size", 1) > 1
                and attrs.get("error.type") == "INVALID_ARGUMENT"
            ):
                return True
        await asyncio.sleep(0.1)
    return False


async def test_model_questions(stack: Stack, client: Client) -> None:
    bus = client.bus
    reply = await bus.request(subjects.model_query("metadata"), MODEL.encode(), timeout=10)
    meta = service_pb2.ModelMetadataResponse.FromString(reply.data)
    assert meta.name == MODEL and list(meta.versions) == ["1"]
    assert {i.name for i in meta.inputs} == {"input_ids", "attention_mask", "token_type_ids"}
    assert [(o.name, o.datatype, list(o.shape)) for o in meta.outputs] == [("embedding", "FP32", [-1, 384])]

    reply = await bus.request(
        subjects.model_query("ready"), MODEL.encode(), timeout=10, headers={MODEL_VERSION_HEADER: "1"}
    )
    assert service_pb2.ModelReadyResponse.FromString(reply.data).ready is True
    reply = await bus.request(subjects.model_query("ready"), b"ocr", timeout=10)
    assert service_pb2.ModelReadyResponse.FromString(reply.data).ready is False

    reply = await bus.request(subjects.model_query("list"), b"", timeout=10)
    # ocr is not loaded here: no versions and no config to read its batch size from.
    assert json.loads(reply.data) == [
        {"name": MODEL, "versions": ["1"], "max_batch_size": 32},
        {"name": "ocr", "versions": []},
    ]

    for op in ("metadata", "ready"):
        with pytest.raises(NotFound, match=r"'nope' is not served; served: minilm, ocr"):
            await bus.request(subjects.model_query(op), b"nope", timeout=10)
