"""A telemetry flood: the monitor stays within its memory bound, counts what it drops,
and the request path does not wait for it."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from pathlib import Path

import nats
import pytest

from services.common.launch.mesh import Mesh
from services.common.pb.loom.v1 import envelope_pb2 as pb
from tests.support import eventually, http_json, metric, predict_http

pytestmark = pytest.mark.integration

EVENTS = 100_000
MEMORY_LIMIT_MB = 512  # LOOM_MONITOR_MEMORY_LIMIT_MB's default, what the buffer limits are sized for


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def latencies_ms(mesh: Mesh, n: int) -> list[float]:
    out = []
    for i in range(n):
        started = time.perf_counter()
        status, body = predict_http(mesh.gateway_http, f"flood check {i}")
        assert status == 200, body
        out.append((time.perf_counter() - started) * 1000)
    return out


async def flood(url: str, done: threading.Event) -> None:
    nc = await nats.connect(url, pending_size=64 * 1024 * 1024)
    try:
        for i in range(EVENTS):
            event = pb.TelemetryEvent(
                service="flood",
                stage="gateway",
                pipeline="flood",
                model="m",
                model_version="1",
                request_id=f"flood-{i}",
                duration_ms=5.0,
                code="OK",
                timestamp_unix_ms=int(time.time() * 1000),
                outcome="x",
                stats={"a": float(i % 97)},
            )
            await nc.publish("loom.tel.flood", event.SerializeToString())
            if i % 5000 == 0:
                await nc.flush()
        await nc.flush()
    finally:
        await nc.close()
        done.set()


def test_telemetry_flood_is_bounded_and_does_not_slow_requests(mesh: Mesh) -> None:
    pid = mesh.services["monitor-0"].pid
    assert pid is not None
    before_ms = latencies_ms(mesh, 30)
    rss_before = rss_mb(pid)
    evicted_before = metric(mesh.monitor_http, "loom_monitor_evicted_total", buffer="answers")

    done = threading.Event()
    flooder = threading.Thread(target=lambda: asyncio.run(flood(mesh.nats_url, done)), daemon=True)
    started = time.monotonic()
    flooder.start()

    def handled() -> float:
        seen = metric(mesh.monitor_http, "loom_monitor_events_total", service="flood")
        return seen + metric(mesh.monitor_http, "loom_nats_slow_consumer_drops_total", service="monitor")

    # Requests keep flowing while the monitor works through the flood (NATS holds what it has not read yet).
    during_ms: list[float] = []
    peak = rss_before
    while (not done.is_set() or handled() < EVENTS) and time.monotonic() - started < 120:
        during_ms += latencies_ms(mesh, 3)
        peak = max(peak, rss_mb(pid))
    flooder.join(30)
    assert done.is_set(), "the flood did not finish"
    flood_s = time.monotonic() - started
    assert handled() >= EVENTS, "the monitor neither handled nor counted every event"
    status, body = http_json(f"{mesh.monitor_http}/readyz")
    assert status == 200 and body["ready"], body
    peak = max(peak, rss_mb(pid))

    def counted() -> float:
        # The answers store holds 50,000: the flood's 100,000 answers evict (and count) the oldest.
        evicted = metric(mesh.monitor_http, "loom_monitor_evicted_total", buffer="answers") - evicted_before
        lost = metric(mesh.monitor_http, "loom_monitor_dropped_total", buffer="telemetry")
        assert evicted + lost >= EVENTS - 50_000, (evicted, lost)
        return evicted

    evicted = eventually(counted, timeout=10)
    seen = metric(mesh.monitor_http, "loom_monitor_events_total", service="flood")
    lost = metric(mesh.monitor_http, "loom_monitor_dropped_total", buffer="telemetry")
    print(
        f"\nflood: {EVENTS} events published in {flood_s:.1f}s (until handled); monitor handled {seen:.0f}, "
        f"answers evicted {evicted:.0f}, telemetry dropped {lost:.0f}; "
        f"rss {rss_before:.0f} -> peak {peak:.0f} MiB; request p50 "
        f"{statistics.median(before_ms):.1f} ms before, {statistics.median(during_ms):.1f} ms during "
        f"({len(during_ms)} requests)"
    )
    assert peak < MEMORY_LIMIT_MB
    # Latency: the request path never waits on telemetry; the flood only competes for the two cores.
    assert statistics.median(during_ms) < 3 * statistics.median(before_ms) + 50
