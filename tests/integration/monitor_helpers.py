"""Helpers of the monitor's integration tests: traffic, the monitor's JSON API, its /metrics, and a NATS listener
for loom.alert.*."""

from __future__ import annotations

import asyncio
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import nats

from services.common.launch.mesh import Mesh
from services.common.pb.loom.v1 import monitor_pb2
from tests.support import TEST_VIEWER_KEY, bearer, http_json, predict_http

#: The session mesh's evaluation interval (tests/conftest.py MONITOR_TEST_ENV).
EVAL_S = 1.0


def send(mesh: Mesh, texts: list[str], pipeline: str = "embed", workers: int = 8) -> list[dict[str, Any]]:
    """Predict each text (in parallel); every answer must be a 200."""

    def one(text: str) -> dict[str, Any]:
        status, body = predict_http(mesh.gateway_http, text, pipeline=pipeline, timeout_ms=20000)
        assert status == 200, body
        return body  # type: ignore[no-any-return]

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, texts))


def drift(monitor_http: str, pipeline: str) -> dict[str, dict[str, Any]]:
    """The monitor's drift rows of ``pipeline`` by feature."""
    status, body = http_json(f"{monitor_http}/v1/drift")
    assert status == 200
    return {d["feature"]: d for d in body["features"] if d["pipeline"] == pipeline}


def alerts(monitor_http: str, name: str, state: str = "active", **labels: str) -> list[dict[str, Any]]:
    """The monitor's alerts called ``name`` whose labels include ``labels``."""
    status, body = http_json(f"{monitor_http}/v1/alerts?state={state}")
    assert status == 200
    return [a for a in body["alerts"] if a["name"] == name and all(a["labels"].get(k) == v for k, v in labels.items())]


def metrics_text(monitor_http: str) -> str:
    """The monitor's /metrics (it needs a viewer's key)."""
    req = urllib.request.Request(f"{monitor_http}/metrics", headers=bearer(TEST_VIEWER_KEY))
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200
        return resp.read().decode()  # type: ignore[no-any-return]


class AlertListener:
    """Collects loom.alert.* messages on a thread of its own."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.seen: list[monitor_pb2.Alert] = []
        self._loop = asyncio.new_event_loop()

    def __enter__(self) -> AlertListener:
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._subscribe(), self._loop).result(10)
        return self

    async def _subscribe(self) -> None:
        self._nc = await nats.connect(self.url)

        async def on_alert(msg: Any) -> None:
            self.seen.append(monitor_pb2.Alert.FromString(msg.data))

        await self._nc.subscribe("loom.alert.*", cb=on_alert)
        await self._nc.flush()

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._nc.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def states(self, name: str, **labels: str) -> list[str]:
        """The states ("firing", "resolved") seen for alerts called ``name`` whose labels include ``labels``."""
        return [
            a.state for a in list(self.seen) if a.name == name and all(a.labels.get(k) == v for k, v in labels.items())
        ]
