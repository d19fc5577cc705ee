"""The registry bucket and the audit stream against a real nats-server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from nats.js.errors import APIError
from prometheus_client import REGISTRY

from services.common import audit as audit_mod
from services.common.audit import STREAM, AuditLog
from services.common.bus import Bus
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.registry import ops
from services.common.registry.schema import ModelRecord, VersionMeta
from services.common.registry.store import BUCKET, RegistryStore
from tests.support import NatsHandle

pytestmark = pytest.mark.integration


def meta(version: str) -> VersionMeta:
    return VersionMeta(version=version, semver=f"{version}.0.0")


def now_ms() -> int:
    return int(time.time() * 1000)


async def connected(name: str, url: str) -> Bus:
    bus = Bus(name)
    await bus.connect(url, timeout=10)
    return bus


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Bounded wait for a condition fed by the watch, which runs in this event loop."""
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


def on(change: Callable[[ModelRecord], ModelRecord]) -> Callable[[ModelRecord | None], ModelRecord]:
    """A store change for a model that must exist."""

    def run(rec: ModelRecord | None) -> ModelRecord:
        assert rec is not None
        return change(rec)

    return run


def conflicts(service: str) -> float:
    return REGISTRY.get_sample_value("loom_registry_write_conflicts_total", {"service": service}) or 0.0


def updates(service: str, result: str) -> float:
    return REGISTRY.get_sample_value("loom_registry_updates_total", {"service": service, "result": result}) or 0.0


async def test_create_update_and_concurrent_writers(nats_server: NatsHandle) -> None:
    bus_a, bus_b = await connected("gateway", nats_server.url), await connected("monitor", nats_server.url)
    a, b = RegistryStore(bus_a, service="reg-a"), RegistryStore(bus_b, service="reg-b")
    try:
        await a.start(watch=False)
        await b.start(watch=False)
        with pytest.raises(NotFound, match="model 'minilm' is not registered; registered models: none"):
            await a.get("minilm")
        created = await a.update("minilm", lambda rec: ops.register(rec, "minilm", meta("1"), now_ms()))
        assert created.stable == "1" and created.updated_at_unix_ms > 0
        assert await b.get("minilm") == created

        # Two writers, each adding its own versions at the same time: every write lands once.
        calls = {"a": 0, "b": 0}

        def adder(who: str, version: str) -> Callable[[ModelRecord | None], ModelRecord]:
            def change(rec: ModelRecord | None) -> ModelRecord:
                calls[who] += 1
                return ops.register(rec, "minilm", meta(version), now_ms())

            return change

        async def writer(store: RegistryStore, who: str, versions: range) -> None:
            for v in versions:
                await store.update("minilm", adder(who, str(v)))

        await asyncio.gather(writer(a, "a", range(2, 12)), writer(b, "b", range(12, 22)))
        final = await a.get("minilm")
        assert final.active_versions() == [str(v) for v in range(1, 22)]  # no write lost
        assert conflicts("reg-a") + conflicts("reg-b") == calls["a"] + calls["b"] - 20  # each lost race re-ran

        # A write by b that lands between a's read and a's write: a's first write is refused and retried.
        real_read, slipped = a._read, list[ModelRecord]()

        async def read_then_b_writes(model: str) -> tuple[ModelRecord | None, int]:
            out = await real_read(model)
            if not slipped:
                slipped.append(await b.update(model, adder("b", "30")))
            return out

        before = conflicts("reg-a")
        a._read = read_then_b_writes  # type: ignore[method-assign]
        try:
            merged = await a.update("minilm", adder("a", "31"))
        finally:
            a._read = real_read  # type: ignore[method-assign]
        assert conflicts("reg-a") == before + 1
        assert {"30", "31"} <= set(merged.active_versions())  # b's write is kept, not overwritten

        # A refused change writes nothing; a schema error reads as InvalidArgument.
        revision = (await a.kv.get("minilm")).revision
        with pytest.raises(FailedPrecondition, match="stable version"):
            await a.update("minilm", on(lambda rec: ops.retire(rec, "1", now_ms())))

        def bad_name(rec: ModelRecord | None) -> ModelRecord:
            assert rec is not None
            return ModelRecord.model_validate({**rec.model_dump(), "policy": {"stable": "x"}})

        with pytest.raises(InvalidArgument, match=r"policy\.stable"):
            await a.update("minilm", bad_name)
        assert (await a.kv.get("minilm")).revision == revision
        with pytest.raises(InvalidArgument, match="model name"):
            await a.update("Not A Key", lambda rec: ops.register(rec, "x", meta("1"), 0))
        assert [r.name for r in await b.list()] == ["minilm"]
    finally:
        for store in (a, b):
            await store.stop()
        for bus in (bus_a, bus_b):
            await bus.close()


async def test_watch_follows_changes_and_ignores_bad_values(nats_server: NatsHandle) -> None:
    bus_w, bus_r = await connected("writer", nats_server.url), await connected("reader", nats_server.url)
    writer, reader = RegistryStore(bus_w, service="reg-w"), RegistryStore(bus_r, service="reg-r")
    seen: list[tuple[str, str | None]] = []
    try:
        await writer.start(watch=False)
        await writer.update("minilm", lambda rec: ops.register(rec, "minilm", meta("1"), now_ms()))
        reader.on_change(lambda name, rec: seen.append((name, rec.stable if rec else None)))
        await reader.start()  # loads what is there before it returns
        assert reader.records["minilm"].stable == "1"

        rec = await writer.update("minilm", lambda rec: ops.register(rec, "minilm", meta("2"), now_ms()))
        rec = await writer.update("minilm", on(lambda rec: ops.promote(rec, "2", now_ms())))
        await until(lambda: reader.records["minilm"].stable == "2")
        assert reader.records["minilm"] == rec
        assert seen[0] == ("minilm", "1") and seen[-1] == ("minilm", "2")

        # A bad value put straight into the bucket: logged, counted, the last good record stays.
        rejected = updates("reg-r", "rejected")
        await writer.kv.put("minilm", b'{"name": "minilm", "policy": {')
        await writer.kv.put("minilm", b'{"name": "minilm", "policy": {"stable": "0"}}')
        await until(lambda: updates("reg-r", "rejected") == rejected + 2)
        assert reader.records["minilm"] == rec
        # A write through a watching store repairs the key from the last good record.
        repaired = await reader.update("minilm", on(lambda rec: rec))
        assert repaired.stable == "2" and (await writer.get("minilm")).stable == "2"
        # A store with no good record to fall back on names the way out.
        await writer.kv.put("other", b"not json")
        with pytest.raises(FailedPrecondition, match=f"nats kv del {BUCKET} other"):
            await writer.get("other")
        assert [r.name for r in await writer.list()] == ["minilm"]  # the bad one is skipped

        await writer.kv.delete("minilm")
        await until(lambda: "minilm" not in reader.records)
        assert seen[-1][1] is None
        recreated = await writer.update("minilm", lambda rec: ops.register(rec, "minilm", meta("3"), now_ms()))
        assert recreated.stable == "3"  # a deleted key can be created again
    finally:
        for store in (writer, reader):
            await store.stop()
        for bus in (bus_w, bus_r):
            await bus.close()


async def test_audit_log_appends_lists_and_refuses_deletes(nats_server: NatsHandle) -> None:
    bus = await connected("gateway", nats_server.url)
    try:
        log = AuditLog(bus, service="gateway")
        await log.start()
        seqs = [
            await log.append("model.register", actor="ana", target="minilm/2", details={"semver": "2.0.0"}),
            await log.append("rollout.start", actor="ana", target="minilm", details={"version": "2"}),
            await log.append("model.register", actor="bob", target="minilm_faulty/1"),
            await log.append("rollout.rollback", actor="monitor", target="minilm", result="ok", source="auto"),
        ]
        assert seqs == sorted(seqs) and len(set(seqs)) == 4

        entries = await log.list()
        assert [e["seq"] for e in entries] == seqs  # oldest first
        first = entries[0]
        assert {k: first[k] for k in ("actor", "action", "target", "result", "service")} == {
            "actor": "ana",
            "action": "model.register",
            "target": "minilm/2",
            "result": "ok",
            "service": "gateway",
        }
        assert first["details"] == {"semver": "2.0.0"} and str(first["time"]).endswith("Z")
        assert [e["seq"] for e in await log.list(limit=2)] == seqs[2:]  # the newest two
        assert [e["target"] for e in await log.list(target_prefix="minilm")] == ["minilm/2", "minilm", "minilm"]
        assert [e["seq"] for e in await log.list(limit=1, target_prefix="minilm")] == [seqs[3]]

        js = bus.nc.jetstream()
        rollback = await js.get_msg(STREAM, seq=seqs[3])
        assert rollback.subject == "loom.audit.rollout"
        with pytest.raises(APIError):
            await js.delete_msg(STREAM, seqs[0])
        with pytest.raises(APIError):
            await js.purge_stream(STREAM)
        assert [e["seq"] for e in await log.list()] == seqs  # nothing went

        again = AuditLog(bus, service="monitor")
        await again.start()  # an existing, well-configured stream is used as it is
        assert await again.append("rollout.step", actor="monitor", target="minilm") == seqs[-1] + 1
        assert len(await log.list()) == 5
        with pytest.raises(InvalidArgument, match="dotted words"):
            await log.append("bad action", actor="x")
    finally:
        await bus.close()


async def test_audit_refuses_a_stream_that_allows_deletes(nats_server: NatsHandle) -> None:
    bus = await connected("gateway", nats_server.url)
    try:
        js = bus.nc.jetstream()
        await js.add_stream(name=STREAM, subjects=[audit_mod.SUBJECTS])
        with pytest.raises(FailedPrecondition, match="allows message deletes or purges"):
            await AuditLog(bus, service="gateway").start()
    finally:
        await bus.close()


async def test_audit_list_reads_back_in_windows(nats_server: NatsHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit_mod, "_WINDOW", 7)
    bus = await connected("gateway", nats_server.url)
    try:
        log = AuditLog(bus, service="gateway")
        await log.start()
        for i in range(30):
            await log.append("traffic.set", actor="ana", target=f"m{i % 3}", details={"i": i})
        assert [e["details"] for e in await log.list(limit=25)] == [{"i": i} for i in range(5, 30)]
        assert [e["details"] for e in await log.list(limit=4, target_prefix="m1")] == [
            {"i": i} for i in (19, 22, 25, 28)
        ]
        assert await log.list(limit=0) == []
    finally:
        await bus.close()
