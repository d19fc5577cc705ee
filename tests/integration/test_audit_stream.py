"""LOOM_AUDIT is append-only in effect: a flood of refused calls never evicts, nor crowds out, admin entries.

A real nats-server; the stream is made as provisioning makes it (audit.stream_config), with a tiny
max_bytes so that the test fills it in a few hundred entries.
"""

from __future__ import annotations

import logging

import pytest
from nats.js.api import DiscardPolicy
from nats.js.errors import APIError
from prometheus_client import REGISTRY

from services.common import audit
from services.common.audit import STREAM, AuditLog
from services.common.bus import Bus
from tests.support import NatsHandle

pytestmark = pytest.mark.integration

MAX_BYTES = 16 * 1024


def skipped(reason: str) -> float:
    return REGISTRY.get_sample_value("loom_audit_skipped_total", {"reason": reason}) or 0.0


async def refusal(log: AuditLog, i: int) -> int:
    """What FailureAudit writes for a call without credentials."""
    details = {"reason": "missing", "message": "no credentials"}
    return await log.append(
        "auth.unauthenticated", actor="", target=f"GET /v1/x{i}", result="refused", details=details, source="10.9.9.9"
    )


async def test_refusals_stop_at_the_reserve_and_admin_entries_still_land(
    nats_server: NatsHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit, "FILL_TTL_S", 0.0)  # read the fill before every entry
    bus = Bus("gateway")
    await bus.connect(nats_server.url, timeout=10)
    try:
        js = bus.nc.jetstream()
        await js.add_stream(audit.stream_config(max_bytes=MAX_BYTES))
        log = AuditLog(bus, service="gateway")
        await log.start()
        first = await log.append("model.register", actor="ana", target="minilm/2", source="10.0.0.1")

        # A flood of refusals: written until the stream reaches its reserve, then only counted.
        before, written = skipped("full"), 0
        for i in range(2000):
            if await refusal(log, i) == 0:
                break
            written += 1
        else:
            pytest.fail("refusals were still written after 2000 entries into a 16 KiB stream")
        assert written > 10
        assert skipped("full") == before + 1
        fill = await log.fill()
        assert fill is not None and 1.0 - audit.RESERVE <= fill < 1.0, fill
        assert REGISTRY.get_sample_value("loom_audit_stream_fill_ratio") == fill
        assert await refusal(log, -1) == 0 and skipped("full") == before + 2

        # The reserve takes admin entries; nothing the flood wrote pushed out the first one.
        admin = [await log.append("traffic.set", actor="ana", target=f"m{i}", source="10.0.0.1") for i in range(3)]
        assert all(seq > 0 for seq in admin), admin
        state = (await js.stream_info(STREAM)).state
        assert state.first_seq == first == 1 and state.last_seq == admin[-1]
        assert state.messages == 1 + written + 3

        # Filled to the brim by admin entries: the next one is refused by the server, none is dropped.
        errors = skipped("error")
        with pytest.raises(APIError):
            for i in range(500):
                await log.append("rollout.start", actor="ana", target=f"m{i}", details={"pad": "x" * 200})
        assert skipped("error") == errors + 1
        full = (await js.stream_info(STREAM)).state
        assert full.first_seq == 1 and full.bytes <= MAX_BYTES
        entries = await log.list(limit=full.messages)
        assert entries[0]["seq"] == 1 and entries[0]["action"] == "model.register"
    finally:
        await bus.close()


async def test_a_stream_made_before_discard_new_still_starts_with_a_warning(
    nats_server: NatsHandle, caplog: pytest.LogCaptureFixture
) -> None:
    bus = Bus("gateway")
    await bus.connect(nats_server.url, timeout=10)
    try:
        old = audit.stream_config()
        old.discard = DiscardPolicy.OLD  # as provisioning made it before
        await bus.nc.jetstream().add_stream(old)
        log = AuditLog(bus, service="gateway")
        with caplog.at_level(logging.WARNING, logger=audit.__name__):
            await log.start()
        assert "--discard new" in caplog.text
        assert await log.append("pipeline.put", actor="ana", target="embed") == 1
    finally:
        await bus.close()


def test_provisioning_makes_the_stream_discard_new() -> None:
    config = audit.stream_config(3)
    assert config.discard == DiscardPolicy.NEW and config.deny_delete and config.deny_purge
    assert config.max_bytes == audit.MAX_BYTES and config.num_replicas == 3
