"""Triton's metrics through the monitor: a recorded Triton text (GPU families included) is scraped by
TritonWatch from a loopback HTTP server, re-exposed by the monitor's registry, read by the saturation
rule, and gone again once a scrape fails."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.monitor import rules
from services.monitor.triton_watch import TritonWatch
from tests.loopback import serve_http

pytestmark = pytest.mark.unit

GPU = "GPU-0b3c2a4e-7f1d-4e55-9a61-2d6f1c8e9b70"


def triton_text(requests: int, queue_us: int, compute_us: int, gpu_util: float) -> str:
    """What Triton 24.10 answers on :8002/metrics on a GPU host (families trimmed to what Loom reads)."""
    return f"""\
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{{model="minilm",version="2"}} {requests}
nv_inference_request_success{{model="ocr",version="1"}} 0
# HELP nv_inference_count Number of inferences performed (does not include cached requests)
# TYPE nv_inference_count counter
nv_inference_count{{model="minilm",version="2"}} {requests * 4}
nv_inference_count{{model="ocr",version="1"}} 0
# HELP nv_inference_queue_duration_us Cumulative inference queuing duration in microseconds
# TYPE nv_inference_queue_duration_us counter
nv_inference_queue_duration_us{{model="minilm",version="2"}} {queue_us}
nv_inference_queue_duration_us{{model="ocr",version="1"}} 0
# HELP nv_inference_compute_infer_duration_us Cumulative compute inference duration in microseconds
# TYPE nv_inference_compute_infer_duration_us counter
nv_inference_compute_infer_duration_us{{model="minilm",version="2"}} {compute_us}
nv_inference_compute_infer_duration_us{{model="ocr",version="1"}} 0
# HELP nv_gpu_utilization GPU utilization rate [0.0 - 1.0)
# TYPE nv_gpu_utilization gauge
nv_gpu_utilization{{gpu_uuid="{GPU}"}} {gpu_util}
# HELP nv_gpu_memory_total_bytes GPU total memory, in bytes
# TYPE nv_gpu_memory_total_bytes gauge
nv_gpu_memory_total_bytes{{gpu_uuid="{GPU}"}} 85899345920
# HELP nv_gpu_memory_used_bytes GPU used memory, in bytes
# TYPE nv_gpu_memory_used_bytes gauge
nv_gpu_memory_used_bytes{{gpu_uuid="{GPU}"}} 2147483648
# HELP nv_cpu_utilization CPU utilization rate [0.0 - 1.0]
# TYPE nv_cpu_utilization gauge
nv_cpu_utilization 0.25
"""


INDEX = [
    {"name": "minilm", "version": "2", "state": "READY"},
    {"name": "ocr", "version": "1", "state": "READY"},
]


@dataclass
class FakeTriton:
    """Serves the repository index and a metrics text; ``down`` answers 503 to both."""

    text: str = ""
    down: bool = False
    url: str = ""


@pytest.fixture
async def triton() -> AsyncIterator[FakeTriton]:
    fake = FakeTriton()

    async def index(_: web.Request) -> web.Response:
        return web.json_response(INDEX, status=503 if fake.down else 200)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=fake.text, status=503 if fake.down else 200)

    app = web.Application()
    app.router.add_post("/v2/repository/index", index)
    app.router.add_get("/metrics", metrics)
    async with serve_http(app) as port:
        fake.url = f"127.0.0.1:{port}"
        yield fake


def exposed(watch: TritonWatch) -> tuple[dict[str, dict[str, Any]], str]:
    """The monitor's exposition of the watch: family name -> {type, samples: {(name, labels): value}}."""
    registry = CollectorRegistry()
    registry.register(watch)
    text = generate_latest(registry).decode()
    out: dict[str, dict[str, Any]] = {}
    for family in text_string_to_metric_families(text):
        out[family.name] = {
            "type": family.type,
            "samples": {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples},
        }
    return out, text


async def test_triton_gpu_metrics_are_re_exposed_read_and_cleared_when_a_scrape_fails(triton: FakeTriton) -> None:
    watch = TritonWatch(triton.url, f"http://{triton.url}/metrics", expected={"minilm", "ocr"})
    th = rules.Thresholds(saturation=0.8)
    async with aiohttp.ClientSession() as session:
        triton.text = triton_text(requests=10, queue_us=2_000, compute_us=30_000, gpu_util=0.5)
        await watch.poll(session, 1_000)
        triton.text = triton_text(requests=30, queue_us=12_000, compute_us=90_000, gpu_util=0.93)
        await watch.poll(session, 2_000)

        assert watch.up
        # Per request since the last poll: (12000-2000)/20 queue, (90000-30000)/20 compute; ocr had none.
        assert watch.per_request_us == {("minilm", "2"): {"queue": 500.0, "compute": 3000.0}}
        families, text = exposed(watch)
        minilm = (("model", "minilm"), ("version", "2"))
        gpu = (("gpu_uuid", GPU),)
        # Names, labels and values as Triton wrote them (counters re-exposed untyped under their own names).
        assert families["nv_inference_request_success"]["samples"][("nv_inference_request_success", minilm)] == 30
        assert families["nv_inference_request_success"]["type"] == "unknown"
        assert 'nv_inference_queue_duration_us{model="minilm",version="2"} 12000.0' in text
        assert 'nv_inference_compute_infer_duration_us{model="minilm",version="2"} 90000.0' in text
        assert "nv_inference_request_success_total" not in text
        assert families["nv_gpu_utilization"]["samples"] == {("nv_gpu_utilization", gpu): 0.93}
        assert families["nv_gpu_utilization"]["type"] == "gauge"
        assert families["nv_gpu_memory_used_bytes"]["samples"] == {("nv_gpu_memory_used_bytes", gpu): 2147483648}
        assert families["nv_gpu_memory_total_bytes"]["samples"] == {("nv_gpu_memory_total_bytes", gpu): 85899345920}
        assert families["nv_cpu_utilization"]["samples"] == {("nv_cpu_utilization", ()): 0.25}
        assert families["loom_triton_up"]["samples"] == {("loom_triton_up", ()): 1.0}
        assert watch.snapshot()["gpu_utilization"] == 0.93
        assert watch.snapshot()["gpu_memory_used_bytes"] == 2147483648

        by_resource = {dict(c.labels)["resource"]: c for c in rules.saturation(watch, th)}
        assert by_resource["gpu"].active and by_resource["gpu"].value == 0.93
        assert by_resource["gpu"].severity == "warning" and by_resource["gpu"].for_s == th.saturation_for_s
        assert not by_resource["cpu"].active

        triton.down = True
        await watch.poll(session, 3_000)

    assert not watch.up
    families, text = exposed(watch)
    assert [name for name in families if name.startswith("nv_")] == []
    assert "nv_" not in text
    assert families["loom_triton_up"]["samples"] == {("loom_triton_up", ()): 0.0}
    assert watch.per_request_us == {}
    assert rules.saturation(watch, th) == []  # no reading, no condition: a firing saturation alert resolves
    assert watch.snapshot()["gpu_utilization"] is None and watch.snapshot()["cpu_utilization"] is None
    ready = families["loom_model_ready"]["samples"]
    assert ready[("loom_model_ready", minilm)] == 0.0  # the outage is labelled with the last ready version


async def test_an_unparsable_metrics_text_counts_as_a_failed_scrape(triton: FakeTriton) -> None:
    watch = TritonWatch(triton.url, f"http://{triton.url}/metrics", expected={"minilm"})
    async with aiohttp.ClientSession() as session:
        triton.text = triton_text(requests=10, queue_us=2_000, compute_us=30_000, gpu_util=0.95)
        await watch.poll(session, 1_000)
        assert watch.gauge("nv_gpu_utilization") == 0.95
        triton.text = 'nv_gpu_utilization{gpu_uuid="x" 0.9\n'  # broken: no closing brace
        await watch.poll(session, 2_000)
    assert not watch.up and watch.families == [] and watch.gauge("nv_gpu_utilization") is None
