"""Alert transitions reach NATS (loom.alert.<severity>) and an Alertmanager-style webhook."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from nats.aio.msg import Msg

from services.common.bus import Bus
from services.common.pb.loom.v1 import monitor_pb2
from services.monitor.alerts import AlertBook, condition
from services.monitor.notify import Notifier
from tests.support import NatsHandle

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000


async def test_fired_and_resolved_alerts_go_to_nats_and_the_webhook(nats_server: NatsHandle) -> None:
    received: list[Any] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/hook", hook)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    session = aiohttp.ClientSession()
    bus = Bus("monitor-test")
    await bus.connect(nats_server.url)
    published: list[tuple[str, monitor_pb2.Alert]] = []

    async def on_alert(msg: Msg) -> None:
        published.append((msg.subject, monitor_pb2.Alert.FromString(msg.data)))

    await bus.nc.subscribe("loom.alert.*", cb=on_alert)
    try:
        notifier = Notifier(
            bus, session, webhook_url=str(server.make_url("/hook")), generator_url="http://monitor:8090/"
        )
        book = AlertBook()
        firing = condition("LoomDriftHigh", "P2", {"pipeline": "embed", "feature": "text_chars"}, True, 0.42, "drift")
        await notifier.send(book.evaluate([firing], T0), book.firing())
        quiet = condition("LoomDriftHigh", "P2", {"pipeline": "embed", "feature": "text_chars"}, False, 0.05, "ok")
        await notifier.send(book.evaluate([quiet], T0 + 5000), book.firing())
        for _ in range(50):
            if len(received) == 2 and len(published) == 2:
                break
            await asyncio.sleep(0.1)
        assert [(s, a.state) for s, a in published] == [("loom.alert.p2", "firing"), ("loom.alert.p2", "resolved")]
        assert published[1][1].resolved_unix_ms == T0 + 5000 and published[0][1].value == pytest.approx(0.42)
        assert [m["status"] for m in received] == ["firing", "resolved"]
        alert = received[1]["alerts"][0]
        assert alert["labels"]["alertname"] == "LoomDriftHigh" and alert["labels"]["feature"] == "text_chars"
        assert alert["endsAt"].startswith("2023-11-14T22:13:25")
    finally:
        await bus.close()
        await session.close()
        await server.close()
