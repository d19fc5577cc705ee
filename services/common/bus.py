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
import ssl
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from prometheus_client.core import REGISTRY, GaugeMetricFamily
from prometheus_client.registry import Collector

from services.common import metrics
from services.common import retry as retrying
from services.common.errors import NATS_ERROR_CODE, DeadlineExceeded, Unavailable, error_from_nats_headers
from services.common.nats_options import NatsOptions, inbox_prefix, redact
from services.common.telemetry import extract, inject

log = logging.getLogger(__name__)

MsgHandler = Callable[[Msg], Awaitable[None]]


def _metric_subject(subject: str) -> str:
    # Inbox subjects are unique per caller: keep them out of metric labels.
    return "_INBOX" if subject.startswith("_INBOX") else subject


def _is_refusal(exc: BaseException) -> bool:
    """A failure that waiting does not cure: wrong credentials, a certificate one side does not trust."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return True
    if isinstance(exc, ssl.SSLError) and "ALERT" in str(exc.reason or ""):  # the server refused our certificate
        return True
    return "authorization violation" in str(exc).lower()


class _PendingCollector(Collector):
    """``loom_subscription_pending``: messages waiting in each subscription's client queue."""

    def __init__(self) -> None:
        self.buses: weakref.WeakSet[Bus] = weakref.WeakSet()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "loom_subscription_pending",
            "Messages received but not yet handled, per subscription (consumer lag).",
            labels=["service", "subject"],
        )
        for bus in list(self.buses):
            for subject, pending in bus.pending().items():
                family.add_metric([bus.service, subject], pending)
        yield family


_PENDING = _PendingCollector()
REGISTRY.register(_PENDING)


class Bus:
    """One NATS connection of one service."""

    def __init__(self, service: str, *, max_inflight: int = 256, outbox_size: int = 10_000) -> None:
        self.service = service
        self.max_inflight = max_inflight
        self.outbox_size = outbox_size
        self._outbox: asyncio.Queue[tuple[str, bytes, dict[str, str]]] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._subs: list[Subscription] = []
        self._tasks: set[asyncio.Task[None]] = set()
        #: Durable-lane pull workers (services.common.durable.PullWorker): stopped first on drain.
        self.workers: list[Any] = []
        self._tracer = trace.get_tracer("loom.bus")
        self._closing = False
        self._slow_logged: dict[str, float] = {}
        _PENDING.buses.add(self)

    @property
    def nc(self) -> NATS:
        if self._nc is None:
            raise Unavailable("not connected to NATS")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        """This connection's JetStream context, made once (the durable lane uses it per message)."""
        if self._js is None:
            self._js = self.nc.jetstream()
        return self._js

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def connect(self, servers: str, *, timeout: float = 30.0, options: NatsOptions | None = None) -> None:
        """Connect; later outages reconnect forever.

        ``options`` holds the credentials and TLS of the ``LOOM_NATS_*`` settings
        (a ``user:password@`` in a URL works too). Replies and JetStream answers
        come to ``_INBOX.<service>``, so the server can allow each service to
        read its own inbox only (deploy/nats/loom.conf). An unreachable server is
        waited for; a refused login or certificate fails at once, as Unavailable.
        """
        urls = [s.strip() for s in servers.split(",") if s.strip()]
        extra = options.connect_kwargs() if options is not None else {}
        deadline = time.monotonic() + timeout
        refused: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()

        async def on_error(exc: Exception) -> None:
            # nats-py retries a refused login inside connect() forever: stop waiting here instead.
            if not refused.done() and _is_refusal(exc):
                refused.set_result(exc)
            await self._on_error(exc)

        while True:
            attempt = asyncio.ensure_future(
                nats.connect(
                    servers=urls,
                    name=self.service,
                    inbox_prefix=inbox_prefix(self.service),
                    connect_timeout=2,
                    reconnect_time_wait=0.5,
                    max_reconnect_attempts=-1,
                    error_cb=on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    **extra,
                )
            )
            waiting: set[asyncio.Future[Any]] = {attempt, refused}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if refused.done():
                attempt.cancel()
                raise Unavailable(f"NATS at {redact(servers)} refused {self.service}: {refused.result()}")
            try:
                self._nc = attempt.result()
                self._js = None
                return
            except Exception as exc:  # nats raises several unrelated types here
                if time.monotonic() > deadline:
                    raise Unavailable(f"cannot connect to NATS at {redact(servers)}: {exc}") from exc
                await asyncio.sleep(0.5)

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            # The subscription's bounded queue is full: the client dropped this message.
            # Counted under the subscription's subject (loom.tel.>), not the message's.
            subject = _metric_subject(exc.sub.subject if exc.sub is not None else exc.subject)
            metrics.SLOW_CONSUMER_DROPS.labels(self.service, subject).inc()
            now = time.monotonic()
            if now - self._slow_logged.get(subject, 0.0) > 10.0:  # one line per subject per 10 s
                self._slow_logged[subject] = now
                log.warning("slow consumer on %s: the client is dropping messages", subject)
            return
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

    def publish_nowait(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> bool:
        """Queue a fire-and-forget message (telemetry); never waits, False when the queue is full.

        A background task sends the queue, so a slow or disconnected NATS never
        holds up the caller. No span: pass ``traceparent`` in ``headers`` to
        keep the message in the caller's trace.
        """
        if self._outbox is None:
            self._outbox = asyncio.Queue(maxsize=self.outbox_size)
            self._sender = asyncio.create_task(self._send_outbox())
        try:
            self._outbox.put_nowait((subject, payload, dict(headers or {})))
        except asyncio.QueueFull:
            return False
        return True

    async def _send_outbox(self) -> None:
        assert self._outbox is not None
        while True:
            subject, payload, headers = await self._outbox.get()
            try:
                await self.nc.publish(subject, payload, headers=headers or None)
                metrics.MESSAGES.labels(self.service, _metric_subject(subject), "out").inc()
            except Exception as exc:  # dropped: the caller asked for no guarantees
                log.debug("queued publish on %s failed: %s", subject, exc)
            finally:
                self._outbox.task_done()

    async def _flush_outbox(self, timeout: float) -> None:
        if self._outbox is not None and self._sender is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._outbox.join(), timeout)
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
            self._outbox = self._sender = None

    async def request(
        self,
        subject: str,
        payload: bytes,
        *,
        timeout: float,
        headers: dict[str, str] | None = None,
        retry: retrying.Backoff | None = None,
    ) -> Msg:
        """Request/reply inside a CLIENT span; no responder is UNAVAILABLE, silence DEADLINE_EXCEEDED.

        ``retry``, for idempotent questions only: "no responders" (the service has not
        subscribed yet, right after a start) is asked again with jittered backoff, all
        within ``timeout``; each retry counts in ``loom_retries_total{service,step=<subject>}``.
        """
        attrs: dict[str, str | int] = {
            "messaging.system": "nats",
            "messaging.operation.type": "send",
            "messaging.destination.name": subject,
        }
        deadline = time.monotonic() + timeout

        async def ask() -> Msg:
            left = max(deadline - time.monotonic(), 0.001)
            return await self.nc.request(subject, payload, timeout=left, headers=inject(dict(headers or {})))

        with self._tracer.start_as_current_span(f"send {subject}", kind=SpanKind.CLIENT, attributes=attrs):
            try:
                reply = await retrying.retry(
                    ask,
                    policy=retry or retrying.ONCE,
                    retryable=lambda exc: isinstance(exc, nats.errors.NoRespondersError),
                    deadline=deadline,
                    service=self.service,
                    step=_metric_subject(subject),
                )
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

    async def subscribe(
        self, subject: str, handler: MsgHandler, *, queue: str = "", pending_limit: int = 0, inline: bool = False
    ) -> None:
        """Handle ``subject`` with ``handler``, at most ``max_inflight`` at once.

        ``pending_limit`` bounds the messages the client queues for this
        subscription (beyond it the client drops them and counts a slow
        consumer). ``inline`` handles one message at a time in the
        subscription's own task, with no span: for cheap, high-volume handlers
        such as the monitor's telemetry, where the queue is the buffer.
        """
        label = _metric_subject(subject)
        limits: dict[str, Any] = {}
        if pending_limit > 0:
            limits = {"pending_msgs_limit": pending_limit, "pending_bytes_limit": pending_limit * 4096}
        if inline:

            async def on_inline(msg: Msg) -> None:
                metrics.MESSAGES.labels(self.service, label, "in").inc()
                try:
                    await handler(msg)
                except Exception:
                    log.exception("unhandled error on %s", msg.subject)
                    metrics.ERRORS.labels(self.service, "INTERNAL").inc()

            self._subs.append(await self.nc.subscribe(subject, queue=queue, cb=on_inline, **limits))
            return
        limit = asyncio.Semaphore(self.max_inflight)

        async def on_msg(msg: Msg) -> None:
            await limit.acquire()  # back-pressure: the rest waits in the client's queue
            task = asyncio.create_task(self._handle(msg, handler, queue, label))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(lambda _: limit.release())

        self._subs.append(await self.nc.subscribe(subject, queue=queue, cb=on_msg, **limits))

    @contextlib.contextmanager
    def consuming(self, msg: Msg, *, queue: str, label: str) -> Iterator[trace.Span]:
        """One message handled: counted ``in`` under ``label`` and inside a CONSUMER span that continues
        the sender's trace (its ``traceparent`` header). Subscriptions and durable pull workers alike."""
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
        with self._tracer.start_as_current_span(
            span_name, context=parent, kind=SpanKind.CONSUMER, attributes=attrs
        ) as span:
            yield span

    async def _handle(self, msg: Msg, handler: MsgHandler, queue: str, label: str) -> None:
        with self.consuming(msg, queue=queue, label=label):
            try:
                await handler(msg)
            except Exception:  # a handler bug must not kill the subscription
                log.exception("unhandled error on %s", msg.subject)
                metrics.ERRORS.labels(self.service, "INTERNAL").inc()

    def pending(self) -> dict[str, int]:
        """Messages received but not yet handled, per subscribed subject."""
        out: dict[str, int] = {}
        for sub in self._subs:
            subject = _metric_subject(sub.subject)
            out[subject] = out.get(subject, 0) + sub.pending_msgs
        return out

    @property
    def inflight(self) -> int:
        return len(self._tasks)

    async def drain(self, grace: float) -> None:
        """Stop taking messages, then wait up to ``grace`` s for handlers."""
        for worker in self.workers:  # unfinished durable work is redelivered to another replica
            await worker.stop(grace)
        self.workers.clear()
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
        if self._nc is not None and self._nc.is_connected:
            await self._flush_outbox(timeout=2.0)
        elif self._sender is not None:
            self._sender.cancel()
        nc, self._nc = self._nc, None
        if nc is None or nc.is_closed:
            return
        with contextlib.suppress(Exception):
            await nc.flush(timeout=2)
        with contextlib.suppress(Exception):
            await nc.close()
