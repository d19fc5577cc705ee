"""The monitor's computed signals as Prometheus gauges, refreshed on every evaluation."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, Gauge
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from services.common import subjects
from services.monitor.rollout import weight

if TYPE_CHECKING:
    from services.monitor.service import Monitor

DRIFT_PSI = Gauge(
    "loom_drift_psi",
    "Population stability index of a feature vs its baseline.",
    ["pipeline", "model", "version", "feature"],
)
ACCURACY = Gauge("loom_accuracy", "Accuracy over the recent feedback window.", ["pipeline", "model", "version"])
PRECISION = Gauge(
    "loom_precision", "Macro precision over the recent feedback window.", ["pipeline", "model", "version"]
)
RECALL = Gauge("loom_recall", "Macro recall over the recent feedback window.", ["pipeline", "model", "version"])
ACCURACY_DROP = Gauge(
    "loom_accuracy_drop_points",
    "Reference accuracy minus recent accuracy, in points.",
    ["pipeline", "model", "version"],
)
BURN = Gauge("loom_slo_burn_rate", "Error-budget burn rate.", ["pipeline", "slo", "window"])
LATENCY = Gauge(
    "loom_pipeline_latency_seconds", "End-to-end latency quantiles (short window).", ["pipeline", "quantile"]
)
BUFFER_ITEMS = Gauge("loom_monitor_buffer_items", "Items held in each of the monitor's buffers.", ["buffer"])
BUFFER_LIMIT = Gauge("loom_monitor_buffer_limit", "The bound of each of the monitor's buffers.", ["buffer"])
ROLLOUT_STEP = Gauge(
    "loom_rollout_step",
    "Canary weight (percent) of each model's current rollout: the step's weight while it runs or pauses, "
    "100 once promoted, 0 once rolled back or aborted.",
    ["model", "version"],
)
MEMORY_LIMIT = Gauge("loom_monitor_memory_limit_bytes", "The memory the monitor's buffer limits are sized for.")
# Little's law per stage service (services/monitor/capacity.py): the predictive scaling signal.
DESIRED_REPLICAS = Gauge(
    "loom_desired_replicas",
    "Replicas a stage service needs for its recent load: ceil(arrival rate x service time / "
    "(per-replica concurrency x target utilisation)), clamped to the configured min and max.",
    ["service"],
)
ARRIVAL_RATE = Gauge(
    "loom_stage_arrival_rate", "Items a stage service handled per second over the capacity window.", ["service"]
)
SERVICE_SECONDS = Gauge(
    "loom_stage_service_seconds",
    "Mean time an item spent inside a stage service (after it was taken off the queue) over the capacity window.",
    ["service"],
)


class _Dropped(Collector):
    """Counters read live from the buffers' own tallies.

    ``loom_monitor_dropped_total``: data lost because a bound was hit (a full
    telemetry or feedback queue, webhook POSTs over their limit, spans over a
    trace's limit, keys over a table's limit, drift values whose feature name
    is taken by the other kind).
    ``loom_monitor_evicted_total``: the oldest traces, answers and resolved
    alerts making room for new ones, as a bounded store of recent things does
    by design.
    """

    def __init__(self) -> None:
        self.monitor: Monitor | None = None

    def collect(self) -> Iterator[CounterMetricFamily]:
        m = self.monitor
        for name, doc, totals in (
            ("loom_monitor_dropped", "Items the monitor dropped because a buffer was full.", dropped_totals),
            ("loom_monitor_evicted", "Oldest items evicted from the monitor's bounded stores.", evicted_totals),
        ):
            family = CounterMetricFamily(name, doc, labels=["buffer"])
            for buffer, total in sorted((totals(m) if m is not None else {}).items()):
                family.add_metric([buffer], total)
            yield family


def _set(gauge: Gauge, rows: Sequence[tuple[tuple[Any, ...], Any]]) -> None:
    """Replace every series of ``gauge`` (series that disappeared go away)."""
    gauge.clear()
    for labels, value in rows:
        if value is not None:
            gauge.labels(*labels).set(value)


def dropped_totals(m: Monitor) -> dict[str, float]:
    return {
        "telemetry": m.telemetry_dropped(),
        "feedback": m.feedback_dropped(),
        "webhook": m.webhook_dropped(),
        "spans": float(m.traces.dropped_spans),
        # Over the key limit, or a feature name the other kind (input/output) already has in that version.
        "drift_keys": float(m.drift.dropped + m.drift.clashes),
        "accuracy_keys": float(m.accuracy.dropped),
        "stages": float(m.book.dropped + m.traffic.dropped + m.slo.dropped),
        "version_keys": float(m.versions.dropped),
    }


def evicted_totals(m: Monitor) -> dict[str, float]:
    return {
        "traces": float(m.traces.evicted_traces),
        "answers": float(m.answers.dropped),
        "alerts": float(m.alerts.evicted),
    }


def update(m: Monitor, now_ms: int) -> None:
    latest = m.latest
    _set(
        DRIFT_PSI,
        [((d["pipeline"], d["model"], d["version"], d["feature"]), d["psi"]) for d in latest["drift"]],
    )
    for gauge, key in (
        (ACCURACY, "accuracy"),
        (PRECISION, "precision"),
        (RECALL, "recall"),
        (ACCURACY_DROP, "drop_points"),
    ):
        _set(gauge, [((a["pipeline"], a["model"], a["version"]), a[key]) for a in latest["accuracy"]])
    burn, latency = [], []
    for p in latest["pipelines"]:
        for slo, windows in p["burn_rate"].items():
            burn += [((p["pipeline"], slo, w), v) for w, v in windows.items()]
        for q, key in (("0.5", "p50_ms"), ("0.95", "p95_ms"), ("0.99", "p99_ms")):
            value = p[key]
            latency.append(((p["pipeline"], q), None if value is None else value / 1000.0))
    _set(BURN, burn)
    _set(LATENCY, latency)
    s = m.ms
    for buffer, items, limit in (
        ("telemetry", _pending(m), s.telemetry_buffer),
        ("spans", m.traces.span_count, s.spans_max),
        ("traces", len(m.traces), s.traces_max),
        ("answers", len(m.answers), s.answers),
        ("drift_values", m.drift.items(), None),
        ("stage_samples", m.book.items(), None),
        ("version_samples", m.versions.items(), None),
    ):
        BUFFER_ITEMS.labels(buffer).set(items)
        if limit is not None:
            BUFFER_LIMIT.labels(buffer).set(limit)
    _set(ROLLOUT_STEP, rollout_rows(m))
    loads = m.capacity.loads(now_ms)
    _set(DESIRED_REPLICAS, [((x.service,), x.desired_replicas) for x in loads])
    _set(ARRIVAL_RATE, [((x.service,), x.arrival_rate) for x in loads])
    _set(SERVICE_SECONDS, [((x.service,), x.service_s) for x in loads])
    DROPPED.monitor = m
    MEMORY_LIMIT.set(s.memory_limit_mb * 1024 * 1024)


def rollout_rows(m: Monitor) -> list[tuple[tuple[str, str], float | None]]:
    if m.rollouts is None:
        return []
    return [
        ((model, rec.rollout.version), weight(rec))
        for model, rec in m.rollouts.view().items()
        if rec.rollout is not None
    ]


def _pending(m: Monitor) -> int:
    rt = m._rt
    if rt is None:
        return 0
    return rt.bus.pending().get(subjects.TELEMETRY_ALL, 0)


DROPPED = _Dropped()
REGISTRY.register(DROPPED)
