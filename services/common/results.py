"""Durable results: the ``loom_results`` KV bucket and the ``loom.res.<pipeline>`` stream.

One key per durable request (its id), holding a ``loom.v1.Result``. The
gateway creates the PENDING record when it accepts a request (``create``: it
never overwrites an answer that came first); fusion puts the answer and
publishes the same bytes on ``loom.res.<pipeline>`` with the request id as
``Nats-Msg-Id``, so the stream holds each answer once even when two fusion
replicas both complete the same request.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import nats.errors
from nats.js.errors import BadRequestError, KeyWrongLastSequenceError
from nats.js.errors import NotFoundError as JsNotFound
from nats.js.kv import KeyValue

from services.common import durable, envelope
from services.common.bus import Bus
from services.common.errors import NotFound, Unavailable
from services.common.kv_follow import open_bucket
from services.common.pb.loom.v1 import gateway_pb2
from services.common.telemetry import inject

Result = gateway_pb2.Result


@contextlib.contextmanager
def _unavailable(what: str) -> Iterator[None]:
    """A bucket without a leader for a moment (a node lost or restarting) is Unavailable: callers retry."""
    try:
        yield
    except (nats.errors.Error, TimeoutError) as exc:
        raise Unavailable(f"the results store could not {what}: {exc or type(exc).__name__}") from exc


class ResultStore:
    def __init__(self, bus: Bus, lane: durable.LaneSettings) -> None:
        self.bus = bus
        self.lane = lane
        self._kv: KeyValue | None = None

    async def start(self) -> None:
        self._kv = await open_bucket(self.bus.js, durable.bucket(self.lane, durable.RESULTS_BUCKET))

    @property
    def kv(self) -> KeyValue:
        if self._kv is None:
            raise Unavailable("the results store is not open yet")
        return self._kv

    async def find(self, request_id: str) -> Result | None:
        with _unavailable("read a result"):
            try:
                entry = await self.kv.get(request_id)
            except JsNotFound:  # never written, deleted or expired
                return None
        if not entry.value:
            return None
        return Result.FromString(entry.value)

    async def get(self, request_id: str) -> Result:
        found = await self.find(request_id)
        if found is None:
            raise NotFound(f"no durable request {request_id!r} (never accepted, or its result expired)")
        return found

    async def create_pending(self, request_id: str, pipeline: str, tenant: str, accepted_ms: int) -> None:
        """Record an accepted request unless something (its answer, a retry) is there already."""
        pending = Result(
            request_id=request_id,
            state=Result.PENDING,
            pipeline=pipeline,
            tenant=tenant,
            accepted_unix_ms=accepted_ms,
        )
        # Exists already (its answer came first, or a retry): nats-py reports that as a wrong last
        # sequence, also from its own second look at a key it takes for deleted.
        with _unavailable("record a request"), contextlib.suppress(KeyWrongLastSequenceError, BadRequestError):
            await self.kv.create(request_id, pending.SerializeToString())

    async def answer(self, result: Result) -> bool:
        """Keep the answer and publish it on ``loom.res.<pipeline>``; False when the stream had it already."""
        result.finished_unix_ms = result.finished_unix_ms or envelope.now_ms()
        raw = result.SerializeToString()
        with _unavailable("keep an answer"):
            await self.kv.put(result.request_id, raw)
        return await self.publish(result)

    async def publish(self, result: Result) -> bool:
        """Publish a kept answer on ``loom.res.<pipeline>`` (once: its request id is the Nats-Msg-Id)."""
        subject = durable.result_subject(result.pipeline)
        return await durable.publish_once(
            self.bus.js, subject, result.SerializeToString(), result.request_id, inject({})
        )
