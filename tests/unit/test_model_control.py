"""Inference model-lifecycle logic without processes: control requests, reconcile state, fallback, shadow."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
import pytest

from services.common.bus import Bus
from services.common.errors import InvalidArgument, NotFound, Unavailable
from services.common.events import TelemetryPublisher
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.registry.schema import ModelRecord, TrafficPolicy, VersionMeta
from services.common.tensors import from_numpy
from services.inference import routing
from services.inference.control import ModelControl, parse_request
from services.inference.router import Route
from services.inference.shadow import SHADOW, ShadowMirror, agreement, cosine
from services.inference.triton import Outputs, TritonModels

pytestmark = pytest.mark.unit

MODEL = "minilm"


class FakeTriton:
    """Serves what it was last told; ``fail`` makes loads raise."""

    def __init__(self, ready: Sequence[str]) -> None:
        self.ready = list(ready)
        self.loads: list[list[str]] = []
        self.fail: Exception | None = None

    async def ready_versions(self, model: str, *, timeout_s: float = 5.0) -> list[str]:
        return list(self.ready)

    async def load_versions(self, model: str, versions: Sequence[str], *, timeout_s: float) -> list[str]:
        self.loads.append(list(versions))
        if self.fail is not None:
            raise self.fail
        self.ready = sorted(versions, key=int)
        return list(self.ready)


def control(triton: FakeTriton, *, hold_s: float = 60.0) -> ModelControl:
    return ModelControl(
        cast(Bus, None),
        cast(TritonModels, triton),
        [MODEL],
        None,
        queue="inference",
        timeout_s=5.0,
        refresh_s=30.0,
        hold_s=hold_s,
    )


def record(*active: str, retired: Sequence[str] = ()) -> ModelRecord:
    versions = {v: VersionMeta(version=v, semver=f"{v}.0.0") for v in active}
    versions.update({v: VersionMeta(version=v, semver=f"{v}.0.0", state="retired") for v in retired})
    return ModelRecord(name=MODEL, versions=versions, policy=TrafficPolicy(stable=active[0]))


def test_parse_request() -> None:
    assert parse_request(b'{"model": "minilm", "versions": ["2", "1", 2]}') == ("minilm", ["1", "2"])
    for bad, message in [
        (b"not json", "must be JSON"),
        (b'["minilm"]', 'needs "model"'),
        (b'{"model": "minilm"}', "non-empty list"),
        (b'{"model": "minilm", "versions": []}', "non-empty list"),
        (b'{"model": "minilm", "versions": ["0"]}', "positive integers"),
        (b'{"model": "minilm", "versions": [true]}', "positive integers"),
        (b'{"model": "minilm", "versions": ["1.0"]}', "positive integers"),
    ]:
        with pytest.raises(InvalidArgument, match=message):
            parse_request(bad)


async def test_serve_loads_only_when_triton_differs() -> None:
    triton = FakeTriton(["1"])
    ctl = control(triton)
    assert await ctl.serve(MODEL, ["1"]) == ["1"]
    assert triton.loads == []
    assert await ctl.serve(MODEL, ["2", "1"]) == ["1", "2"]
    assert triton.loads == [["1", "2"]]


async def test_a_control_request_holds_until_the_registry_agrees_or_time_passes() -> None:
    triton = FakeTriton(["1"])
    ctl = control(triton)
    ctl._on_registry(MODEL, record("1"))
    assert ctl.desired(MODEL) == ("1",)
    await ctl.serve(MODEL, ["1", "2"], hold=True)  # the admin API loads before it registers
    assert ctl.desired(MODEL) == ("1", "2")
    await ctl._reconcile(MODEL)
    assert triton.ready == ["1", "2"]  # the registry's {1} does not undo it meanwhile
    ctl._on_registry(MODEL, record("1", "2"))  # registered: the hold has done its work
    assert ctl._state[MODEL].hold is None and ctl.desired(MODEL) == ("1", "2")

    await ctl.serve(MODEL, ["1"], hold=True)
    assert ctl.desired(MODEL) == ("1",)
    await ctl.serve(MODEL, ["1", "2"], hold=True)  # asking for what the registry says ends the hold
    assert ctl._state[MODEL].hold is None

    expiring = control(FakeTriton(["1"]), hold_s=0.0)
    expiring._on_registry(MODEL, record("1"))
    await expiring.serve(MODEL, ["1", "2"], hold=True)
    assert expiring.desired(MODEL) == ("1",)


async def test_reconcile_follows_active_versions_and_leaves_unregistered_models() -> None:
    triton = FakeTriton(["1"])
    ctl = control(triton)
    await ctl._reconcile(MODEL)  # no record: Triton is left as it is
    assert triton.loads == []
    ctl._on_registry(MODEL, record("1", "2", retired=["3"]))
    await ctl._reconcile(MODEL)
    assert triton.ready == ["1", "2"]
    ctl._on_registry(MODEL, record("2", retired=["1"]))
    await ctl._reconcile(MODEL)
    assert triton.ready == ["2"]
    ctl._on_registry("other", record("1"))  # not served here: ignored
    assert "other" not in ctl._state


async def test_failures_back_off_and_log_once_per_reason(caplog: pytest.LogCaptureFixture) -> None:
    triton = FakeTriton(["1"])
    ctl = control(triton)
    ctl._on_registry(MODEL, record("1", "2"))
    triton.fail = InvalidArgument("Triton could not load minilm versions [1, 2]: broken")
    with caplog.at_level(logging.WARNING, logger="services.inference.control"):
        for _ in range(3):
            await ctl._reconcile(MODEL)
        triton.fail = Unavailable("Triton is unavailable: cannot load minilm")
        await ctl._reconcile(MODEL)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "broken" in lines[0] and "unavailable" in lines[1]
    state = ctl._state[MODEL]
    assert state.failures == 4
    assert state.retry_at > time.monotonic() + 4.0  # 8 s after the fourth failure in a row
    ctl._on_registry(MODEL, record("1", "2", "3"))  # news: try again now
    assert state.failures == 0 and state.due
    triton.fail = None
    await ctl._reconcile(MODEL)
    assert triton.ready == ["1", "2", "3"] and state.last_error == ""


async def test_fallback_to_stable_once_for_an_unavailable_version() -> None:
    asked: list[str] = []

    async def answer(version: str) -> str:
        asked.append(version)
        if version == "2":
            raise Unavailable("model minilm is not available on Triton")
        return f"answer of {version}"

    assert await routing.with_fallback(Route("2", "canary"), "1", answer) == ("answer of 1", "fallback")
    assert asked == ["2", "1"]
    assert await routing.with_fallback(Route("1", "stable"), "1", answer) == ("answer of 1", "stable")

    async def not_found(version: str) -> str:
        raise NotFound(f"no version {version}")

    for route, stable in [(Route("1", "stable"), "1"), (Route("", "default"), "")]:
        with pytest.raises(NotFound):
            await routing.with_fallback(route, stable, not_found)

    async def bad_input(version: str) -> str:
        raise InvalidArgument("too many tokens")

    with pytest.raises(InvalidArgument):  # the part's own fault: stable would refuse it too
        await routing.with_fallback(Route("2", "canary"), "1", bad_input)


def test_real_tokens() -> None:
    assert routing.real_tokens({"attention_mask": np.array([1, 1, 1, 0, 0])}) == 3
    assert routing.real_tokens({"input_ids": np.array([1, 2])}) is None


def test_agreement() -> None:
    a = np.array([1.0, 2.0, 3.0], np.float32)
    assert cosine(a, a) == pytest.approx(1.0)
    assert cosine(a, -a) == pytest.approx(-1.0)
    assert cosine(np.zeros(3), np.zeros(3)) == 1.0 and cosine(np.zeros(3), a) == 0.0
    b = np.array([1.0, 0.0, 0.0], np.float32)
    assert agreement({"x": a, "y": a}, {"x": a, "y": b}) == pytest.approx((1.0 + cosine(a, b)) / 2)
    assert agreement({"x": a}, {"x": np.ones(4, np.float32)}) == 0.0  # another shape: no agreement
    assert agreement({"labels": np.array(["a"], dtype=object)}, {"labels": np.array(["b"], dtype=object)}) is None


class FakeBus:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def publish_nowait(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> bool:
        self.sent.append((subject, payload))
        return True


def count(version: str, result: str) -> float:
    return float(SHADOW.labels(MODEL, version, result)._value.get())


async def test_shadow_is_bounded_and_never_raises() -> None:
    bus = FakeBus()
    release = asyncio.Event()

    async def run(model: str, version: str, inputs: Mapping[str, np.ndarray], timeout_s: float) -> Outputs:
        await release.wait()
        if version == "9":
            raise Unavailable("version 9 is not loaded")
        return {"embedding": np.array(inputs["x"], np.float32) * 2}

    mirror = ShadowMirror(run, TelemetryPublisher(cast(Any, bus), "inference"), max_inflight=2, timeout_s=1.0)
    primary = pb.CachedOutputs(model_version="1", tensors={"embedding": from_numpy(np.array([1.0, 2.0], np.float32))})
    part = pb.Part(request_id="r", pipeline="p")
    before = {(v, r): count(v, r) for v in ("3", "9") for r in ("ok", "error", "dropped")}
    mirror.mirror(MODEL, "3", {"x": np.array([1.0, 2.0])}, primary, part)
    mirror.mirror(MODEL, "9", {"x": np.array([1.0, 2.0])}, primary, part)
    mirror.mirror(MODEL, "3", {"x": np.array([1.0, 2.0])}, primary, part)  # a third at once: dropped
    release.set()
    await mirror.close()
    assert count("3", "ok") - before["3", "ok"] == 1
    assert count("3", "dropped") - before["3", "dropped"] == 1
    assert count("9", "error") - before["9", "error"] == 1
    events = [pb.TelemetryEvent.FromString(payload) for _, payload in bus.sent]
    assert {(e.stage, e.model_version, e.code) for e in events} == {
        (f"loom.shadow.{MODEL}", "3", "OK"),
        (f"loom.shadow.{MODEL}", "9", "UNAVAILABLE"),
    }
    ok = next(e for e in events if e.code == "OK")
    assert ok.stats["agreement"] == pytest.approx(1.0) and ok.request_id == "r" and ok.pipeline == "p"
