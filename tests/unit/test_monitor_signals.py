"""The monitor's pure logic: SLO series and burn rates, alert state, rules, webhook bodies."""

from __future__ import annotations

import pytest

from services.common.pipelines import SloSpec
from services.monitor import rules
from services.monitor.alerts import AlertBook, condition
from services.monitor.notify import webhook_body
from services.monitor.series import SloBook, SloWindows, above, quantile_ms
from services.monitor.triton_watch import ModelState, TritonWatch

pytestmark = pytest.mark.unit

T0 = 1_700_000_000_000


def test_percentiles_come_from_the_histogram_within_its_resolution() -> None:
    book = SloBook()
    for i in range(1000):
        book.record("p", 10.0 + (i % 100), "OK", T0 + i * 10)
    row = book.snapshot({}, T0 + 10_000)[0]
    assert row["requests"] == 1000 and row["errors"] == 0
    assert row["p50_ms"] == pytest.approx(60, rel=0.08)
    assert row["p95_ms"] == pytest.approx(105, rel=0.08)
    assert row["slo_met"] is True
    assert quantile_ms(book.series["p"].window(T0 + 10_000, 60).hist, 0.5) == pytest.approx(60, rel=0.08)


def test_burn_rate_counts_server_errors_and_slow_answers_against_the_budget() -> None:
    book = SloBook(SloWindows(short_s=60, long_s=600))
    for i in range(1000):
        code = "INTERNAL" if i % 100 == 0 else ("INVALID_ARGUMENT" if i % 7 == 0 else "OK")
        slow = i % 20 == 0  # 5 % slower than the 500 ms objective
        book.record("p", 800.0 if slow else 50.0, code, T0 + i * 50)
    now = T0 + 50_000
    rates = book.burn_rates("p", SloSpec(), now)
    # 1 % server errors against a 0.1 % budget: 10x; client errors do not count.
    assert rates["availability"]["short"] == pytest.approx(10.0, rel=0.05)
    assert rates["availability"]["long"] == pytest.approx(10.0, rel=0.05)
    # 5 % slow against the 5 % a p95 objective allows: 1x.
    assert rates["latency"]["short"] == pytest.approx(1.0, rel=0.05)
    assert book.snapshot({"p": SloSpec()}, now)[0]["slo_met"] is False


def test_old_buckets_leave_the_short_window() -> None:
    book = SloBook(SloWindows(short_s=60, long_s=600))
    for i in range(100):
        book.record("p", 50.0, "UNAVAILABLE", T0 + i * 100)
    later = T0 + 200_000
    rates = book.burn_rates("p", SloSpec(), later)
    assert rates["availability"]["short"] == 0.0 and rates["availability"]["long"] > 900
    points = book.series["p"].points(later, 60)
    assert points[0]["error_rate"] == 1.0 and points[-1]["rps"] == 0.0


def test_above_counts_samples_slower_than_a_threshold() -> None:
    book = SloBook()
    for ms in (10, 20, 600, 700, 4000):
        book.record("p", ms, "OK", T0)
    hist = book.series["p"].window(T0, 60).hist
    assert above(hist, 500) == 3 and above(hist, 3000) == 1


def test_alerts_fire_after_their_for_duration_and_resolve_when_no_longer_reported() -> None:
    book = AlertBook()
    c = condition("LoomResourceSaturation", "warning", {"resource": "cpu"}, True, 0.9, "cpu 90 %", for_s=10)
    assert book.evaluate([c], T0) == []  # pending
    assert book.evaluate([c], T0 + 5_000) == []
    fired = book.evaluate([c], T0 + 10_000)
    assert [a.state for a in fired] == ["firing"] and fired[0].started_unix_ms == T0 + 10_000
    assert book.evaluate([c], T0 + 11_000) == []  # still firing: no new transition
    quiet = condition("LoomResourceSaturation", "warning", {"resource": "cpu"}, False, 0.1, "cpu 10 %")
    resolved = book.evaluate([quiet], T0 + 12_000)
    assert [(a.state, a.resolved_unix_ms) for a in resolved] == [("resolved", T0 + 12_000)]
    assert book.firing() == [] and book.all()[0].state == "resolved"


def test_a_condition_that_flaps_before_its_for_duration_never_fires() -> None:
    book = AlertBook()
    on = condition("X", "P2", {}, True, 1, "on", for_s=10)
    off = condition("X", "P2", {}, False, 0, "off", for_s=10)
    for t in range(0, 60_000, 5_000):
        assert book.evaluate([on if (t // 5_000) % 2 == 0 else off], T0 + t) == []


def test_firing_alerts_are_ordered_by_severity() -> None:
    book = AlertBook()
    book.evaluate(
        [
            condition("W", "warning", {}, True, 1, "w"),
            condition("A", "P1", {}, True, 1, "a"),
            condition("B", "P2", {}, True, 1, "b"),
        ],
        T0,
    )
    assert [a.severity for a in book.firing()] == ["P1", "P2", "warning"]


def test_drift_and_accuracy_rules_use_their_thresholds() -> None:
    th = rules.Thresholds()
    drift = [
        {"pipeline": "p", "model": "m", "version": "1", "feature": f, "kind": "input", "psi": psi}
        for f, psi in (("calm", 0.05), ("watch", 0.15), ("shifted", 0.35), ("new", None))
    ]
    active = {c.labels[0][1]: c.active for c in rules.drift_high(drift, th)}
    assert active == {"calm": False, "watch": False, "shifted": True, "new": False}
    acc = [
        {"pipeline": "p", "model": "m", "version": v, "drop_points": d, "accuracy": 0.5, "reference_accuracy": 0.9}
        for v, d in (("1", 4.0), ("2", 12.0), ("3", None))
    ]
    assert [c.active for c in rules.accuracy_drop(acc, th)] == [False, True, False]


def test_latency_rule_needs_traffic_and_a_slow_p95() -> None:
    book = SloBook()
    th = rules.Thresholds()
    for i in range(5):
        book.record("few", 5000.0, "OK", T0 + i)
    for i in range(50):
        book.record("slow", 4000.0 if i % 10 else 100.0, "OK", T0 + i)
        book.record("fast", 100.0, "OK", T0 + i)
    active = {c.labels[0][1]: c.active for c in rules.high_latency(book, T0 + 1000, th)}
    assert active == {"few": False, "slow": True, "fast": False}


def test_model_unavailable_names_every_expected_model_without_a_ready_version() -> None:
    watch = TritonWatch("127.0.0.1:1", "http://127.0.0.1:1/metrics", expected={"minilm", "ocr"})
    watch.models = [ModelState("minilm", "1", True), ModelState("ocr", "1", False, "load failed")]
    watch.last_version = {"minilm": "1"}
    by_model = {dict(c.labels)["model"]: c for c in rules.model_unavailable(watch)}
    assert not by_model["minilm"].active
    assert by_model["ocr"].active and by_model["ocr"].severity == "P1" and "load failed" in by_model["ocr"].summary


def test_drop_watch_fires_only_while_counters_move() -> None:
    watch = rules.DropWatch()
    th = rules.Thresholds(dropping_window_s=60)
    assert not watch.conditions({"telemetry": 0.0}, T0, th)[0].active
    assert watch.conditions({"telemetry": 40.0}, T0 + 1_000, th)[0].active
    assert not watch.conditions({"telemetry": 40.0}, T0 + 120_000, th)[0].active


def test_webhook_bodies_follow_alertmanager() -> None:
    book = AlertBook()
    book.evaluate([condition("LoomDriftHigh", "P2", {"feature": "chars"}, True, 0.3, "drifted")], T0)
    [alert] = book.firing()
    message = webhook_body([alert], "http://hooks.example/loom", "http://monitor:8090/")
    assert isinstance(message, dict) and message["version"] == "4" and message["status"] == "firing"
    [item] = message["alerts"]
    assert item["labels"] == {"alertname": "LoomDriftHigh", "severity": "P2", "feature": "chars"}
    assert item["startsAt"].startswith("2023-11-14T22:13:20")
    api = webhook_body([alert], "http://alertmanager:9093/api/v2/alerts", "http://monitor:8090/")
    assert isinstance(api, list) and "status" not in api[0] and api[0]["labels"]["alertname"] == "LoomDriftHigh"


def test_no_model_alert_while_the_monitor_starts_and_triton_never_answered() -> None:
    watch = TritonWatch("127.0.0.1:1", "http://127.0.0.1:1/metrics", expected={"minilm"})
    watch.models = [ModelState("minilm", "", False, "Triton unreachable")]
    assert rules.model_unavailable(watch, starting=True) == []
    assert rules.model_unavailable(watch, starting=False)[0].active
    watch.seen_up = True  # it was up once: an outage during the grace period is an outage
    assert rules.model_unavailable(watch, starting=True)[0].active


def test_slo_burn_needs_both_windows_over_the_threshold() -> None:
    th = rules.Thresholds(burn_rate=14.4)
    book = SloBook(SloWindows(short_s=300, long_s=3600))
    spec = SloSpec()  # availability 0.999: budget 0.001
    now = T0 + 3_600_000
    # An hour of good answers, then a burst of failures in the last minute.
    for i in range(50_000):
        book.record("p", 10.0, "OK", T0 + i * 60)
    for i in range(100):
        book.record("p", 10.0, "UNAVAILABLE" if i < 10 else "OK", now - 60_000 + i * 10)
    rates = book.burn_rates("p", spec, now)["availability"]
    assert rates["short"] > 14.4 > rates["long"]  # short high, long low
    [avail] = [c for c in rules.slo_burn(book, {"p": spec}, now, th) if dict(c.labels)["slo"] == "availability"]
    assert not avail.active

    # Failures for the whole hour: both windows burn.
    hot = SloBook(SloWindows(short_s=300, long_s=3600))
    for i in range(3600):
        hot.record("p", 10.0, "INTERNAL" if i % 10 == 0 else "OK", T0 + i * 1000)
    conds = {dict(c.labels)["slo"]: c for c in rules.slo_burn(hot, {"p": spec}, T0 + 3_600_000, th)}
    burn = conds["availability"]
    assert burn.active and burn.severity == "warning" and burn.name == "LoomSLOBurn"
    assert burn.value == pytest.approx(100.0, rel=0.1)  # 10 % errors / 0.1 % budget
    assert not conds["latency"].active  # every answer took 10 ms


@pytest.mark.parametrize(("drop", "severity", "active"), [(4.9, "P2", False), (7.0, "P2", True), (12.5, "P1", True)])
def test_accuracy_drop_severity_grows_with_the_drop(drop: float, severity: str, active: bool) -> None:
    row = {"pipeline": "p", "model": "m", "version": "1", "drop_points": drop, "accuracy": 0.8}
    [c] = rules.accuracy_drop([row], rules.Thresholds())
    assert (c.name, c.severity, c.active) == ("LoomAccuracyDrop", severity, active)


def test_a_change_of_severity_resolves_the_old_alert_and_fires_the_new_one() -> None:
    book = AlertBook()
    th = rules.Thresholds()
    row = {"pipeline": "p", "model": "m", "version": "1", "drop_points": 7.0}
    [p2] = book.evaluate(rules.accuracy_drop([row], th), T0)
    assert (p2.severity, p2.state) == ("P2", "firing")
    assert book.evaluate(rules.accuracy_drop([row], th), T0 + 1000) == []  # unchanged: nothing to announce
    changed = book.evaluate(rules.accuracy_drop([{**row, "drop_points": 15.0}], th), T0 + 2000)
    assert [(a.severity, a.state) for a in changed] == [("P2", "resolved"), ("P1", "firing")]
    assert [a.severity for a in book.firing()] == ["P1"] and book.firing()[0].started_unix_ms == T0 + 2000
