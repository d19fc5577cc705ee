"""loom_desired_replicas on the real mesh: requests through the gateway show up as load on every stage.

The session mesh's monitor evaluates every second (tests/conftest.py); its /metrics needs a viewer's key,
which the tests' admin key is.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from services.common.launch.mesh import Mesh
from services.monitor.capacity import STAGE_SERVICES
from tests.support import eventually, metric, predict_http

pytestmark = pytest.mark.integration


def test_desired_replicas_follow_real_traffic(mesh: Mesh) -> None:
    texts = [f"capacity probe number {i}: the river rose after three days of rain" for i in range(60)]

    def one(text: str) -> None:
        status, body = predict_http(mesh.gateway_http, text, pipeline="embed", timeout_ms=20000)
        assert status == 200, body

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, texts))

    def signal() -> dict[str, tuple[float, float, float]]:
        got = {
            s: (
                metric(mesh.monitor_http, "loom_desired_replicas", service=s),
                metric(mesh.monitor_http, "loom_stage_arrival_rate", service=s),
                metric(mesh.monitor_http, "loom_stage_service_seconds", service=s),
            )
            for s in STAGE_SERVICES
        }
        # embed = gateway -> pre.text -> infer.minilm -> post.embed -> fusion: every stage saw the requests.
        for service, (desired, rate, seconds) in got.items():
            assert desired >= 1, (service, got)
            assert rate > 0 and seconds > 0, (service, got)
        return got

    got = eventually(signal, timeout=15, interval=0.5)
    desired, rate, seconds = got["inference"]
    print(f"\ninference: loom_desired_replicas={desired:g} arrival_rate={rate:.3f}/s service_seconds={seconds:.4f}")
    # 60 requests in the last minute at most: a small mesh's load asks for the minimum, not for a crowd.
    assert desired <= 2
    # The 60 requests all fall inside the 60 s window (earlier tests' traffic may add to it, never take away).
    assert rate >= 60 / 60.0 * 0.95, got["inference"]
