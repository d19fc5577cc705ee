"""The monitor's dead-letter watch: per-stage counts from STREAM.INFO, the gauge, and LoomDeadLetters."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from prometheus_client import REGISTRY

from services.monitor import rules
from services.monitor.alerts import AlertBook
from services.monitor.dlq_watch import DLQ_FILTER, DlqWatch, stage_counts

pytestmark = pytest.mark.unit


class FakeJs:
    """Answers ``stream_info`` with the next reply (a state, or an exception to raise)."""

    def __init__(self, *replies: Any) -> None:
        self.replies = list(replies)
        self.calls: list[tuple[str, str | None]] = []

    async def stream_info(self, name: str, subjects_filter: str | None = None) -> Any:
        self.calls.append((name, subjects_filter))
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return SimpleNamespace(state=SimpleNamespace(messages=sum(reply.values()), subjects=reply))


def gauge(stage: str) -> float | None:
    return REGISTRY.get_sample_value("loom_dlq_messages", {"stage": stage})


def test_stage_counts_from_subjects_or_the_total() -> None:
    subjects = {"loom.dlq.ingress": 2, "loom.dlq.infer_minilm": 1, "loom.dlq.fuse": 0}
    assert stage_counts(subjects, 3) == {"ingress": 2, "infer_minilm": 1}
    assert stage_counts(None, 4) == {"any": 4}  # a server that does not count per subject
    assert stage_counts({}, 0) == {}


async def test_poll_exports_the_gauge_and_keeps_the_last_reading_when_nats_fails() -> None:
    watch = DlqWatch()
    fake = FakeJs({"loom.dlq.ingress": 2}, TimeoutError("nats: timeout"), {}, NotFoundError())
    js = cast(JetStreamContext, fake)
    await watch.poll(js, 1000)
    assert fake.calls == [("LOOM_DLQ", DLQ_FILTER)] and DLQ_FILTER == "loom.dlq.>"
    assert watch.counts == {"ingress": 2} and gauge("ingress") == 2.0
    await watch.poll(js, 2000)
    assert watch.counts == {"ingress": 2} and not watch.ok and watch.polled_unix_ms == 1000
    await watch.poll(js, 3000)
    assert watch.counts == {} and watch.ok and gauge("ingress") is None  # the series goes away
    await watch.poll(js, 4000)  # no LOOM_DLQ at all: nothing is dead
    assert watch.snapshot() == {"total": 0, "stages": {}, "ok": True}


def test_dead_letters_fire_per_stage_and_resolve_when_the_stream_empties() -> None:
    watch = DlqWatch(counts={"ingress": 1, "post_embed": 3})
    book = AlertBook()
    fired = book.evaluate(rules.dead_letters(watch), 1000)
    assert sorted((a.name, a.severity, a.labels["stage"], a.value) for a in fired) == [
        ("LoomDeadLetters", "P2", "ingress", 1.0),
        ("LoomDeadLetters", "P2", "post_embed", 3.0),
    ]
    summary = {a.labels["stage"]: a.summary for a in fired}
    assert summary["ingress"] == (
        "1 message in the dead-letter stream (stage ingress); inspect with `loomctl dlq list --stage ingress`, "
        "replay with `loomctl dlq replay <seq>`"
    )
    assert summary["post_embed"].startswith("3 messages in the dead-letter stream (stage post_embed)")
    watch.counts = {"post_embed": 3}
    (resolved,) = book.evaluate(rules.dead_letters(watch), 2000)
    assert (resolved.labels["stage"], resolved.state) == ("ingress", "resolved")
    watch.counts = {}
    assert [a.state for a in book.evaluate(rules.dead_letters(watch), 3000)] == ["resolved"]
    assert book.firing() == []
