"""Fusion as a stage: its metrics (duration, in flight, deadline drops) and its drain on SIGTERM.

The service's handlers run against a fake bus that records what they publish:
no NATS here (the drain on a real process: tests/integration/test_fusion_drain.py).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import REGISTRY

from services.common import envelope
from services.common.events import TelemetryPublisher
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.pb.loom.v1 import fusion_pb2
from services.common.pipelines import PipelineRegistry
from services.fusion.service import STAGE, Fusion
from services.fusion.settings import FusionSettings

pytestmark = pytest.mark.unit


@dataclass
class FakeBus:
    """What fusion publishes (answers) and queues (telemetry), recorded."""

    answers: dict[str, list[bytes]] = field(default_factory=dict)
    telemetry: int = 0

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> None:
        self.answers.setdefault(subject, []).append(payload)

    def publish_nowait(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> bool:
        self.telemetry += 1
        return True


def _fusion(margin_ms: int = 50) -> tuple[Fusion, FakeBus]:
    fusion = Fusion(FusionSettings(deadline_margin_ms=margin_ms))
    bus = FakeBus()
    fusion._bus = bus  # type: ignore[assignment]
    fusion._telemetry = TelemetryPublisher(bus, "fusion")  # type: ignore[arg-type]
    fusion._pipelines = PipelineRegistry()
    return fusion, bus


def _part(rid: str, part_id: str, *, deadline_in_ms: int = 20_000, error: str = "") -> pb.Part:
    part = pb.Part(
        request_id=rid,
        part_id=part_id,
        pipeline="content",
        part_ids=["image", "text"],
        reply_to=f"_INBOX.gateway.test.{rid}",
        deadline_unix_ms=envelope.now_ms() + deadline_in_ms,
    )
    if error:
        part.error.code, part.error.message = error, "broken"
    else:
        part.output.text.model = "minilm"
    return part


def _msg(part: pb.Part) -> Any:
    return SimpleNamespace(subject="loom.fuse.0", data=part.SerializeToString(), headers={})


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _answer(bus: FakeBus, rid: str) -> fusion_pb2.FusedResult:
    [raw] = bus.answers[f"_INBOX.gateway.test.{rid}"]
    return fusion_pb2.FusedResult.FromString(raw)


async def test_stop_answers_every_waiting_request_at_once_with_what_arrived() -> None:
    fusion, bus = _fusion()
    await fusion.on_part(_msg(_part("r-half", "text")))
    await fusion.on_part(_msg(_part("r-broken", "image", error="UNAVAILABLE")))
    timers = list(fusion._timers.values())
    assert bus.answers == {} and len(timers) == 2
    assert _sample("loom_inflight", service="fusion") == 2  # two requests wait for parts

    await fusion.stop()
    half = _answer(bus, "r-half")
    assert half.response.degraded and list(half.response.missing) == ["image"]
    assert "text" in half.response.outputs and "shutting down" in half.response.notes["fusion/early"]
    broken = _answer(bus, "r-broken")  # nothing usable arrived: the part's own error
    assert broken.error.code == "UNAVAILABLE" and list(broken.response.missing) == ["image", "text"]
    assert all(t.cancelled() for t in timers) and fusion._timers == {}
    assert fusion.collector.pending == {} and _sample("loom_inflight", service="fusion") == 0
    await fusion.on_part(_msg(_part("r-half", "image")))  # a straggler after the drain: not answered twice
    assert len(bus.answers["_INBOX.gateway.test.r-half"]) == 1


async def test_a_degraded_answer_at_the_deadline_is_no_drop_but_the_part_that_comes_after_it_is() -> None:
    fusion, bus = _fusion(margin_ms=50)
    drops = _sample("loom_deadline_drops_total", service="fusion", stage=STAGE)
    await fusion.on_part(_msg(_part("r-late", "text", deadline_in_ms=120)))
    await asyncio.sleep(0.3)  # the timer answers at the deadline (less the margin) with the text only
    assert _answer(bus, "r-late").response.degraded
    assert _sample("loom_deadline_drops_total", service="fusion", stage=STAGE) == drops

    late = _part("r-late", "image", deadline_in_ms=-50)
    await fusion.on_part(_msg(late))
    assert _sample("loom_deadline_drops_total", service="fusion", stage=STAGE) == drops + 1
    assert len(bus.answers["_INBOX.gateway.test.r-late"]) == 1


async def test_a_part_past_its_deadline_for_a_request_never_seen_is_dropped_not_answered() -> None:
    fusion, bus = _fusion()
    drops = _sample("loom_deadline_drops_total", service="fusion", stage=STAGE)
    await fusion.on_part(_msg(_part("r-gone", "text", deadline_in_ms=-1)))
    assert bus.answers == {} and fusion.collector.pending == {}
    assert _sample("loom_deadline_drops_total", service="fusion", stage=STAGE) == drops + 1

    # A duplicate of a part of a request answered in time is no drop.
    await fusion.on_part(_msg(_part("r-twice", "text")))
    await fusion.on_part(_msg(_part("r-twice", "image")))
    await fusion.on_part(_msg(_part("r-twice", "image")))
    assert len(bus.answers["_INBOX.gateway.test.r-twice"]) == 1
    assert _sample("loom_deadline_drops_total", service="fusion", stage=STAGE) == drops + 1


async def test_every_part_fusion_handles_is_timed_under_its_stage() -> None:
    fusion, bus = _fusion()
    labels = {"service": "fusion", "stage": STAGE, "pipeline": "content", "model": "", "version": ""}
    before = _sample("loom_stage_duration_seconds_count", **labels)
    await fusion.on_part(_msg(_part("r-timed", "text")))
    await fusion.on_part(_msg(_part("r-timed", "image")))
    assert not _answer(bus, "r-timed").response.degraded
    assert _sample("loom_stage_duration_seconds_count", **labels) == before + 2
    junk = _part("r-junk", "text")
    junk.pipeline = "no such pipeline"
    await fusion.on_part(_msg(junk))  # a name that is no pipeline never becomes a label
    assert _sample("loom_stage_duration_seconds_count", **{**labels, "pipeline": "_unknown"}) >= 1
    await fusion.stop()
