"""The durable lane's JetStream plumbing: streams, subjects, pull consumers, dead letters.

Work that must not be lost travels on JetStream instead of core NATS. A
durable part bound for ``loom.infer.minilm`` goes to ``loom.work.infer.minilm``
in the ``LOOM_WORK`` stream (work-queue retention: a message is gone once
acked). Each stage pulls from a durable consumer named after its subject,
publishes the next hop with ``Nats-Msg-Id`` (the stream drops a repeat within
its duplicate window) and only then acks, so a crash between the two repeats
the hop, never skips it. A message delivered ``max_deliver`` times without an
ack, or one that cannot be decoded, goes to ``LOOM_DLQ`` with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from services.common import metrics
from services.common.bus import Bus
from services.common.errors import Unavailable
from services.common.retry import Backoff
from services.common.settings import CommonSettings
from services.common.subjects import PREFIX

log = logging.getLogger(__name__)

REQ_STREAM, WORK_STREAM, RES_STREAM, DLQ_STREAM = "LOOM_REQ", "LOOM_WORK", "LOOM_RES", "LOOM_DLQ"
RESULTS_BUCKET, FUSION_BUCKET = "loom_results", "loom_fusion"
MSG_ID = "Nats-Msg-Id"
#: Headers of a dead letter: why, where it was going, and what it was.
DLQ_REASON, DLQ_SUBJECT, DLQ_STREAM_HDR, DLQ_SEQ, DLQ_DELIVERIES, DLQ_MSG_ID = (
    "Loom-Dlq-Reason",
    "Loom-Dlq-Subject",
    "Loom-Dlq-Stream",
    "Loom-Dlq-Seq",
    "Loom-Dlq-Deliveries",
    "Loom-Dlq-Msg-Id",
)
DUPLICATE_WINDOW_S = 120.0


def request_subject(pipeline: str) -> str:
    """Public durable ingress of a pipeline, e.g. ``loom.req.content``."""
    return f"{PREFIX}.req.{pipeline}"


def result_subject(pipeline: str) -> str:
    """Where a pipeline's durable answers are published, e.g. ``loom.res.content``."""
    return f"{PREFIX}.res.{pipeline}"


def work_subject(subject: str) -> str:
    """The durable twin of a stage subject: ``loom.infer.minilm`` -> ``loom.work.infer.minilm``."""
    if not subject.startswith(f"{PREFIX}."):
        raise ValueError(f"not a Loom subject: {subject!r}")
    return f"{PREFIX}.work.{subject[len(PREFIX) + 1 :]}"


def dlq_subject(stage: str) -> str:
    """Dead letters of one stage, e.g. ``loom.dlq.infer_minilm``."""
    return f"{PREFIX}.dlq.{stage}"


def consumer_name(subject: str) -> str:
    """The durable consumer of a work subject: ``loom.work.infer.minilm`` -> ``infer_minilm``."""
    rest = subject.removeprefix(f"{PREFIX}.work.").removesuffix(".>")
    return rest.replace(".", "_").replace("*", "any")


def part_msg_id(request_id: str, part_id: str, slip_left: int) -> str:
    """One hop of one part: the slip only shrinks, so its length names the hop."""
    return f"{request_id}:{part_id}:{slip_left}"


@dataclass(frozen=True)
class LaneSettings:
    """How the lane's streams are made and its consumers behave."""

    replicas: int = 1
    max_deliver: int = 8
    ack_wait_s: float = 10.0
    results_ttl_s: float = 86_400.0
    fusion_ttl_s: float = 3_600.0
    dlq_max_age_s: float = 14 * 86_400.0
    attempt_s: float = 60.0
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0
    concurrency: int = 64

    @property
    def backoff(self) -> Backoff:
        """Pauses between the tries of a transient failure (full jitter)."""
        return Backoff(attempts=self.max_deliver, base_s=self.backoff_s, cap_s=self.backoff_max_s)

    @classmethod
    def from_settings(cls, settings: CommonSettings) -> LaneSettings:
        return cls(
            replicas=settings.js_replicas,
            max_deliver=settings.durable_max_deliver,
            ack_wait_s=settings.durable_ack_wait_s,
            results_ttl_s=settings.results_ttl_s,
            attempt_s=settings.durable_attempt_s,
            backoff_s=settings.durable_backoff_s,
            backoff_max_s=settings.durable_backoff_max_s,
            concurrency=settings.durable_concurrency,
        )


def stream_configs(lane: LaneSettings) -> list[StreamConfig]:
    """Every stream of the durable lane (its KV buckets: :func:`bucket_configs`)."""
    common: dict[str, Any] = {
        "storage": StorageType.FILE,
        "num_replicas": lane.replicas,
        "duplicate_window": DUPLICATE_WINDOW_S,
    }
    return [
        StreamConfig(
            name=REQ_STREAM,
            description="Loom durable requests (loom.v1.PredictRequest), one per accepted request",
            subjects=[f"{PREFIX}.req.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            **common,
        ),
        StreamConfig(
            name=WORK_STREAM,
            description="Loom durable parts between stages (loom.v1.Part)",
            subjects=[f"{PREFIX}.work.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            **common,
        ),
        StreamConfig(
            name=RES_STREAM,
            description="Loom durable results (loom.v1.Result)",
            subjects=[f"{PREFIX}.res.>"],
            retention=RetentionPolicy.LIMITS,
            max_age=lane.results_ttl_s,
            **common,
        ),
        StreamConfig(
            name=DLQ_STREAM,
            description="Loom dead letters: messages a stage could not finish, with the reason",
            subjects=[f"{PREFIX}.dlq.>"],
            retention=RetentionPolicy.LIMITS,
            max_age=lane.dlq_max_age_s,
            **common,
        ),
    ]


def bucket_configs(lane: LaneSettings) -> list[KeyValueConfig]:
    """The lane's KV buckets: answers by request id, and the parts of requests being joined."""
    return [
        KeyValueConfig(bucket=RESULTS_BUCKET, history=1, ttl=lane.results_ttl_s, replicas=lane.replicas),
        KeyValueConfig(bucket=FUSION_BUCKET, history=1, ttl=lane.fusion_ttl_s, replicas=lane.replicas),
    ]


def bucket(lane: LaneSettings, name: str) -> KeyValueConfig:
    return next(c for c in bucket_configs(lane) if c.bucket == name)


async def publish_once(
    js: JetStreamContext, subject: str, payload: bytes, msg_id: str, headers: dict[str, str]
) -> bool:
    """Store ``payload`` on ``subject`` unless ``msg_id`` was stored in the window; True when it was new."""
    try:
        ack = await js.publish(subject, payload, headers={**headers, MSG_ID: msg_id}, timeout=10.0)
    except (nats.errors.Error, TimeoutError) as exc:  # no leader for a moment, a node restarting
        raise Unavailable(f"JetStream did not store the message on {subject}: {exc or type(exc).__name__}") from exc
    return not ack.duplicate


def deliveries(msg: Msg) -> int:
    return int(msg.metadata.num_delivered or 1)


async def dead_letter(js: JetStreamContext, service: str, stage: str, msg: Msg, reason: str) -> None:
    """Park ``msg`` in ``LOOM_DLQ`` with ``reason``, then ack it so it is not delivered again."""
    meta = msg.metadata
    seq = str(meta.sequence.stream) if meta.sequence is not None else "0"
    headers = {
        DLQ_REASON: reason[:1000],
        DLQ_SUBJECT: msg.subject,
        DLQ_STREAM_HDR: meta.stream or "",
        DLQ_SEQ: seq,
        DLQ_DELIVERIES: str(deliveries(msg)),
        # The first id the message had: a replayed letter that dies again keeps naming its request.
        DLQ_MSG_ID: (msg.headers or {}).get(DLQ_MSG_ID) or (msg.headers or {}).get(MSG_ID, ""),
    }
    await publish_once(js, dlq_subject(stage), msg.data, f"dlq:{meta.stream}:{seq}", headers)
    await msg.ack()
    metrics.DEAD_LETTERS.labels(service, stage).inc()
    log.warning("dead letter from %s (stream seq %s): %s", msg.subject, seq, reason)


async def give_up_if_redelivered(js: JetStreamContext, service: str, stage: str, msg: Msg, lane: LaneSettings) -> bool:
    """Dead-letter a message delivered more often than the lane tries (its handler crashed or hung each time)."""
    tries = deliveries(msg)
    if tries <= lane.max_deliver:
        return False
    reason = f"not acknowledged after {tries - 1} deliveries (a replica crashed or hung on it)"
    await dead_letter(js, service, stage, msg, reason)
    return True


MsgHandler = Callable[[Msg], Awaitable[None]]


class PullWorker:
    """Pulls one durable consumer and handles its messages, at most ``concurrency`` at once.

    Replicas bind the same durable consumer, so JetStream shares the work
    between them. The handler acks, naks or dead-letters each message itself;
    one that raises is left unacked and comes back after ``ack_wait``.
    """

    def __init__(
        self,
        bus: Bus,
        stream: str,
        subject: str,
        handler: MsgHandler,
        lane: LaneSettings,
        *,
        durable: str = "",
    ) -> None:
        self.bus = bus
        self.stream = stream
        self.subject = subject
        self.durable = durable or consumer_name(subject)
        self.handler = handler
        self.lane = lane
        self.concurrency = lane.concurrency
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False

    def config(self) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=self.durable,
            filter_subject=self.subject,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.lane.ack_wait_s,
            # One delivery more than the stages try: the extra one only moves the message to the DLQ.
            max_deliver=self.lane.max_deliver + 1,
            max_ack_pending=max(1024, self.concurrency * 4),
        )

    async def start(self) -> None:
        sub = await self.bus.js.pull_subscribe(
            self.subject, durable=self.durable, stream=self.stream, config=self.config()
        )
        self._task = asyncio.create_task(self._pull(sub), name=f"pull-{self.durable}")
        self.bus.workers.append(self)  # Bus.drain stops pulling before it drains subscriptions

    async def _pull(self, sub: JetStreamContext.PullSubscription) -> None:
        slots = asyncio.Semaphore(self.concurrency)
        while not self._stopping:
            await slots.acquire()
            want = 1
            while want < 32 and not slots.locked():
                await slots.acquire()
                want += 1
            try:
                msgs = await sub.fetch(want, timeout=1.0)
            except TimeoutError:
                msgs = []
            except Exception as exc:  # disconnected, consumer gone while NATS restarts: try again
                if not self._stopping:
                    log.info("pull %s: %s; retrying", self.durable, exc)
                    await asyncio.sleep(0.5)
                msgs = []
            for _ in range(want - len(msgs)):
                slots.release()
            for msg in msgs:
                task = asyncio.create_task(self._handle(msg))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                task.add_done_callback(lambda _: slots.release())

    async def _handle(self, msg: Msg) -> None:
        beat = asyncio.create_task(self._heartbeat(msg))
        # Counted under the consumer's filter subject (a bounded label), in the sender's trace.
        with self.bus.consuming(msg, queue=self.durable, label=self.subject):
            try:
                await self.handler(msg)
            except Exception:  # left unacked: JetStream delivers it again after ack_wait
                log.exception("durable handler failed on %s", msg.subject)
                metrics.ERRORS.labels(self.bus.service, "INTERNAL").inc()
            finally:
                beat.cancel()

    async def _heartbeat(self, msg: Msg) -> None:
        """Tell JetStream the message is being worked on, so ``ack_wait`` only runs out for a dead replica.

        Waiting behind other work (a full micro-batch queue) is not a failure;
        a hung handler is cut by the attempt limit (``attempt_s``) instead.
        """
        with contextlib.suppress(Exception):
            while True:
                await asyncio.sleep(self.lane.ack_wait_s / 3)
                await msg.in_progress()

    async def stop(self, grace: float) -> None:
        """Stop pulling; let handlers finish for up to ``grace`` s (the rest is redelivered)."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)
