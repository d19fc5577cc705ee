"""Pipeline specs in JetStream KV and the claim check, against a real nats-server."""

from __future__ import annotations

import asyncio
import os

import pytest

from services.common.bus import Bus
from services.common.claims import ClaimCheck
from services.common.errors import InvalidArgument, Unavailable
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.pipeline_store import PipelineStore
from services.common.pipelines import PipelineRegistry, default_dir
from services.common.tensors import from_numpy, to_numpy
from tests.support import NatsHandle

pytestmark = pytest.mark.integration

SPEC = "name: echo\ninputs:\n  text: {modality: text, stages: [pre.text]}\n"


async def _store(url: str, name: str) -> tuple[Bus, PipelineStore]:
    bus = Bus(name)
    await bus.connect(url, timeout=10)
    store = PipelineStore(bus, name, "loom_pipelines", PipelineRegistry([]))
    await store.start()
    return bus, store


async def test_every_watcher_follows_kv_and_keeps_the_last_good_spec(nats_server: NatsHandle) -> None:
    (bus_a, a), (bus_b, b) = [await _store(nats_server.url, n) for n in ("gateway", "fusion")]
    try:
        assert await a.seed(default_dir()) == ["content", "embed"]
        assert await a.seed(default_dir()) == []  # a restart does not overwrite what KV holds
        await b.wait_for(["content", "embed"])

        _, rev = await a.apply(SPEC)
        await b.wait_for(["echo"])
        assert b.registry.get("echo").inputs["text"].stages == ["pre.text"]

        # A change by any writer reaches every watcher, no restart.
        await a.apply(SPEC.replace("[pre.text]", "[pre.text, infer.minilm]"))
        async with asyncio.timeout(5):
            while b.registry.get("echo").inputs["text"].stages != ["pre.text", "infer.minilm"]:
                await asyncio.sleep(0.02)

        # An invalid spec is refused where it is applied, and KV keeps the old one.
        with pytest.raises(InvalidArgument, match="modality"):
            await a.apply(SPEC.replace("modality: text", "modality: smell"))
        # Written behind the store's back, it is rejected by the watchers, who keep serving the last good spec.
        await a.kv.put("echo", b"name: echo\ninputs: nonsense\n")
        await asyncio.sleep(0.3)
        assert b.registry.get("echo").inputs["text"].stages == ["pre.text", "infer.minilm"]
        text, latest = await a.read("echo")
        assert "nonsense" in text and latest > rev

        await a.kv.delete("echo")
        async with asyncio.timeout(5):
            while b.registry.find("echo") is not None:
                await asyncio.sleep(0.02)
    finally:
        for store, bus in ((a, bus_a), (b, bus_b)):
            await store.stop()
            await bus.close()


async def test_claim_check_moves_large_fields_through_the_object_store(nats_server: NatsHandle) -> None:
    import numpy as np

    bus = Bus("gateway")
    await bus.connect(nats_server.url, timeout=10)
    claims = ClaimCheck(bus, "gateway", "loom_blobs", ttl_s=60)
    await claims.start()
    try:
        assert claims.threshold == bus.nc.max_payload - 64 * 1024
        big = os.urandom(3 * 1024 * 1024)
        image = np.random.default_rng(0).integers(0, 255, size=(960, 720, 3), dtype=np.uint8)
        part = pb.Part(request_id="r1", part_id="image", data=big)
        part.tensors["image"].CopyFrom(from_numpy(image))
        part.tensors["small"].CopyFrom(from_numpy(np.arange(4, dtype=np.int64)))
        await claims.offload(part)
        assert part.ByteSize() <= claims.threshold
        assert not part.data and part.blob.size == len(big)
        assert part.tensors["small"].data  # small fields stay in the message

        # What travels is a plain message; the next stage gets the bytes back.
        received = pb.Part.FromString(part.SerializeToString())
        await claims.restore(received)
        assert received.data == big and not received.HasField("blob")
        assert np.array_equal(to_numpy(received.tensors["image"]), image)

        # Fetched once, then deleted: a second fetch says what happened.
        with pytest.raises(Unavailable, match="gone"):
            await claims.get(part.blob)

        small = pb.Part(request_id="r2", part_id="text", text="hello")
        await claims.offload(small)
        assert not small.HasField("blob")
    finally:
        await bus.close()
