"""The monitor's per-version evidence for rollouts: requests of every code, output scores, shadow agreement."""

from __future__ import annotations

import pytest

from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.monitor.versions import VersionBook

pytestmark = pytest.mark.unit

T0 = 1_700_000_000_000


def infer(version: str, ms: float = 10.0, code: str = "OK", model: str = "minilm") -> pb.TelemetryEvent:
    return pb.TelemetryEvent(
        service="inference", stage=f"loom.infer.{model}", model=model, model_version=version, duration_ms=ms, code=code
    )


def post(version: str, score: float, code: str = "OK") -> pb.TelemetryEvent:
    return pb.TelemetryEvent(
        service="postprocess",
        stage="loom.post.embed",
        model="minilm",
        model_version=version,
        code=code,
        stats={"top_score": score},
    )


def shadow(version: str, agreement: float | None, code: str = "OK") -> pb.TelemetryEvent:
    stats = {} if agreement is None else {"agreement": agreement}
    return pb.TelemetryEvent(
        service="inference", stage="loom.shadow.minilm", model="minilm", model_version=version, code=code, stats=stats
    )


def test_inference_events_of_every_code_count_and_only_server_errors_are_errors() -> None:
    book = VersionBook()
    for i in range(100):
        code = "INTERNAL" if i % 10 == 0 else ("INVALID_ARGUMENT" if i % 10 == 1 else "OK")
        book.record(infer("2", 10.0 + i % 50, code), T0 + i * 100)
    book.record(infer("1", 5.0), T0)
    w = book.window("minilm", "2", T0, T0 + 10_000)
    assert (w.requests, w.errors) == (100, 10)
    assert w.error_rate == pytest.approx(0.1)
    assert w.p95_ms == pytest.approx(57, rel=0.08)
    assert book.window("minilm", "1", T0, T0 + 10_000).requests == 1
    assert book.window("minilm", "3", T0, T0 + 10_000).requests == 0
    assert book.window("minilm", "3", T0, T0 + 10_000).p95_ms is None


def test_a_window_starts_at_its_since_to_one_bucket() -> None:
    book = VersionBook(bucket_s=10)
    for i in range(60):  # one request a second for a minute
        book.record(infer("2", code="UNAVAILABLE" if i < 30 else "OK"), T0 + i * 1000)
    now = T0 + 60_000
    assert book.window("minilm", "2", T0, now).requests == 60
    recent = book.window("minilm", "2", T0 + 30_000, now)
    assert (recent.requests, recent.errors) == (30, 0)
    assert book.window("minilm", "2", T0 + 35_000, now).requests == 30  # the bucket holding since counts whole


def test_events_without_a_model_version_are_ignored() -> None:
    book = VersionBook()
    book.record(infer(""), T0)
    book.record(pb.TelemetryEvent(stage="gateway", pipeline="embed", model="minilm", model_version="1"), T0)
    assert book.keys() == []


def test_output_scores_come_from_successful_postprocess_events_since_a_time() -> None:
    book = VersionBook(samples=100)
    for i in range(150):
        book.record(post("2", i / 150), T0 + i * 1000)
    book.record(post("2", 99.0, code="INTERNAL"), T0)
    book.record(post("2", float("nan")), T0)
    scores = book.outputs("minilm", "2", T0)["top_score"]
    assert len(scores) == 100 and 99.0 not in scores  # bounded to the newest 100
    assert len(book.outputs("minilm", "2", T0 + 140_000)["top_score"]) == 10
    assert book.outputs("minilm", "1", T0) == {}


def test_shadow_agreement_and_failures_per_version() -> None:
    book = VersionBook()
    for i in range(20):
        book.record(shadow("2", 0.9 + (i % 2) * 0.05), T0 + i)
    book.record(shadow("2", None, code="UNAVAILABLE"), T0 + 30)
    stats = book.shadow("minilm", "2", T0)
    assert stats is not None
    assert (stats["requests"], stats["errors"], stats["samples"]) == (21, 1, 20)
    assert stats["agreement_mean"] == pytest.approx(0.925)
    assert book.shadow("minilm", "1", T0) is None


def test_keys_are_bounded_and_drops_counted() -> None:
    book = VersionBook(max_keys=2)
    book.record(infer("1"), T0)
    book.record(infer("2"), T0)
    book.record(infer("3"), T0)
    book.record(post("1", 0.5), T0)
    assert book.keys() == [("minilm", "1"), ("minilm", "2")] and book.dropped == 2


def test_snapshot_rows_for_the_api() -> None:
    book = VersionBook()
    for i in range(10):
        book.record(infer("10", 20.0, "INTERNAL" if i == 0 else "OK"), T0 + i)
        book.record(infer("2", 10.0), T0 + i)
        book.record(post("2", 0.5), T0 + i)
    book.record(shadow("10", 0.97), T0)
    rows = book.snapshot(T0 + 1000, 300)
    assert [(r["version"], r["requests"], r["errors"]) for r in rows] == [("2", 10, 0), ("10", 10, 1)]
    assert rows[0]["outputs"] == {"top_score": 10} and rows[0]["shadow"] is None
    assert rows[1]["error_rate"] == pytest.approx(0.1) and rows[1]["shadow"]["samples"] == 1  # type: ignore[index]
    assert book.items() == 11
