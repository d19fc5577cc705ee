"""Triton as the monitor sees it: model readiness and Triton's own metrics.

Every poll asks Triton's repository index which model versions are READY and
scrapes its Prometheus endpoint. The ``nv_*`` families are re-exposed on the
monitor's /metrics under their own names, labels and values (per model/version
inference, queue and compute times, CPU; GPU utilisation and memory when a GPU
exists). Triton's counters come back ``untyped``: the Prometheus client would
expose a counter as ``<name>_total``, which is not Triton's name. When a poll
fails, every ``nv_*`` family and per-request figure is cleared: nothing stale is
exposed, and no rule acts on an old CPU/GPU reading.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

_COMPUTE = "nv_inference_compute_infer_duration_us"
# Triton adds queue and compute time once per request: divide by requests, not by batch items.
_REQUESTS = "nv_inference_request_success"
_PER_REQUEST = (_REQUESTS, "nv_inference_queue_duration_us", _COMPUTE)


@dataclass
class ModelState:
    model: str
    version: str
    ready: bool
    reason: str = ""


def _as_scraped(family: Metric) -> Metric:
    """Triton's counters under their own names: the parser would re-expose them as ``<name>_total``."""
    if family.type != "counter":
        return family
    out = Metric(family.name, family.documentation, "unknown")
    for sample in family.samples:
        name = family.name if sample.name == f"{family.name}_total" else sample.name
        out.add_sample(name, sample.labels, sample.value)
    return out


@dataclass(eq=False)  # hashable by identity: the Prometheus registry keys collectors
class TritonWatch(Collector):
    """Polled by the monitor; also a Prometheus collector for what it scraped."""

    http_url: str
    metrics_url: str
    #: Model names that should always have a READY version (besides every one seen READY).
    expected: set[str] = field(default_factory=set)
    up: bool = False
    #: Whether Triton has answered since the monitor started (before that, an outage may be a slow start).
    seen_up: bool = False
    scraped_unix_ms: int | None = None
    models: list[ModelState] = field(default_factory=list)
    families: list[Metric] = field(default_factory=list)
    #: Last known ready version per model name, for labelling an outage.
    last_version: dict[str, str] = field(default_factory=dict)
    _previous: dict[tuple[str, str, str], float] = field(default_factory=dict)
    #: Per (model, version): queue and compute microseconds per request since the last poll.
    per_request_us: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)

    async def poll(self, session: aiohttp.ClientSession, now_ms: int) -> None:
        base = self.http_url if "://" in self.http_url else f"http://{self.http_url}"
        try:
            async with session.post(f"{base}/v2/repository/index", json={}) as resp:
                resp.raise_for_status()
                index = await resp.json()
            async with session.get(self.metrics_url) as resp:
                resp.raise_for_status()
                text = await resp.text()
            families = [_as_scraped(f) for f in text_string_to_metric_families(text) if f.name.startswith("nv_")]
        except Exception as exc:
            if self.up:
                log.warning("Triton unreachable at %s: %s", base, exc)
            self.up = False
            self.models = [ModelState(m, self.last_version.get(m, ""), False, "Triton unreachable") for m in self.names]
            # Nothing stale: no old nv_* values on /metrics, no saturation alert from an old CPU/GPU gauge.
            self.families = []
            self.per_request_us = {}
            return
        self.up = self.seen_up = True
        self.scraped_unix_ms = now_ms
        self.models = [
            ModelState(str(m.get("name")), str(m.get("version", "")), m.get("state") == "READY", m.get("reason", ""))
            for m in index
        ]
        for m in self.models:
            if m.ready:
                self.last_version[m.model] = m.version
        self.families = families
        self._per_request()

    @property
    def names(self) -> list[str]:
        return sorted(self.expected | set(self.last_version))

    def unavailable(self) -> list[tuple[str, str, str]]:
        """(model, version, why) for every expected model with no READY version."""
        ready = {m.model for m in self.models if m.ready}
        reasons = {m.model: m.reason for m in self.models if not m.ready}
        return [
            (name, self.last_version.get(name, ""), reasons.get(name) or "no READY version")
            for name in self.names
            if name not in ready
        ]

    def gauge(self, name: str) -> float | None:
        """The largest sample of ``name`` (e.g. nv_cpu_utilization), None when Triton does not report it."""
        values = [s.value for f in self.families for s in f.samples if s.name == name]
        return max(values) if values else None

    def _per_request(self) -> None:
        now: dict[tuple[str, str, str], float] = {}
        for family in self.families:
            for s in family.samples:
                if s.name in _PER_REQUEST:
                    now[(s.labels.get("model", ""), s.labels.get("version", ""), s.name)] = s.value
        out: dict[tuple[str, str], dict[str, float]] = {}
        for (model, version, name), value in now.items():
            if name != _REQUESTS:
                continue
            count = value - self._previous.get((model, version, name), 0.0)
            use_delta = count > 0
            if not use_delta:
                count = value
            if count <= 0:
                continue
            row = out.setdefault((model, version), {})
            for metric, key in (
                ("nv_inference_queue_duration_us", "queue"),
                ("nv_inference_compute_infer_duration_us", "compute"),
            ):
                total = now.get((model, version, metric), 0.0)
                if use_delta:
                    total -= self._previous.get((model, version, metric), 0.0)
                row[key] = total / count
        self._previous = now
        self.per_request_us = out

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("loom_triton_up", "1 when the monitor reached Triton at its last poll.")
        up.add_metric([], 1.0 if self.up else 0.0)
        yield up
        ready = GaugeMetricFamily(
            "loom_model_ready", "1 when a model version is READY in Triton.", labels=["model", "version"]
        )
        listed = set()
        for m in self.models:
            ready.add_metric([m.model, m.version], 1.0 if m.ready else 0.0)
            listed.add(m.model)
        for name in self.names:
            if name not in listed:
                ready.add_metric([name, self.last_version.get(name, "")], 0.0)
        yield ready
        yield from self.families

    def snapshot(self) -> dict[str, object]:
        return {
            "up": self.up,
            "cpu_utilization": self.gauge("nv_cpu_utilization"),
            "gpu_utilization": self.gauge("nv_gpu_utilization"),
            "gpu_memory_used_bytes": self.gauge("nv_gpu_memory_used_bytes"),
            "scraped_unix_ms": self.scraped_unix_ms,
        }
