"""The dead-letter stream as the monitor sees it: how many letters wait, per stage.

A dead letter is durable work the lane gave up on (``services/common/durable.py``):
nothing retries it, so until someone looks (``loomctl dlq list``) it is a
request that silently never got its answer. The monitor reads the state of
``LOOM_DLQ`` on every evaluation, one ``STREAM.INFO`` call with a subject
filter that makes JetStream count the messages per subject
(``loom.dlq.<stage>``), and exports ``loom_dlq_messages{stage}``; the rule
``LoomDeadLetters`` (``services.monitor.rules``) fires while any stage has one.
Replaying or deleting a letter removes it from the stream, and the alert resolves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from prometheus_client import Gauge

from services.common import durable

log = logging.getLogger(__name__)

DLQ_MESSAGES = Gauge(
    "loom_dlq_messages",
    "Dead letters waiting in the LOOM_DLQ stream, by the stage that gave up on them (loom.dlq.<stage>).",
    ["stage"],
)
#: Every subject of the stream; the filter is what makes STREAM.INFO count per subject.
DLQ_FILTER = durable.dlq_subject(">")
#: The stage label when the server reports only the stream's total (no per-subject counts).
ANY_STAGE = "any"


def stage_counts(subjects: dict[str, int] | None, total: int) -> dict[str, int]:
    """Letters per stage from STREAM.INFO's per-subject counts; the total under ``any`` when there are none."""
    prefix = durable.dlq_subject("")
    counts = {subject.removeprefix(prefix): n for subject, n in (subjects or {}).items() if n > 0}
    if not counts and total > 0:
        counts = {ANY_STAGE: total}
    return counts


@dataclass
class DlqWatch:
    """Polled by the monitor on every evaluation; the last good reading stays when a poll fails."""

    counts: dict[str, int] = field(default_factory=dict)
    #: Whether the last poll read the stream (False: NATS or JetStream did not answer).
    ok: bool = True
    polled_unix_ms: int | None = None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    async def poll(self, js: JetStreamContext, now_ms: int) -> None:
        try:
            info = await js.stream_info(durable.DLQ_STREAM, subjects_filter=DLQ_FILTER)
        except NotFoundError:  # no durable lane here (yet): nothing can be dead
            self._read({}, now_ms)
            return
        except Exception as exc:
            # Keep the last reading: an alert about letters must not resolve because NATS hiccupped.
            if self.ok:
                log.warning("cannot read the dead-letter stream %s: %s", durable.DLQ_STREAM, exc)
            self.ok = False
            return
        self._read(stage_counts(info.state.subjects, info.state.messages), now_ms)

    def _read(self, counts: dict[str, int], now_ms: int) -> None:
        self.counts, self.ok, self.polled_unix_ms = counts, True, now_ms
        DLQ_MESSAGES.clear()
        for stage, n in counts.items():
            DLQ_MESSAGES.labels(stage).set(n)

    def snapshot(self) -> dict[str, object]:
        return {"total": self.total, "stages": dict(sorted(self.counts.items())), "ok": self.ok}
