"""Little's law replicas per stage: the window, the arithmetic, the clamping, the settings and the gauges."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from pydantic import ValidationError

from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.monitor import gauges
from services.monitor.capacity import DEFAULT_CONCURRENCY, STAGE_SERVICES, CapacityBook, CapacityPolicy, StageLoad
from services.monitor.service import Monitor
from services.monitor.settings import MonitorSettings

pytestmark = pytest.mark.unit

T0 = 1_700_000_000_000  # a whole second, in ms


def by_service(book: CapacityBook, now_ms: int) -> dict[str, StageLoad]:
    return {x.service: x for x in book.loads(now_ms)}


def steady(book: CapacityBook, service: str, rate: int, service_ms: float, seconds: int, start: int = T0) -> int:
    """``rate`` items per second, each ``service_ms`` long, for ``seconds``; returns the end time."""
    for s in range(seconds):
        for i in range(rate):
            book.record(service, "loom.infer.minilm", service_ms, start + s * 1000 + i * (1000 // rate))
    return start + seconds * 1000


def test_known_rate_and_service_time_give_known_replicas() -> None:
    # λ = 50/s, W = 0.2 s → L = 10 items in service; 4 per replica at 70 % → 10 / 2.8 = 3.57 → 4 replicas.
    book = CapacityBook(CapacityPolicy(), window_s=60, started_ms=T0 - 3_600_000)
    end = steady(book, "inference", 50, 200.0, 60)
    load = by_service(book, end)["inference"]
    assert load.items == 3000 and load.span_s == pytest.approx(60.0)
    assert load.arrival_rate == pytest.approx(50.0)
    assert load.service_s == pytest.approx(0.2)
    assert load.busy == pytest.approx(10.0)
    assert load.desired_replicas == 4


def test_exact_multiples_do_not_add_a_replica() -> None:
    policy = CapacityPolicy(concurrency={"inference": 4.0}, target_utilization=0.7)
    assert policy.replicas("inference", 2.8) == 1  # 2.8 / (4 x 0.7) is 1.0000000000000002 in floating point
    assert policy.replicas("inference", 2.81) == 2
    assert policy.replicas("inference", 5.6) == 2


@given(
    rate=st.integers(1, 200),
    service_ms=st.floats(0.1, 5000.0),
    concurrency=st.floats(0.5, 128.0),
    target=st.floats(0.05, 1.0),
)
def test_replicas_match_littles_law(rate: int, service_ms: float, concurrency: float, target: float) -> None:
    policy = CapacityPolicy(concurrency={"preprocess": concurrency}, target_utilization=target, max_replicas=10**9)
    book = CapacityBook(policy, window_s=10, started_ms=0)
    end = steady(book, "preprocess", rate, service_ms, 10)
    load = by_service(book, end)["preprocess"]
    busy = rate * service_ms / 1000  # L = λ·W
    assert load.busy == pytest.approx(busy, rel=1e-9)
    expected = max(1, math.ceil(busy / (concurrency * target) - 1e-9))
    assert load.desired_replicas == expected
    # Enough replicas, never more than one too many: the answer is the smallest that keeps utilisation ≤ target.
    assert busy / (load.desired_replicas * concurrency) <= target * (1 + 1e-9)
    if load.desired_replicas > 1:
        assert busy / ((load.desired_replicas - 1) * concurrency) > target * (1 - 1e-6)


def test_the_window_forgets_old_events() -> None:
    book = CapacityBook(CapacityPolicy(), window_s=60, started_ms=T0)
    end = steady(book, "inference", 100, 500.0, 30)  # L = 50 → ceil(50 / 2.8) = 18 replicas
    assert by_service(book, end)["inference"].desired_replicas == 18
    # 61 s later none of it is in the window: back to the minimum, no rate, no service time.
    later = by_service(book, end + 61_000)["inference"]
    assert (later.items, later.arrival_rate, later.service_s, later.desired_replicas) == (0, 0.0, None, 1)
    assert book.items() == 0


def test_a_burst_is_averaged_over_the_window_then_forgotten() -> None:
    book = CapacityBook(CapacityPolicy(), window_s=60, started_ms=0)
    steady(book, "gateway", 10, 50.0, 60)  # L = 0.5
    # A 1-second burst of 1200 requests, 1 s each: 1200 busy seconds over the 60 s window → L ≈ 20.5.
    burst_at = T0 + 60_000
    for i in range(1200):
        book.record("gateway", "gateway", 1000.0, burst_at + i * 10 // 12)
    during = by_service(book, burst_at + 999)["gateway"]
    assert during.busy == pytest.approx((10 * 59 * 0.05 + 1200 * 1.0) / 59.999, rel=1e-3)
    assert during.desired_replicas == math.ceil(during.busy / (64 * 0.7))
    after = by_service(book, burst_at + 61_000)["gateway"]
    assert after.items == 0 and after.desired_replicas == 1


def test_zero_traffic_asks_for_the_minimum_everywhere() -> None:
    book = CapacityBook(CapacityPolicy(min_replicas=2, max_replicas=5), window_s=60, started_ms=T0)
    loads = book.loads(T0 + 5000)
    assert [x.service for x in loads] == list(STAGE_SERVICES)
    assert all(x.desired_replicas == 2 and x.arrival_rate == 0.0 and x.service_s is None for x in loads)


def test_clamped_to_min_and_max() -> None:
    policy = CapacityPolicy(min_replicas=2, max_replicas=5)
    assert policy.replicas("fusion", 0.01) == 2
    assert policy.replicas("inference", 1000.0) == 5
    assert CapacityPolicy(min_replicas=0).replicas("fusion", 0.0) == 0  # scale to zero allowed


def test_rate_right_after_start_uses_the_time_seen_not_the_whole_window() -> None:
    # Started 10 s ago: 100 items are 10/s, not 100 / 60.
    book = CapacityBook(CapacityPolicy(), window_s=60, started_ms=T0)
    end = steady(book, "postprocess", 10, 100.0, 10)
    load = by_service(book, end)["postprocess"]
    assert load.arrival_rate == pytest.approx(10.0) and load.busy == pytest.approx(1.0)
    assert load.desired_replicas == 2  # postprocess: 1 item at a time, 70 % of it


def test_other_services_and_shadow_copies_are_not_stage_work() -> None:
    book = CapacityBook(CapacityPolicy(), window_s=60, started_ms=0)
    assert not book.record("monitor", "monitor", 5.0, T0)
    assert not book.record("inference", "loom.shadow.minilm", 5.0, T0)
    assert book.record("inference", "loom.infer.minilm", 5.0, T0)
    assert by_service(book, T0 + 1000)["inference"].items == 1


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        CapacityPolicy(target_utilization=0)
    with pytest.raises(ValueError):
        CapacityPolicy(target_utilization=1.5)
    with pytest.raises(ValueError):
        CapacityPolicy(min_replicas=5, max_replicas=2)
    with pytest.raises(ValueError):
        CapacityPolicy(concurrency={"inference": 0})
    with pytest.raises(ValueError):
        CapacityBook(CapacityPolicy(), window_s=0.5)


def test_settings_read_the_capacity_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOM_MONITOR_CAPACITY_CONCURRENCY", '{"inference": 8}')
    monkeypatch.setenv("LOOM_MONITOR_CAPACITY_TARGET_UTILIZATION", "0.5")
    monkeypatch.setenv("LOOM_MONITOR_CAPACITY_MAX_REPLICAS", "7")
    monkeypatch.setenv("LOOM_MONITOR_CAPACITY_WINDOW_S", "30")
    s = MonitorSettings()
    assert s.capacity_concurrency == {"inference": 8.0}
    assert (s.capacity_target_utilization, s.capacity_min_replicas, s.capacity_max_replicas) == (0.5, 1, 7)
    assert s.capacity_window_s == 30.0
    monkeypatch.setenv("LOOM_MONITOR_CAPACITY_CONCURRENCY", '{"infernce": 8}')  # a typo stops the start
    with pytest.raises(ValidationError, match="infernce"):
        MonitorSettings()
    monkeypatch.setenv("LOOM_MONITOR_CAPACITY_CONCURRENCY", '{"inference": -1}')
    with pytest.raises(ValidationError):
        MonitorSettings()


def test_monitor_exports_the_gauges_on_evaluation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOM_MONITOR_CAPACITY_CONCURRENCY", '{"inference": 2}')
    m = Monitor(MonitorSettings())
    try:
        assert m.capacity.policy.concurrency == {**DEFAULT_CONCURRENCY, "inference": 2.0}
        now = m.capacity.started_ms + 10_000  # record() stamps events with the real clock: judge them 10 s on
        for _ in range(40):  # 40 items of 300 ms in 10 s: λ = 4/s, W = 0.3 s, L = 1.2 → ceil(1.2 / 1.4) = 1
            m.record(pb.TelemetryEvent(service="inference", stage="loom.infer.minilm", duration_ms=300.0))
        m.record(pb.TelemetryEvent(service="inference", stage="loom.shadow.minilm", duration_ms=300.0))
        gauges.update(m, now)
        value = REGISTRY.get_sample_value
        assert value("loom_stage_arrival_rate", {"service": "inference"}) == pytest.approx(4.0)
        assert value("loom_stage_service_seconds", {"service": "inference"}) == pytest.approx(0.3)
        assert value("loom_desired_replicas", {"service": "inference"}) == 1.0
        for service in STAGE_SERVICES:  # every stage has a signal, the minimum when idle
            assert value("loom_desired_replicas", {"service": service}) is not None
        assert value("loom_desired_replicas", {"service": "fusion"}) == 1.0
        assert value("loom_stage_service_seconds", {"service": "fusion"}) is None  # no items, no mean
    finally:
        REGISTRY.unregister(m.triton)
