"""SIGTERM drains an inference replica: the parts it holds are finished, not dropped.

Under a steady, bounded load on the ``embed`` pipeline, a second inference
replica joins the queue group, takes its share, and is sent SIGTERM while it
surely holds parts: Triton is frozen (SIGSTOP) for a moment, so both replicas'
parts wait on it when the signal lands. The replica must stop taking work,
finish what it holds once Triton thaws, and exit cleanly; the first replica
takes the rest. No request may fail.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import pytest

from services.common.launch.mesh import Mesh
from tests.support import eventually, metric, predict_http

pytestmark = pytest.mark.integration

WORKERS = 8  # parts in flight when Triton freezes: all 8 on the other replica is a 1-in-256 chance (4 was 1 in 16)


def test_sigterm_finishes_the_parts_an_inference_replica_holds(mesh: Mesh) -> None:
    extra, ports = mesh.start_replica("inference", "inference-1")
    url = f"http://127.0.0.1:{ports['http']}"
    results: list[tuple[int, Any]] = []
    stop = threading.Event()

    def stream(worker: int) -> None:
        for i in range(400):  # bounded; stopped much sooner below
            if stop.is_set():
                return
            results.append(predict_http(mesh.gateway_http, f"drain worker {worker} text {i}", timeout_ms=20_000))

    def handled() -> float:
        return metric(url, "loom_messages_total", subject="loom.infer.minilm", direction="in")

    def holding() -> float:
        return metric(url, "loom_inflight", service="inference")

    threads = [threading.Thread(target=stream, args=(w,)) for w in range(WORKERS)]
    try:
        for t in threads:
            t.start()
        eventually(lambda: handled() >= 10, timeout=30)  # the new replica takes its share
        assert mesh.triton is not None and mesh.triton.pid is not None
        triton = mesh.triton.pid
        os.kill(triton, signal.SIGSTOP)
        try:
            eventually(lambda: holding() > 0, timeout=10)
            held = holding()
            assert extra.proc is not None
            extra.proc.send_signal(signal.SIGTERM)
            time.sleep(1.0)
            assert extra.running(), "the replica quit while it held parts"
        finally:
            os.kill(triton, signal.SIGCONT)
        code = extra.proc.wait(30)
        left = len(results)
        eventually(lambda: len(results) >= left + 20, timeout=30)  # the first replica carries on alone
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        extra.stop()
        mesh.services.pop("inference-1", None)
    failed = [(status, body) for status, body in results if status != 200]
    assert not failed, failed[:3]
    assert code == 0, extra.log_tail()  # a clean exit, not a kill
    assert "still running after" not in extra.log_tail(60)  # no handler was cancelled at the grace period
    assert held >= 1 and len(results) >= left + 20
    print(f"\n{len(results)} requests, all answered; the replica held {held:.0f} parts when SIGTERM landed")
