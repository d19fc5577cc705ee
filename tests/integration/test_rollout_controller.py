"""The rollout controller's decisions against a real nats-server: registry (KV), audit stream, alerts.

Telemetry is fed straight into the VersionBook with synthetic times: this tests what the controller
decides and writes, not the mesh that produces the events (tests/integration/test_rollouts*.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from nats.aio.msg import Msg

from services.common.audit import AuditLog
from services.common.bus import Bus
from services.common.envelope import now_ms
from services.common.lifecycle import Runtime
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.pb.loom.v1 import monitor_pb2
from services.common.registry import ops
from services.common.registry.schema import ModelRecord, RolloutStep, VersionMeta
from services.common.registry.store import RegistryStore
from services.monitor.accuracy import AccuracyBook, AnswerBook
from services.monitor.alerts import AlertBook
from services.monitor.notify import Notifier
from services.monitor.rollout import ALERT, RolloutController
from services.monitor.service import Monitor
from services.monitor.settings import MonitorSettings
from services.monitor.versions import VersionBook
from tests.support import NatsHandle

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000
MODEL = "minilm"
STEPS = [RolloutStep(weight=w, min_requests=50, window_s=60) for w in (10, 50, 100)]


@dataclass
class Replica:
    """One monitor's worth of rollout machinery on its own NATS connection."""

    bus: Bus
    store: RegistryStore
    audit: AuditLog
    versions: VersionBook
    controller: RolloutController


@asynccontextmanager
async def replica(url: str, hold_s: float = 900.0) -> AsyncIterator[Replica]:
    bus = Bus("monitor")
    await bus.connect(url, timeout=10)
    store = RegistryStore(bus, service="monitor")
    await store.start(watch=True)
    audit = AuditLog(bus, service="monitor")
    await audit.start()
    versions = VersionBook()
    accuracy = AccuracyBook(AnswerBook())
    controller = RolloutController(store, audit, versions, accuracy, alert_hold_s=hold_s, min_output_samples=50)
    try:
        yield Replica(bus, store, audit, versions, controller)
    finally:
        await store.stop()
        await bus.close()


def feed(book: VersionBook, version: str, n: int, t: int, *, errors: int = 0, ms: float = 20.0) -> None:
    for i in range(n):
        code = "INTERNAL" if i < errors else "OK"
        event = pb.TelemetryEvent(
            service="inference",
            stage=f"loom.infer.{MODEL}",
            model=MODEL,
            model_version=version,
            duration_ms=ms,
            code=code,
        )
        book.record(event, t)


async def setup_model(store: RegistryStore, *versions: str) -> None:
    for v in versions:
        meta = VersionMeta(version=v, semver=f"{v}.0.0")
        await store.update(MODEL, lambda rec, meta=meta: ops.register(rec, MODEL, meta, T0))


async def start_rollout(store: RegistryStore, version: str, rollout_id: str, t: int) -> None:
    def start(rec: ModelRecord | None) -> ModelRecord:
        assert rec is not None
        return ops.start_rollout(rec, version, t, steps=STEPS, actor="alice", rollout_id=rollout_id)

    await store.update(MODEL, start)


async def seen(store: RegistryStore, check: Callable[[ModelRecord], bool]) -> ModelRecord:
    await store.wait_for(MODEL, lambda rec: rec is not None and check(rec))
    return store.records[MODEL]


async def actions(audit: AuditLog) -> list[tuple[str, str, str]]:
    return [(str(e["action"]), str(e["actor"]), str(e["target"])) for e in await audit.list(target_prefix=MODEL)]


async def test_a_healthy_canary_steps_through_10_50_100_and_is_promoted_once(nats_server: NatsHandle) -> None:
    async with replica(nats_server.url) as a, replica(nats_server.url) as b:
        await setup_model(a.store, "1", "2")
        await start_rollout(a.store, "2", "r-good", T0)
        for r in (a, b):
            await seen(r.store, lambda rec: rec.rollout is not None and rec.rollout.id == "r-good")

        async def both(t: int) -> list[tuple[str, str]]:
            """Both replicas judge at the same moment, as two monitors would."""
            first, second = await asyncio.gather(a.controller.tick(t), b.controller.tick(t))
            return first + second

        # Each replica sees all telemetry; stable answers while the canary warms up.
        t = T0 + 1_000
        for r in (a, b):
            feed(r.versions, "1", 900, t, errors=2)
            feed(r.versions, "2", 30, t)
        assert await both(t) == []  # too few requests, window not over: wait
        rec = await seen(a.store, lambda rec: bool(rec.rollout and rec.rollout.analysis))
        assert rec.rollout is not None and rec.rollout.analysis[-1].verdict == "wait"
        assert rec.policy.canary is not None and rec.policy.canary.weight == 10

        weights = []
        for step, t in enumerate((T0 + 70_000, T0 + 140_000, T0 + 210_000)):
            for r in (a, b):
                feed(r.versions, "2", 60, t)  # enough canary requests, window over, no errors
                if step < 2:
                    feed(r.versions, "1", 300, t)  # at 100 % stable gets nothing new
            decisions = await both(t)
            assert decisions == [(MODEL, "promote" if step == 2 else "step")], decisions  # once, by one replica
            rec = await seen(
                b.store, lambda rec, step=step: rec.rollout is not None and rec.rollout.step == min(step + 1, 2)
            )
            await seen(a.store, lambda rec, u=rec.updated_at_unix_ms: rec.updated_at_unix_ms >= u)
            weights.append(rec.policy.canary.weight if rec.policy.canary else None)
        assert weights == [50, 100, None]

        assert rec.rollout is not None and rec.rollout.state == "succeeded"
        assert rec.policy.stable == "2" and rec.policy.canary is None
        assert rec.history[-1].id == "r-good" and rec.history[-1].analysis[-1].verdict == "pass"
        assert a.controller.conditions(T0 + 220_000) == []
        assert await both(T0 + 230_000) == []  # nothing left to judge

        got = await actions(a.audit)
        assert got == [
            ("rollout.step", "monitor", "minilm/2"),
            ("rollout.step", "monitor", "minilm/2"),
            ("rollout.promote", "monitor", "minilm/2"),
        ]
        entries = await a.audit.list(target_prefix=MODEL)
        assert entries[0]["details"]["analysis"]["verdict"] == "pass"  # type: ignore[index]
        assert entries[0]["details"]["next_weight"] == 50  # type: ignore[index]
        assert entries[2]["details"]["stable"] == "2"  # type: ignore[index]
        rows = a.controller.rows()
        assert rows[0]["weight"] == 100.0 and rows[0]["analysis"]["verdict"] == "pass"  # type: ignore[index]


async def test_a_failing_canary_is_rolled_back_with_audit_entries_and_the_alert(nats_server: NatsHandle) -> None:
    async with replica(nats_server.url, hold_s=900) as m:
        alerts: list[monitor_pb2.Alert] = []

        async def on_alert(msg: Msg) -> None:
            alerts.append(monitor_pb2.Alert.FromString(msg.data))

        await m.bus.nc.subscribe("loom.alert.p2", cb=on_alert)
        await setup_model(m.store, "1", "2")
        await start_rollout(m.store, "2", "r-bad", T0)
        await seen(m.store, lambda rec: rec.rollout is not None)

        t = T0 + 5_000  # long before the step's window ends: a breach does not wait for it
        feed(m.versions, "1", 500, t, errors=1)
        feed(m.versions, "2", 40, t, errors=12)  # 30 % server errors
        assert await m.controller.tick(t) == [(MODEL, "rollback")]
        rec = await seen(m.store, lambda rec: rec.rollout is not None and rec.rollout.state == "rolled_back")
        assert rec.rollout is not None
        assert rec.policy.canary is None and rec.policy.stable == "1"
        assert rec.rollout.reason.startswith("automatic rollback of version 2 at step 1: error_rate")
        assert rec.rollout.finished_at_unix_ms == t and rec.history[-1].state == "rolled_back"
        assert rec.rollout.analysis[-1].verdict == "fail"

        entries = await m.audit.list(target_prefix=MODEL)
        assert [(e["action"], e["actor"], e["target"]) for e in entries] == [
            ("rollout.rollback", "monitor", "minilm/2")
        ]
        assert "error_rate" in str(entries[0]["details"]["reason"])  # type: ignore[index]

        # The alert, through the monitor's alert book and notifier.
        book = AlertBook()
        async with aiohttp.ClientSession() as session:
            notifier = Notifier(m.bus, session)
            await notifier.send(book.evaluate(m.controller.conditions(t), t), book.firing())
            firing = book.firing()
            assert [(x.name, x.severity, x.labels) for x in firing] == [
                (ALERT, "P2", {"model": MODEL, "version": "2", "rollout": "r-bad"})
            ]
            assert "error_rate" in firing[0].summary
            # Still firing during the hold; resolved once it is over.
            assert book.evaluate(m.controller.conditions(t + 600_000), t + 600_000) == []
            resolved = book.evaluate(m.controller.conditions(t + 900_000), t + 900_000)
            await notifier.send(resolved, book.firing())
            assert [x.state for x in resolved] == ["resolved"]
            async with asyncio.timeout(5):
                while len(alerts) < 2:
                    await asyncio.sleep(0.02)
        assert [(x.name, x.state) for x in alerts] == [(ALERT, "firing"), (ALERT, "resolved")]
        assert alerts[0].labels["rollout"] == "r-bad"

        # Fired again from the registry by a fresh book, then resolved by a new rollout of the model.
        fresh = AlertBook()
        assert len(fresh.evaluate(m.controller.conditions(t + 1_000), t + 1_000)) == 1
        await start_rollout(m.store, "2", "r-again", t + 2_000)
        await seen(m.store, lambda rec: rec.rollout is not None and rec.rollout.id == "r-again")
        assert [x.state for x in fresh.evaluate(m.controller.conditions(t + 3_000), t + 3_000)] == ["resolved"]


async def test_a_decision_made_on_a_stale_view_is_not_applied(nats_server: NatsHandle) -> None:
    async with replica(nats_server.url) as m, replica(nats_server.url) as admin:
        await setup_model(admin.store, "1", "2")
        await start_rollout(admin.store, "2", "r-paused", T0)
        await seen(m.store, lambda rec: rec.rollout is not None)
        await m.store.stop()  # the controller's view freezes: the rollout still looks running to it
        await admin.store.update(MODEL, lambda rec: ops.pause(rec, "looking at it", T0 + 1_000))

        t = T0 + 70_000
        feed(m.versions, "1", 500, t)
        feed(m.versions, "2", 100, t)
        assert await m.controller.tick(t) == []  # judged "pass", but the CAS re-check found it paused
        rec = await admin.store.get(MODEL)
        assert rec.rollout is not None and (rec.rollout.state, rec.rollout.step) == ("paused", 0)
        assert rec.rollout.analysis == [] and rec.policy.canary is not None and rec.policy.canary.weight == 10
        assert await actions(admin.audit) == []


async def test_the_monitor_judges_rollouts_on_evaluation_and_serves_them(nats_server: NatsHandle) -> None:
    """The wiring: failed inference events reach the VersionBook, evaluate() rolls back, the API shows it."""
    settings = MonitorSettings(
        nats_url=nats_server.url,
        eval_interval_s=3600,  # evaluations happen when the test asks (POST /v1/evaluate)
        triton_url="127.0.0.1:9",
        triton_metrics_url="http://127.0.0.1:9/metrics",
    )
    monitor = Monitor(settings)
    rt = Runtime.create("monitor", settings)
    await rt.bus.connect(nats_server.url, timeout=10)
    app = web.Application()
    monitor.add_http(app)
    client = TestClient(TestServer(app))
    try:
        await monitor.start(rt)
        await client.start_server()
        assert monitor.registry is not None and monitor.rollouts is not None
        await setup_model(monitor.registry, "1", "2")
        steps = [RolloutStep(weight=w, min_requests=20, window_s=0) for w in (10, 100)]
        t0 = now_ms()
        await monitor.registry.update(
            MODEL, lambda rec: ops.start_rollout(rec, "2", t0, steps=steps, rollout_id="r-live")
        )
        await seen(monitor.registry, lambda rec: rec.rollout is not None and rec.rollout.id == "r-live")

        def infer(version: str, code: str = "OK") -> pb.TelemetryEvent:
            return pb.TelemetryEvent(
                service="inference",
                stage=f"loom.infer.{MODEL}",
                model=MODEL,
                model_version=version,
                code=code,
                duration_ms=15.0,
            )

        for i in range(100):
            monitor.record(infer("1"))
            if i < 30:
                monitor.record(infer("2", "UNAVAILABLE" if i % 2 else "OK"))  # dropped by the other books
        resp = await client.get("/v1/versions")
        versions = {r["version"]: r for r in (await resp.json())["versions"]}
        assert (versions["2"]["requests"], versions["2"]["errors"]) == (30, 15)

        resp = await client.get("/v1/dashboard")
        rows = {r["version"]: r for r in (await resp.json())["models"]["versions"] if r["model"] == MODEL}
        assert rows["2"]["rollout"] == {"stage": "step 1/2", "percent": 10.0, "state": "running", "id": "r-live"}
        assert rows["1"]["rollout"] is None

        assert (await client.post("/v1/evaluate")).status == 200
        rec = await seen(monitor.registry, lambda rec: rec.rollout is not None and rec.rollout.state == "rolled_back")
        assert rec.policy.canary is None

        body = await (await client.get("/v1/rollouts")).json()
        assert body["enabled"] is True
        (row,) = body["rollouts"]
        assert row["rollout"]["state"] == "rolled_back" and row["weight"] == 0.0
        assert row["analysis"]["verdict"] == "fail" and "analysis" not in row["rollout"]
        alerts = (await (await client.get("/v1/alerts")).json())["alerts"]
        assert [(a["name"], a["labels"]["rollout"]) for a in alerts if a["name"] == ALERT] == [(ALERT, "r-live")]
        resp = await client.get("/v1/dashboard")
        rows = {r["version"]: r for r in (await resp.json())["models"]["versions"] if r["model"] == MODEL}
        assert rows["2"]["rollout"]["stage"] == "rolled back" and rows["2"]["rollout"]["percent"] == 0.0
    finally:
        await client.close()
        await monitor.stop()
        await rt.bus.close()
