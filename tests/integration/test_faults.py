"""Faults around Triton: per-version circuit breakers, canary fallback, a Triton killed under load, retries.

The cheapest stack that shows it: a real nats-server, a real tritonserver in
explicit model-control mode serving ``minilm`` version 1 (a temporary copy of
``deploy/triton/minilm``), and the inference service as its own process. Parts
go straight to ``loom.infer.minilm`` with this test's inbox as the next step,
so every answer and every error comes back here, with its arrival time.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
from nats.aio.msg import Msg
from prometheus_client import REGISTRY

from services.common import durable, envelope, subjects
from services.common.bus import Bus
from services.common.errors import Unavailable
from services.common.launch.mesh import ROOT
from services.common.launch.procs import ManagedProcess
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.registry.schema import Canary, ModelRecord, TrafficPolicy, VersionMeta
from services.common.registry.store import RegistryStore
from services.common.retry import NO_RESPONDERS, Backoff
from services.common.tensors import from_numpy
from services.common.triton_server import TritonServer
from services.gateway.dlq import DeadLetters
from services.inference import router
from services.preprocess.text import TextTokenizer
from tests.support import copy_model_repository, metric, start_explicit_triton, start_inference_process, start_nats

pytestmark = pytest.mark.integration

MODEL = "minilm"
DEADLINE_MS = 2000
RESET_S = 1.0  # the breaker's open time: short, so half-open probes come soon after Triton returns


@dataclass
class Stack:
    nats_url: str
    http: str  # the inference service's /metrics
    triton: TritonServer
    service: ManagedProcess


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("faults")
    repo = workdir / "repo"
    copy_model_repository(repo / MODEL, ROOT / "deploy" / "triton" / MODEL)
    nats = start_nats()
    service: ManagedProcess | None = None
    triton: TritonServer | None = None
    try:
        triton = start_explicit_triton(repo, workdir, MODEL)
        service, http_url = start_inference_process(
            workdir,
            nats.url,
            triton.grpc_url,
            LOOM_INFERENCE_MODELS=json.dumps([MODEL]),
            LOOM_INFERENCE_BREAKER_FAILURES="3",
            LOOM_INFERENCE_BREAKER_RESET_S=str(RESET_S),
            # A control request's versions stand for the whole module: version 2 stays unloaded
            # although the registry lists it (a canary Triton does not serve).
            LOOM_INFERENCE_CONTROL_HOLD_S="600",
            LOOM_INFERENCE_RECONNECT_BACKOFF_MS="500",
            # Durable parts: two quick tries, then the dead-letter stream.
            LOOM_DURABLE_MAX_DELIVER="2",
            LOOM_DURABLE_BACKOFF_S="0.2",
            LOOM_DURABLE_BACKOFF_MAX_S="0.5",
        )
        yield Stack(nats.url, http_url, triton, service)
    finally:
        if service is not None:
            print(service.log_tail(60))
            service.stop()
        if triton is not None:
            print(triton.log_tail(20))
            triton.close()
        nats.stop()


@dataclass
class Outcome:
    key: str
    deadline_ms: int  # the part's deadline, unix ms
    arrived_ms: float  # when its answer came back here, unix ms
    part: pb.Part | None  # None: no answer at all (lost)

    @property
    def code(self) -> str:
        if self.part is None:
            return "LOST"
        return self.part.error.code if self.part.HasField("error") else "OK"


class Client:
    """Sends tokenized texts to loom.infer.minilm and collects the parts on its own inbox."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.tokens = TextTokenizer().encode("is the model there?")[0]
        self.inbox = bus.new_inbox()
        self.waiting: dict[str, asyncio.Future[tuple[pb.Part, float]]] = {}

    async def start(self) -> None:
        await self.bus.nc.subscribe(self.inbox, cb=self._on_part)

    async def _on_part(self, msg: Msg) -> None:
        part = pb.Part.FromString(msg.data)
        fut = self.waiting.pop(part.part_id, None)
        if fut is not None and not fut.done():
            fut.set_result((part, time.time() * 1000.0))

    async def ask(self, key: str) -> Outcome:
        part = pb.Part(
            request_id=uuid.uuid4().hex,
            part_id=uuid.uuid4().hex,
            pipeline="test",
            modality="text",
            slip=[subjects.infer(MODEL), self.inbox],
            deadline_unix_ms=envelope.now_ms() + DEADLINE_MS,
            bypass_cache=True,
            route_key=key,
        )
        for name, array in self.tokens.items():
            part.tensors[name].CopyFrom(from_numpy(array))
        fut = self.waiting.setdefault(part.part_id, asyncio.get_running_loop().create_future())
        await self.bus.publish(subjects.infer(MODEL), part.SerializeToString())
        try:
            answer, arrived = await asyncio.wait_for(fut, DEADLINE_MS / 1000.0 + 3.0)
        except TimeoutError:
            self.waiting.pop(part.part_id, None)
            return Outcome(key, part.deadline_unix_ms, time.time() * 1000.0, None)
        return Outcome(key, part.deadline_unix_ms, arrived, answer)

    async def control(self, versions: list[str]) -> list[str]:
        body = json.dumps({"model": MODEL, "versions": versions}).encode()
        reply = await self.bus.request(subjects.model_query("control"), body, timeout=120)
        return list(json.loads(reply.data)["ready"])


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[Client]:
    bus = Bus("test-faults")
    await bus.connect(stack.nats_url, timeout=10)
    c = Client(bus)
    await c.start()
    yield c
    await bus.close()


async def put_policy(client: Client, policy: TrafficPolicy) -> None:
    versions = {v: VersionMeta(version=v, semver=f"{v}.0.0", state="active") for v in ("1", "2")}
    registry = RegistryStore(client.bus, service="test")
    await registry.start(watch=False)
    try:
        await registry.update(MODEL, lambda _: ModelRecord(name=MODEL, versions=versions, policy=policy))
    finally:
        await registry.stop()


async def until(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        value = check() if callable(check) else check
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f}s")
        await asyncio.sleep(0.1)


def breaker(stack: Stack, version: str) -> float:
    return metric(stack.http, "loom_breaker_state", model=MODEL, version=version)


def transitions(stack: Stack, version: str, to: str) -> float:
    return metric(stack.http, "loom_breaker_transitions_total", model=MODEL, version=version, to=to)


async def test_a_canary_triton_does_not_serve_opens_its_breaker_and_falls_back_to_stable(
    stack: Stack, client: Client
) -> None:
    assert await client.control(["1"]) == ["1"]  # version 2 is not loaded, and stays so (hold)
    policy = TrafficPolicy(stable="1", canary=Canary(version="2", weight=50))
    await put_policy(client, policy)
    keys = [f"user-{i}" for i in range(200)]
    versions = {k: router.choose(policy, model=MODEL, route_key=k, tokens=None, inflight=1).version for k in keys}
    canary_keys = [k for k in keys if versions[k] == "2"][:12]
    stable_keys = [k for k in keys if versions[k] == "1"][:12]

    async def routed_to_canary() -> bool:  # the service follows the registry within moments
        outcome = await client.ask(canary_keys[0])
        return outcome.part is not None and outcome.part.notes.get("inference.route") == "fallback"

    await until(routed_to_canary, 30, "the service routing by the new record")
    before = metric(stack.http, "loom_route_total", model=MODEL, version="1", reason="fallback")
    outcomes = [await client.ask(k) for k in canary_keys]
    assert {(o.code, o.part.model_version, o.part.notes["inference.route"]) for o in outcomes if o.part} == {
        ("OK", "1", "fallback")
    }
    assert len(outcomes) == 12
    assert metric(stack.http, "loom_route_total", model=MODEL, version="1", reason="fallback") - before == 12
    # Version 2's breaker is open (3 failures in a row, then fail fast); stable's is closed and serves.
    assert breaker(stack, "2") in (1.0, 2.0) and transitions(stack, "2", "open") >= 1
    assert breaker(stack, "1") == 0.0
    stable = [await client.ask(k) for k in stable_keys]
    assert {(o.code, o.part.notes["inference.route"]) for o in stable if o.part} == {("OK", "stable")}


async def test_triton_killed_under_load_fails_fast_then_heals_without_restarting_inference(
    stack: Stack, client: Client
) -> None:
    await put_policy(client, TrafficPolicy(stable="1"))

    async def answered() -> bool:
        return (await client.ask("warm-up")).code == "OK"

    await until(answered, 30, "a first answer")
    pid = stack.service.pid
    retries_before = metric(stack.http, "loom_retries_total", service="inference", step="triton_infer")
    opened_before = transitions(stack, "1", "open")
    closed_before = transitions(stack, "1", "closed")
    probed_before = transitions(stack, "1", "half_open")
    outcomes: list[Outcome] = []
    stop = asyncio.Event()

    async def keep_asking(worker: int) -> None:
        for i in range(5000):  # bounded; the phases below end it much sooner
            if stop.is_set():
                return
            outcomes.append(await client.ask(f"w{worker}-{i}"))
            await asyncio.sleep(0.01)  # a paced client: fail-fast answers must not turn into a busy loop

    def ok_count() -> int:
        return sum(o.code == "OK" for o in outcomes)

    workers = [asyncio.create_task(keep_asking(w)) for w in range(4)]
    try:
        await until(lambda: ok_count() >= 20, 30, "load running")
        assert stack.triton.pid is not None
        os.killpg(stack.triton.pid, signal.SIGKILL)  # Triton and its python stubs, as a crash would
        killed = len(outcomes)

        async def breaker_open() -> bool:
            return await asyncio.to_thread(breaker, stack, "1") == 2.0

        await until(breaker_open, 15, "the breaker of version 1 opening")
        await until(lambda: len(outcomes) >= killed + 40, 15, "callers answered while Triton is down")
        # In a thread: this loop keeps taking answers (and stamping their arrival) meanwhile.
        await asyncio.to_thread(stack.triton.stop)  # reap it, remove its shared memory
        await asyncio.to_thread(stack.triton.start)  # same ports; the inference service is not touched
        await asyncio.to_thread(stack.triton.wait_ready, 120)
        restarted, ready_ms = len(outcomes), time.time() * 1000.0
        await until(
            lambda: sum(o.code == "OK" for o in outcomes[restarted:]) >= 20, 60, "answers after Triton's restart"
        )
    finally:
        stop.set()
        await asyncio.gather(*workers)

    down = outcomes[killed:restarted]
    failed = [o for o in outcomes if o.code != "OK"]
    assert failed, "killing Triton failed no part?"
    assert {o.code for o in failed} == {"UNAVAILABLE"}, {o.code for o in failed}
    late = [(o.arrived_ms - o.deadline_ms) for o in failed if o.arrived_ms > o.deadline_ms]
    assert not late, f"failures after their deadline (ms late): {late[:5]}"
    messages = [o.part.error.message for o in failed if o.part is not None]
    fail_fast = [m for m in messages if f"circuit breaker open for model {MODEL} version 1" in m]
    assert fail_fast and all("next try in" in m for m in fail_fast), messages[:3]
    assert sum(o.code == "OK" for o in down) < len(down)
    healed_ms = min(o.arrived_ms for o in outcomes[restarted:] if o.code == "OK") - ready_ms
    waits = sorted(o.arrived_ms - (o.deadline_ms - DEADLINE_MS) for o in failed)
    print(
        f"\n{len(outcomes)} parts, {len(failed)} failed ({len(fail_fast)} by the open breaker); "
        f"failure arrived after median {waits[len(waits) // 2]:.1f} ms, max {waits[-1]:.1f} ms "
        f"(deadline {DEADLINE_MS} ms); first answer {healed_ms:.0f} ms after Triton was ready again"
    )
    # The first failures were retried (Triton unreachable), then the breaker opened and closed again.
    assert metric(stack.http, "loom_retries_total", service="inference", step="triton_infer") > retries_before
    assert transitions(stack, "1", "open") > opened_before
    assert transitions(stack, "1", "half_open") > probed_before
    assert transitions(stack, "1", "closed") > closed_before
    assert breaker(stack, "1") == 0.0
    # Healed by itself: the same process, which reconnected to the new Triton.
    assert stack.service.pid == pid and stack.service.running()
    tail = outcomes[-10:]
    assert {(o.code, o.part.model_version) for o in tail if o.part} == {("OK", "1")}


async def test_a_request_met_by_no_responders_is_retried_until_the_service_subscribes(stack: Stack) -> None:
    bus = Bus("test-faults-nats")
    await bus.connect(stack.nats_url, timeout=10)
    try:
        subject = f"loom.test.late.{uuid.uuid4().hex[:8]}"
        with pytest.raises(Unavailable, match="no service answers"):
            await bus.request(subject, b"?", timeout=2)  # no retry asked: at once

        async def answer(msg: Msg) -> None:
            await bus.respond(msg, b"here")

        async def subscribe_late() -> None:
            await asyncio.sleep(0.3)
            await bus.subscribe(subject, answer)
            await bus.nc.flush()

        late = asyncio.create_task(subscribe_late())
        # Short, many pauses: the 0.3 s are surely covered, whatever the jitter draws.
        reply = await bus.request(subject, b"?", timeout=5, retry=Backoff(attempts=50, base_s=0.05, cap_s=0.1))
        await late
        assert reply.data == b"here"
        labels = {"service": "test-faults-nats", "step": subject}
        assert (REGISTRY.get_sample_value("loom_retries_total", labels) or 0) >= 1
        # Nobody ever answers: the retries give up with UNAVAILABLE, within the timeout.
        started = time.monotonic()
        with pytest.raises(Unavailable, match="no service answers"):
            await bus.request(subject + ".nobody", b"?", timeout=3, retry=NO_RESPONDERS)
        assert time.monotonic() - started < 3
    finally:
        await bus.close()


async def test_a_durable_part_that_keeps_failing_is_dead_lettered_and_a_replay_finishes_it(
    stack: Stack, client: Client
) -> None:
    js = client.bus.nc.jetstream()
    part = pb.Part(
        request_id=f"dl-{uuid.uuid4().hex[:12]}",
        part_id="text",
        pipeline="test",
        modality="text",
        slip=[subjects.infer(MODEL), subjects.fuse(0)],
        deadline_unix_ms=envelope.now_ms() + 600_000,
        bypass_cache=True,
        durable=True,
    )
    for name, array in client.tokens.items():
        part.tensors[name].CopyFrom(from_numpy(array))
    assert stack.triton.pid is not None
    os.killpg(stack.triton.pid, signal.SIGKILL)
    try:
        ack = await js.publish(durable.work_subject(subjects.infer(MODEL)), part.SerializeToString())
        letters = DeadLetters(client.bus)

        async def dead() -> bool:
            return any(d["origin_seq"] == ack.seq for d in await letters.list(stage="infer_minilm"))

        await until(dead, 30, "the part in the dead-letter stream")
        letter = next(d for d in await letters.list(stage="infer_minilm") if d["origin_seq"] == ack.seq)
        assert letter["reason"].startswith("UNAVAILABLE on each of 2 tries"), letter
        assert letter["deliveries"] == 2 and letter["subject"] == "loom.work.infer.minilm"
    finally:
        await asyncio.to_thread(stack.triton.stop)
        await asyncio.to_thread(stack.triton.start)
        await asyncio.to_thread(stack.triton.wait_ready, 120)

    async def serving() -> bool:
        return (await client.ask("after-restart")).code == "OK"

    await until(serving, 60, "Triton answering again")
    await letters.replay(letter["seq"])
    fused = durable.work_subject(subjects.fuse(0))

    async def forwarded() -> bool:  # no fusion in this stack: the answered part waits on loom.work.fuse.0
        try:
            msg = await js.get_last_msg(durable.WORK_STREAM, fused)
        except Exception:
            return False
        return pb.Part.FromString(msg.data or b"").request_id == part.request_id

    await until(forwarded, 30, "the replayed part answered and passed on")
    answered = pb.Part.FromString((await js.get_last_msg(durable.WORK_STREAM, fused)).data or b"")
    assert not answered.HasField("error") and answered.model_version == "1", answered.error
    assert not [d for d in await letters.list(stage="infer_minilm") if d["seq"] == letter["seq"]]
