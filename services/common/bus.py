"""The NATS bus: publish, subscribe (queue groups), headers and tracing.

Every publish is a PRODUCER span whose context travels in the message's
``traceparent`` header; every message handled is a CONSUMER span that
continues it. Handlers run as tasks, bounded per subscription, so one slow
message never blocks its neighbours, and :meth:`Bus.drain` waits for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from services.common import metrics
from services.common.errors import NATS_ERROR_CODE, DeadlineExceeded, Unavailable, error_from_nats_headers
from services.common.telemetry import extract, inject

log = logging.getLogger(__name__)

MsgHandler = Callable[[Msg], Awaitable[None]]


def _metric_subject(subject: str) -> str:
    # Inbox subjects are unique per caller: keep them out of metric labels.
    return "_INBOX" if subject.startswith("_INBOX") else subject


class Bus:
    """One NATS connection of one service."""

    def __init__(self, service: str, *, max_inflight: int = 256) -> None:
        self.service = service
        self.max_inflight = max_inflight
        self._nc: NATS | None = None
        self._subs: list[Subscription] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._tracer = trace.get_tracer("loom.bus")
        self._closing = False

    @property
    def nc(self) -> NATS:
        if self._nc is None:
            raise Unavailable("not connected to NATS")
        return self._nc

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def connect(self, servers: str, *, timeout: float = 30.0) -> None:
        """Connect, retrying until ``timeout``; later outages reconnect forever."""
        urls = [s.strip() for s in servers.split(",") if s.strip()]
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._nc = await nats.connect(
                    servers=urls,
                    name=self.service,
                    connect_timeout=2,
                    reconnect_time_wait=0.5,
                    max_reconnect_attempts=-1,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                )
                return
            except Exception as exc:  # nats raises several unrelated types here
                if time.monotonic() > deadline:
                    raise Unavailable(f"cannot connect to NATS at {servers}: {exc}") from exc
                await asyncio.sleep(0.5)

    async def _on_error(self, exc: Exception) -> None:
        log.warning("nats error: %s", exc)

    async def _on_disconnected(self) -> None:
        if not self._closing:
            log.warning("disconnected from NATS")

    async def _on_reconnected(self) -> None:
        log.info("reconnected to NATS")

    def new_inbox(self) -> str:
        return self.nc.new_inbox()

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> None:
        """Publish inside a PRODUCER span; ``traceparent`` goes into the headers."""
        attrs: dict[str, str | int] = {
            "messaging.system": "nats",
            "messaging.operation.type": "publish",
            "messaging.destination.name": subject,
            "messaging.message.body.size": len(payload),
        }
        name = f"publish {_metric_subject(subject)}"
        with self._tracer.start_as_current_span(name, kind=SpanKind.PRODUCER, attributes=attrs):
            hdrs = inject(dict(headers or {}))
            await self.nc.publish(subject, payload, headers=hdrs)
        metrics.MESSAGES.labels(self.service, _metric_subject(subject), "out").inc()

    async def request(
        self, subject: str, payload: bytes, *, timeout: float, headers: dict[str, str] | None = None
    ) -> Msg:
        """Request/reply inside a CLIENT span; no responder is UNAVAILABLE, silence DEADLINE_EXCEEDED."""
        attrs: dict[str, str | int] = {
            "messaging.system": "nats",
            "messaging.operation.type": "send",
            "messaging.destination.name": subject,
        }
        with self._tracer.start_as_current_span(f"send {subject}", kind=SpanKind.CLIENT, attributes=attrs):
            try:
                reply = await self.nc.request(subject, payload, timeout=timeout, headers=inject(dict(headers or {})))
            except nats.errors.NoRespondersError:
                raise Unavailable(f"no service answers on {subject}") from None
            except nats.errors.TimeoutError:
                raise DeadlineExceeded(f"no reply on {subject} within {timeout:.3f}s") from None
        metrics.MESSAGES.labels(self.service, _metric_subject(subject), "out").inc()
        if reply.headers and NATS_ERROR_CODE in reply.headers:
            raise error_from_nats_headers(reply.headers)
        return reply

    async def respond(self, msg: Msg, payload: bytes, headers: dict[str, str] | None = None) -> None:
        """Answer a request (the reply travels on the requester's inbox)."""
        if msg.reply:
            await self.publish(msg.reply, payload, headers)

    async def subscribe(self, subject: str, handler: MsgHandler, *, queue: str = "") -> None:
        """Handle ``subject`` with ``handler``, at most ``max_inflight`` at once."""
        limit = asyncio.Semaphore(self.max_inflight)
        label = _metric_subject(subject)

        async def on_msg(msg: Msg) -> None:
            await limit.acquire()  # back-pressure: the rest waits in the client's queue
            task = asyncio.create_task(self._handle(msg, handler, queue, label))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(lambda _: limit.release())

        self._subs.append(await self.nc.subscribe(subject, queue=queue, cb=on_msg))

    async def _handle(self, msg: Msg, handler: MsgHandler, queue: str, label: str) -> None:
        metrics.MESSAGES.labels(self.service, label, "in").inc()
        attrs: dict[str, str | int] = {
            "messaging.system": "nats",
            "messaging.operation.type": "process",
            "messaging.destination.name": msg.subject,
            "messaging.consumer.group.name": queue,
            "messaging.message.body.size": len(msg.data),
        }
        parent = extract(msg.headers)
        span_name = f"process {label if label == '_INBOX' else msg.subject}"
        with self._tracer.start_as_current_span(span_name, context=parent, kind=SpanKind.CONSUMER, attributes=attrs):
            try:
                await handler(msg)
            except Exception:  # a handler bug must not kill the subscription
                log.exception("unhandled error on %s", msg.subject)
                metrics.ERRORS.labels(self.service, "INTERNAL").inc()

    @property
    def inflight(self) -> int:
        return len(self._tasks)

    async def drain(self, grace: float) -> None:
        """Stop taking messages, then wait up to ``grace`` s for handlers."""
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.drain()  # type: ignore[no-untyped-call]  # handles what the client already queued
        self._subs.clear()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            if pending:
                log.warning("%d handlers still running after %.1fs; cancelling", len(pending), grace)
                for task in pending:
                    task.cancel()

    async def close(self) -> None:
        """Flush what was published and close; safe to call twice."""
        self._closing = True
        nc, self._nc = self._nc, None
        if nc is None or nc.is_closed:
            return
        with contextlib.suppress(Exception):
            await nc.flush(timeout=2)
        with contextlib.suppress(Exception):
            await nc.close()
