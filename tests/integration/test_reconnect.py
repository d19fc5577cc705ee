"""Every service rides out a restart of its single nats-server, without being restarted itself.

A mesh of its own (the session's mesh is not disturbed): nats-server is stopped
and started again on the same port with the same JetStream store. Afterwards,
with the same service processes, Predict and Submit answer again and a pipeline
spec stored after the restart reaches all six services (their KV watches came
back with the connection).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from services.common.launch.mesh import SERVICES, Mesh, free_ports
from tests.media import sentence
from tests.support import TEST_API_KEY, eventually, http_json, metric, predict_http

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def own_mesh() -> Iterator[Mesh]:
    m = Mesh(ports=free_ports(), api_key=TEST_API_KEY)
    try:
        m.start(timeout=240)
        yield m
    finally:
        m.stop()


def _submit_done(mesh: Mesh, text: str) -> dict[str, Any] | None:
    status, accepted = http_json(f"{mesh.gateway_http}/v1/pipelines/embed:submit", {"inputs": {"text": text}})
    assert status == 202, accepted

    def done() -> dict[str, Any] | None:
        status, body = http_json(f"{mesh.gateway_http}/v1/results/{accepted['request_id']}")
        assert status == 200, body
        return body if body["state"] != "PENDING" else None

    return eventually(done, timeout=60, interval=0.2)  # type: ignore[no-any-return]


def _applied(mesh: Mesh) -> dict[str, float]:
    return {s: metric(mesh.http_url(s), "loom_pipeline_spec_updates_total", result="applied") for s in SERVICES}


def test_services_reconnect_after_nats_restarts_and_their_watches_survive(own_mesh: Mesh) -> None:
    mesh = own_mesh
    rng = random.Random(11)
    assert predict_http(mesh.gateway_http, sentence(rng, 6))[0] == 200
    first = _submit_done(mesh, sentence(rng, 6))
    assert first is not None and first["state"] == "DONE", first
    pids = {name: proc.pid for name, proc in mesh.services.items()}
    assert mesh.nats is not None

    mesh.nats.process.stop(timeout=10)  # the same NatsServer: same port, same store folder
    assert predict_http(mesh.gateway_http, sentence(rng, 6), timeout_ms=1000)[0] != 200  # it really is gone
    mesh.nats.start()

    # The same processes answer again, once they have reconnected.
    eventually(lambda: predict_http(mesh.gateway_http, sentence(rng, 6))[0] == 200, timeout=60, interval=0.5)
    again = _submit_done(mesh, sentence(rng, 6))
    assert again is not None and again["state"] == "DONE", again

    # A spec stored after the restart reaches every service through its KV watch.
    before = _applied(mesh)
    spec = {
        "name": "after-restart",
        "inputs": {"words": {"modality": "text", "stages": ["pre.text", "infer.minilm", "post.embed"]}},
    }
    url = f"{mesh.gateway_http}/v1/pipelines/after-restart"
    status, body = http_json(url, raw=yaml.safe_dump(spec).encode(), method="PUT")
    assert status == 200, body
    eventually(lambda: all(_applied(mesh)[s] > before[s] for s in SERVICES), timeout=30, interval=0.5)
    status, answer = http_json(f"{url}:predict", {"inputs": {"words": "a football match tonight"}})
    assert status == 200 and answer["outputs"]["words"]["labels"], answer
    assert {name: proc.pid for name, proc in mesh.services.items()} == pids  # no service was restarted
    assert all(proc.running() for proc in mesh.services.values())
