"""Model versions in the inference service: Triton control, canary routing, shadow copies, live reloads.

A real nats-server, a real tritonserver in explicit model-control mode on a
temporary copy of ``deploy/triton/minilm`` (version 1: int8 ONNX, version 2:
fp32 ONNX; when ``make models`` has not built version 2's ``model.onnx`` yet,
version 2 is a copy of version 1's folder: a real model with the same
weights), and the inference service as a process. The registry record is
written with :class:`RegistryStore`, as the admin API would.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from nats.aio.msg import Msg

from services.common import envelope, subjects
from services.common.bus import Bus
from services.common.errors import InvalidArgument, NotFound
from services.common.launch.mesh import ROOT
from services.common.launch.procs import ManagedProcess
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.registry.schema import Canary, ModelRecord, Shadow, TrafficPolicy, VersionMeta
from services.common.registry.store import RegistryStore
from services.common.tensors import from_numpy
from services.common.triton_server import TritonServer
from services.inference import router
from services.preprocess.text import TextTokenizer
from tests.support import (
    copy_model_repository,
    metric,
    start_explicit_triton,
    start_inference_process,
    start_nats,
)

pytestmark = pytest.mark.integration

MODEL = "minilm"
CONTROL_TIMEOUT = 120.0


@dataclass
class Stack:
    nats_url: str
    http: str  # the inference service's /metrics
    triton: TritonServer
    repo: Path
    service: ManagedProcess


def model_repository(dest: Path) -> Path:
    """A copy of minilm's repository folder that this module may change (a broken version, ...)."""
    repo = dest / "repo"
    copy_model_repository(repo / MODEL, ROOT / "deploy" / "triton" / MODEL)
    return repo


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("routing")
    repo = model_repository(workdir)
    nats = start_nats()
    service: ManagedProcess | None = None
    triton: TritonServer | None = None
    try:
        triton = start_explicit_triton(repo, workdir, MODEL)
        service, http_url = start_inference_process(
            workdir,
            nats,  # provisioned; the service logs in as inference, with only its own permissions
            triton.grpc_url,
            LOOM_INFERENCE_MODELS=json.dumps([MODEL]),
            LOOM_INFERENCE_MODEL_REPOSITORY=str(repo),
            LOOM_INFERENCE_MODEL_REFRESH_S="2",  # the reconcile loop notices a restarted Triton soon
            LOOM_INFERENCE_SHADOW_MAX_INFLIGHT="512",  # no copy dropped in these tests
        )
        yield Stack(nats.url, http_url, triton, repo, service)
    finally:
        if service is not None:
            print(service.log_tail(60))
            service.stop()
        if triton is not None:
            print(triton.log_tail(20))
            triton.close()
        nats.stop()


class Client:
    """Sends parts to loom.infer.minilm with route keys and collects them from its own inbox."""

    def __init__(self, bus: Bus, tokenizer: TextTokenizer) -> None:
        self.bus = bus
        self.tokenizer = tokenizer
        self.inbox = bus.new_inbox()
        self.waiting: dict[str, asyncio.Future[pb.Part]] = {}

    async def start(self) -> None:
        await self.bus.nc.subscribe(self.inbox, cb=self._on_part)

    async def _on_part(self, msg: Msg) -> None:
        part = pb.Part.FromString(msg.data)
        fut = self.waiting.pop(part.part_id, None)
        if fut is not None and not fut.done():
            fut.set_result(part)

    def part(self, text: str, key: str = "", *, bypass: bool = True) -> pb.Part:
        part = pb.Part(
            request_id=uuid.uuid4().hex,
            part_id=uuid.uuid4().hex,
            pipeline="test",
            modality="text",
            slip=[subjects.infer(MODEL), self.inbox],
            deadline_unix_ms=envelope.now_ms() + 30_000,
            bypass_cache=bypass,
            route_key=key,
        )
        for name, array in self.tokenizer.encode(text)[0].items():
            part.tensors[name].CopyFrom(from_numpy(array))
        return part

    async def run(self, *parts: pb.Part) -> list[pb.Part]:
        loop = asyncio.get_running_loop()
        futures = [self.waiting.setdefault(p.part_id, loop.create_future()) for p in parts]
        for part in parts:
            await self.bus.publish(subjects.infer(MODEL), part.SerializeToString())
        await self.bus.nc.flush()
        return list(await asyncio.wait_for(asyncio.gather(*futures), 60))

    async def control(self, versions: list[str], model: str = MODEL) -> list[str]:
        body = json.dumps({"model": model, "versions": versions}).encode()
        reply = await self.bus.request(subjects.model_query("control"), body, timeout=CONTROL_TIMEOUT)
        answer = json.loads(reply.data)
        assert answer["model"] == model
        return list(answer["ready"])

    async def ready_versions(self) -> list[str]:
        reply = await self.bus.request(subjects.model_query("list"), b"", timeout=10)
        (entry,) = [m for m in json.loads(reply.data) if m["name"] == MODEL]
        return list(entry["versions"])


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer()


@pytest.fixture
async def client(stack: Stack, tokenizer: TextTokenizer) -> AsyncIterator[Client]:
    bus = Bus("test-client")
    await bus.connect(stack.nats_url, timeout=10)
    c = Client(bus, tokenizer)
    await c.start()
    yield c
    await bus.close()


@pytest.fixture
async def registry(client: Client) -> AsyncIterator[RegistryStore]:
    store = RegistryStore(client.bus, service="test")
    await store.start(watch=False)
    yield store
    await store.stop()


def record(policy: TrafficPolicy, *, retired: tuple[str, ...] = ()) -> ModelRecord:
    versions = {
        v: VersionMeta(version=v, semver=f"{v}.0.0", state="retired" if v in retired else "active") for v in ("1", "2")
    }
    return ModelRecord(name=MODEL, versions=versions, policy=policy)


async def put(registry: RegistryStore, rec: ModelRecord) -> None:
    await registry.update(MODEL, lambda _: rec)


async def until(check: Callable[[], bool | Awaitable[bool]], timeout: float = 60.0, what: str = "condition") -> None:
    """Poll ``check`` (plain or async) until it is true; bounded."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = check()
        if not isinstance(value, bool):
            value = await value
        if value:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f}s")
        await asyncio.sleep(0.2)


async def serving(client: Client, versions: list[str]) -> bool:
    return await client.ready_versions() == versions


def answered(part: pb.Part) -> pb.Part:
    assert not part.HasField("error"), part.error
    assert part.model == MODEL and part.tensors["embedding"].shape == [384]
    return part


async def test_control_loads_exactly_the_versions_asked(stack: Stack, client: Client) -> None:
    assert await client.ready_versions() == ["1"]  # what config.pbtxt names
    assert await client.control(["1", "2"]) == ["1", "2"]
    assert await client.ready_versions() == ["1", "2"]
    assert await client.control(["2", "1"]) == ["1", "2"]  # already served: nothing reloads
    with pytest.raises(NotFound, match="'nope' is not served"):
        await client.control(["1"], model="nope")
    with pytest.raises(InvalidArgument, match="non-empty list"):
        await client.control([])
    with pytest.raises(InvalidArgument, match="positive integers"):
        await client.control(["v2"])
    # A version with no folder: Triton skips it silently, the service says so.
    with pytest.raises(InvalidArgument, match="missing: 7"):
        await client.control(["1", "2", "7"])
    assert await client.ready_versions() == ["1", "2"]


async def test_canary_takes_its_share_by_route_key(client: Client, registry: RegistryStore) -> None:
    await client.control(["1", "2"])
    policy = TrafficPolicy(stable="1", canary=Canary(version="2", weight=10))
    await put(registry, record(policy))
    keys = [f"user-{i}" for i in range(300)]
    expected = {k: router.choose(policy, model=MODEL, route_key=k, tokens=None, inflight=1).version for k in keys}
    canary_key = next(k for k in keys if expected[k] == "2")

    async def canary_seen() -> bool:  # the service follows the registry within moments
        (probe,) = await client.run(client.part("are you the canary?", canary_key))
        return answered(probe).model_version == "2"

    await until(canary_seen, what="the service routing by the new record")

    texts = [f"sentence number {i} about routing" for i in range(len(keys))]
    first = await client.run(*(client.part(t, k) for t, k in zip(texts, keys, strict=True)))
    got = {k: answered(p).model_version for k, p in zip(keys, first, strict=True)}
    assert got == expected  # each key where its bucket says
    share = sum(v == "2" for v in got.values()) / len(keys)
    assert 0.04 <= share <= 0.18, share  # 10 % of 300 keys
    for key, part in zip(keys, first, strict=True):
        assert part.notes["inference.route"] == ("canary" if expected[key] == "2" else "stable")
    # Sticky: the same keys with other texts meet the same versions.
    again = await client.run(*(client.part(f"another text {i}", k) for i, k in enumerate(keys)))
    assert {k: answered(p).model_version for k, p in zip(keys, again, strict=True)} == expected


async def test_shadow_gets_a_copy_and_the_caller_only_the_answer(
    stack: Stack, client: Client, registry: RegistryStore
) -> None:
    await client.control(["1", "2"])
    await put(registry, record(TrafficPolicy(stable="1", shadow=Shadow(version="2", percent=100))))
    events: list[pb.TelemetryEvent] = []

    async def on_event(msg: Msg) -> None:
        event = pb.TelemetryEvent.FromString(msg.data)
        if event.stage == f"loom.shadow.{MODEL}":
            events.append(event)

    await client.bus.nc.subscribe(subjects.telemetry("inference"), cb=on_event)

    def copies(result: str) -> float:
        return metric(stack.http, "loom_shadow_total", model=MODEL, version="2", result=result)

    async def shadow_seen() -> bool:
        before = copies("ok")
        answered((await client.run(client.part("is anyone watching?")))[0])
        await asyncio.sleep(0.3)
        return copies("ok") > before

    await until(shadow_seen, what="the service mirroring to the shadow")
    ok, errors = copies("ok"), copies("error")
    agreement_count = metric(stack.http, "loom_shadow_agreement_count", model=MODEL, version="2")

    parts = await client.run(*(client.part(f"mirror this text number {i}", f"k{i}") for i in range(40)))
    for part in parts:
        assert answered(part).model_version == "1"  # the answering version only
        assert part.notes["inference.route"] == "stable"
    ids = {p.request_id for p in parts}

    def mine() -> list[pb.TelemetryEvent]:
        return [e for e in events if e.request_id in ids]

    await until(lambda: len(mine()) == 40, what="a shadow telemetry event per part")
    assert {(e.model, e.model_version, e.code) for e in mine()} == {(MODEL, "2", "OK")}
    # int8 against fp32 (or the same weights when version 2 is a stand-in): close, not identical.
    scores = [e.stats["agreement"] for e in mine()]
    assert min(scores) > 0.9, scores
    # Copies of the probes may still land in the counters: at least these 40, and nothing failed or dropped.
    assert copies("ok") - ok >= 40
    assert metric(stack.http, "loom_shadow_agreement_count", model=MODEL, version="2") - agreement_count >= 40
    assert copies("error") == errors and copies("dropped") == 0
    await put(registry, record(TrafficPolicy(stable="1")))


async def test_reloads_under_continuous_load_fail_no_part(client: Client, registry: RegistryStore) -> None:
    await put(registry, record(TrafficPolicy(stable="1")))
    await client.control(["1", "2"])
    answers: list[pb.Part] = []
    stop = asyncio.Event()

    async def keep_asking(worker: int) -> None:
        i = 0
        while not stop.is_set():
            (part,) = await client.run(client.part(f"load {worker} {i}", f"w{worker}-{i}"))
            answers.append(part)
            i += 1

    workers = [asyncio.create_task(keep_asking(w)) for w in range(4)]
    try:
        await until(lambda: len(answers) >= 20, what="load running")
        # Through the registry: retire version 2, then bring it back; the reconcile loop loads.
        await put(registry, record(TrafficPolicy(stable="1"), retired=("2",)))
        await until(lambda: serving(client, ["1"]), what="version 2 unloaded")
        mark = len(answers)
        await put(registry, record(TrafficPolicy(stable="1")))
        await until(lambda: serving(client, ["1", "2"]), what="version 2 loaded again")
        # Through control requests.
        assert await client.control(["1"]) == ["1"]
        assert await client.control(["1", "2"]) == ["1", "2"]
        await until(lambda: len(answers) >= mark + 20, what="load after the reloads")
    finally:
        stop.set()
        await asyncio.gather(*workers)
    failed = [p.error for p in answers if p.HasField("error")]
    assert not failed, failed[:3]
    assert {p.model_version for p in answers} == {"1"}


async def test_a_canary_triton_does_not_serve_falls_back_to_stable(
    stack: Stack, client: Client, registry: RegistryStore
) -> None:
    await put(registry, record(TrafficPolicy(stable="1", canary=Canary(version="2", weight=100))))
    assert await client.control(["1"]) == ["1"]  # stands against the registry for a while
    before = metric(stack.http, "loom_route_total", model=MODEL, version="1", reason="fallback")
    parts = await client.run(*(client.part(f"where is version 2? {i}", f"f{i}") for i in range(10)))
    assert {answered(p).model_version for p in parts} == {"1"}
    assert {p.notes["inference.route"] for p in parts} == {"fallback"}
    assert metric(stack.http, "loom_route_total", model=MODEL, version="1", reason="fallback") - before == 10
    assert await client.control(["1", "2"]) == ["1", "2"]
    parts = await client.run(*(client.part(f"version 2 is back {i}", f"f{i}") for i in range(10)))
    assert {(answered(p).model_version, p.notes["inference.route"]) for p in parts} == {("2", "canary")}


async def test_a_failed_load_keeps_the_served_versions(stack: Stack, client: Client, registry: RegistryStore) -> None:
    await put(registry, record(TrafficPolicy(stable="1", canary=Canary(version="2", weight=50))))
    await client.control(["1", "2"])
    broken = stack.repo / MODEL / "3"
    broken.mkdir(exist_ok=True)
    (broken / "model.py").write_text('raise RuntimeError("version 3 is broken on purpose")\n')
    try:
        with pytest.raises(InvalidArgument, match="broken on purpose") as err:
            await client.control(["1", "2", "3"])
    finally:
        shutil.rmtree(broken)
    assert "\n" not in str(err.value)  # Triton's traceback comes as one header line
    assert await client.ready_versions() == ["1", "2"]
    parts = await client.run(*(client.part(f"still here {i}", f"s{i}") for i in range(40)))
    assert {answered(p).model_version for p in parts} == {"1", "2"}


async def test_a_restarted_triton_gets_the_registry_versions_back(
    stack: Stack, client: Client, registry: RegistryStore
) -> None:
    await put(registry, record(TrafficPolicy(stable="1", canary=Canary(version="2", weight=50))))
    await client.control(["1", "2"])
    stack.triton.stop()
    stack.triton.start()
    stack.triton.wait_ready(timeout=120)
    # Triton starts with what config.pbtxt names; the service's periodic reconcile adds version 2.
    await until(lambda: serving(client, ["1", "2"]), timeout=120, what="version 2 back")
    parts = await client.run(*(client.part(f"after the restart {i}", f"r{i}") for i in range(20)))
    assert {answered(p).model_version for p in parts} == {"1", "2"}
