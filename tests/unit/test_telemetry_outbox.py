"""The stage-side telemetry path never blocks: TelemetryPublisher -> Bus.publish_nowait -> a bounded outbox.

The NATS connection is a fake whose publish never returns until released (pure queue logic: what matters is
that nothing on the emitting side awaits it). 1000 emits into a 10-slot outbox all return, the overflow is
counted in loom_telemetry_dropped_total, and the queued events go out once NATS moves again.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
from prometheus_client import REGISTRY

from services.common.bus import Bus
from services.common.events import TelemetryPublisher
from services.common.pb.loom.v1 import envelope_pb2 as pb

pytestmark = pytest.mark.unit

SERVICE = "outbox-test"


@dataclass
class StalledNats:
    """A NATS client whose publish hangs until ``release`` is set."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    started: int = 0
    sent: list[tuple[str, bytes]] = field(default_factory=list)
    is_connected: bool = True

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> None:
        self.started += 1
        await self.release.wait()
        self.sent.append((subject, payload))


def dropped() -> float:
    return REGISTRY.get_sample_value("loom_telemetry_dropped_total", {"service": SERVICE}) or 0.0


async def test_emits_never_wait_for_a_stalled_nats_and_the_overflow_is_counted() -> None:
    bus = Bus(SERVICE, outbox_size=10)
    nc = StalledNats()
    bus._nc = nc  # type: ignore[assignment]
    telemetry = TelemetryPublisher(bus, SERVICE)
    before = dropped()

    async def emit_all() -> None:
        for i in range(1000):
            await telemetry.emit("loom.pre.text", pipeline="embed", request_id=f"r{i}", duration_ms=1.0)

    # Bounded wait, not a timing assertion: with a blocking path this would never finish.
    await asyncio.wait_for(emit_all(), timeout=10)
    assert nc.sent == []  # NATS has taken nothing: every emit returned without it
    lost = dropped() - before
    # 10 fit in the outbox (the sender may have taken one more off it to the stalled publish).
    assert 989 <= lost <= 990
    assert nc.started <= 1

    nc.release.set()
    for _ in range(500):  # bounded wait for the sender to drain the outbox
        if len(nc.sent) == 1000 - lost:
            break
        await asyncio.sleep(0.01)
    assert len(nc.sent) == 1000 - lost
    subjects = {subject for subject, _ in nc.sent}
    assert subjects == {f"loom.tel.{SERVICE}"}
    first = pb.TelemetryEvent.FromString(nc.sent[0][1])
    assert (first.service, first.stage, first.duration_ms) == (SERVICE, "loom.pre.text", 1.0)

    # Room again: the next emit is queued and sent, not dropped.
    await telemetry.emit("loom.pre.text", pipeline="embed", request_id="after", duration_ms=2.0)
    for _ in range(500):
        if len(nc.sent) == 1001 - lost:
            break
        await asyncio.sleep(0.01)
    assert len(nc.sent) == 1001 - lost and dropped() - before == lost
    await bus._flush_outbox(timeout=1.0)
