"""Replicas share work and survive a SIGKILL; a Triton outage is UNAVAILABLE, then heals."""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time

import grpc
import pytest

from services.common.launch.mesh import Mesh
from tests.support import eventually, metric, predict_grpc, predict_http

pytestmark = pytest.mark.integration


def test_two_preprocess_replicas_share_work_and_survive_sigkill(mesh: Mesh) -> None:
    extra, ports = mesh.start_replica("preprocess", "preprocess-1")
    try:
        urls = {"preprocess-0": mesh.http_url("preprocess"), "preprocess-1": f"http://127.0.0.1:{ports['http']}"}

        def handled(replica: str) -> float:
            return metric(urls[replica], "loom_messages_total", subject="loom.pre.text", direction="in")

        before = {r: handled(r) for r in urls}
        for i in range(24):
            assert predict_http(mesh.gateway_http, f"replica sharing {i}")[0] == 200
        shares = {r: handled(r) - before[r] for r in urls}
        assert sum(shares.values()) == 24
        assert all(share > 0 for share in shares.values()), shares

        # A steady stream of requests; one replica is SIGKILLed in the middle of it.
        outcomes: list[tuple[float, int]] = []
        stop = threading.Event()

        def stream() -> None:
            for i in range(400):
                if stop.is_set():
                    return
                started = time.monotonic()
                status, _ = predict_http(mesh.gateway_http, f"stream {i}", timeout_ms=3000)
                outcomes.append((started, status))

        sender = threading.Thread(target=stream)
        sender.start()
        time.sleep(1.0)
        extra.kill()
        killed_at = time.monotonic()
        # A request the dead replica had taken is lost (the caller retries on the
        # interactive lane); wait for enough requests sent after the kill.
        deadline = killed_at + 20
        while sum(1 for started, _ in outcomes if started > killed_at + 0.2) < 10 and time.monotonic() < deadline:
            time.sleep(0.1)
        stop.set()
        sender.join(30)
        after = [status for started, status in outcomes if started > killed_at + 0.2]
        assert len(after) >= 5, outcomes[-5:]
        assert all(status == 200 for status in after), after
        assert sum(1 for started, _ in outcomes if started < killed_at) >= 5
    finally:
        extra.stop()
        mesh.services.pop("preprocess-1", None)


def test_triton_outage_is_unavailable_within_the_deadline_then_heals(mesh: Mesh) -> None:
    pids = {name: proc.pid for name, proc in mesh.services.items()}
    assert mesh.triton is not None
    mesh.triton.stop()
    try:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            predict_grpc(mesh.gateway_grpc, "is anybody there", timeout=10, timeout_ms=3000)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert "Triton" in err.value.details()
        assert time.monotonic() - started < 3.5

        started = time.monotonic()
        status, body = predict_http(mesh.gateway_http, "is anybody there", timeout_ms=3000)
        assert status == 503 and body["error"]["code"] == "UNAVAILABLE"
        assert time.monotonic() - started < 3.5
    finally:
        mesh.start_triton()

    def healed() -> bool:
        status, body = predict_http(mesh.gateway_http, "back again", timeout_ms=3000)
        assert status == 200, body
        return True

    eventually(healed, timeout=60, interval=0.5)
    assert {name: proc.pid for name, proc in mesh.services.items()} == pids
    assert all(proc.running() for proc in mesh.services.values())


def test_sigterm_drains_a_gateway_without_dropping_its_requests(mesh: Mesh) -> None:
    # An earlier test may have restarted Triton: start once the mesh answers again (breakers closed).
    # A new text each try: a cached answer would say nothing about Triton and the breakers.
    probes = itertools.count()
    eventually(
        lambda: predict_http(mesh.gateway_http, f"is the mesh back? {next(probes)}")[0] == 200, timeout=60, interval=0.5
    )
    gw, ports = mesh.start_replica("gateway", "gateway-1")
    try:
        url = f"http://127.0.0.1:{ports['http']}"
        results: list[int] = []
        bodies: list[object] = []

        def call(i: int) -> None:
            status, body = predict_http(url, f"in flight during shutdown {i}", timeout_ms=4000)
            bodies.append(body)
            results.append(status)

        # Freeze preprocess so the requests are surely in flight when SIGTERM lands.
        # Every preprocess replica (an earlier test may have left a second one running).
        frozen = [proc for name, proc in mesh.services.items() if name.startswith("preprocess") and proc.running()]
        for proc in frozen:
            os.kill(proc.pid, signal.SIGSTOP)
        try:
            threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            time.sleep(0.5)
            assert gw.proc is not None
            gw.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert gw.running(), "the gateway quit with requests in flight"
            assert results == []
        finally:
            for proc in frozen:
                os.kill(proc.pid, signal.SIGCONT)
        for t in threads:
            t.join(30)
        assert gw.proc.wait(30) == 0  # a clean exit, not a kill
        assert results.count(200) == 8, bodies
    finally:
        gw.stop()
        mesh.services.pop("gateway-1", None)
