"""The gateway's durable lane: Submit, GetResult, and the ingress that turns requests into parts.

``Submit`` validates a request like ``Predict`` and stores it on
``loom.req.<pipeline>`` (stream ``LOOM_REQ``) with its id as ``Nats-Msg-Id``;
once JetStream has acked it, the request is accepted and will not be lost.
Event publishers put the same ``loom.v1.PredictRequest`` on the same subject.
Every gateway replica pulls the shared ``ingress`` consumer: it splits each
request into parts, stores them on ``loom.work.*`` and only then acks.

An idempotency key names the request (per tenant), so a Submit retried after
a lost reply finds the first one instead of queueing a second.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import time

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from opentelemetry import trace

from services.common import auth, durable, envelope, metrics
from services.common.bus import Bus
from services.common.claims import ClaimCheck
from services.common.errors import (
    AlreadyExists,
    InvalidArgument,
    LoomError,
    NotFound,
    ResourceExhausted,
    to_proto,
)
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.pb.loom.v1 import gateway_pb2
from services.common.results import ResultStore
from services.common.telemetry import inject
from services.gateway import convert
from services.gateway.core import GatewayCore, PredictCall

log = logging.getLogger(__name__)

ROUTE_KEY_HEADER = "Loom-Route-Key"
INGRESS = "ingress"
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,128}$")
#: What a durable request may weigh on the bus (the rest of NATS's max_payload is headers and framing).
PAYLOAD_MARGIN = 64 * 1024


def request_id_for(tenant: str, key: str) -> str:
    """The request id an idempotency key names: the same key of the same tenant, the same id."""
    if not _IDEMPOTENCY_KEY.match(key):
        raise InvalidArgument("the idempotency key must be 1-128 printable ASCII characters without spaces")
    return "ik-" + hashlib.sha256(f"{tenant}\0{key}".encode()).hexdigest()[:40]


class DurableFront:
    def __init__(self, bus: Bus, core: GatewayCore, claims: ClaimCheck | None, lane: durable.LaneSettings) -> None:
        self.bus = bus
        self.core = core
        self.claims = claims
        self.lane = lane
        self.results = ResultStore(bus, lane)

    async def start(self, *, ingress: bool = True) -> None:
        await self.results.start()
        if ingress:
            subject = durable.request_subject(">")
            await durable.PullWorker(
                self.bus, durable.REQ_STREAM, subject, self.on_request, self.lane, durable=INGRESS
            ).start()

    # --- Submit / GetResult ------------------------------------------------------------------------------

    def _timeout_ms(self, call: PredictCall) -> int:
        gw = self.core.settings
        if call.timeout_ms < 0 or call.timeout_ms > gw.durable_max_timeout_ms:
            raise InvalidArgument(f"timeout_ms of a durable request must be 0..{gw.durable_max_timeout_ms}")
        return call.timeout_ms or gw.durable_timeout_ms

    async def submit(self, call: PredictCall, idempotency_key: str = "") -> gateway_pb2.SubmitResponse:
        """Accept ``call`` into the durable lane; returns once JetStream has stored it.

        Timed as ``stage="gateway.submit"``: the acceptance only, as the answer comes later.
        """
        started = time.perf_counter()
        try:
            return await self._submit(call, idempotency_key)
        finally:
            label = self.core.pipelines.metric_label(call.pipeline)
            self.core.observe_stage("gateway.submit", label, "", "", (time.perf_counter() - started) * 1000.0)

    async def _submit(self, call: PredictCall, idempotency_key: str) -> gateway_pb2.SubmitResponse:
        spec, _ = self.core.validate(dataclasses.replace(call, timeout_ms=0, transport_remaining_s=None))
        timeout_ms = self._timeout_ms(call)
        principal = auth.current()
        tenant = principal.tenant if principal is not None else ""
        request_id = request_id_for(tenant, idempotency_key) if idempotency_key else call.request_id
        request_id = request_id or envelope.new_request_id()
        # Names the trace by the id the caller fetches with: `loomctl trace <request_id>` finds it.
        trace.get_current_span().set_attribute("loom.request_id", request_id)
        existing = await self.results.find(request_id)
        if existing is not None and existing.tenant != tenant:
            raise AlreadyExists(f"request id {request_id!r} is taken; choose another")
        if existing is not None and existing.state != gateway_pb2.Result.PENDING:
            metrics.DURABLE.labels("gateway", INGRESS, "duplicate").inc()
            return gateway_pb2.SubmitResponse(request_id=request_id, duplicate=True)
        req = convert.call_to_proto(dataclasses.replace(call, pipeline=spec.name, request_id=request_id))
        req.timeout_ms = timeout_ms
        raw = req.SerializeToString()
        limit = self.bus.nc.max_payload - PAYLOAD_MARGIN
        if len(raw) > limit:
            raise ResourceExhausted(
                f"a durable request may carry at most {limit} bytes of inputs; this one has {len(raw)}"
            )
        # The record first: it is what the ingress trusts for the tenant. A PENDING record whose
        # publish failed is published again by the caller's retry (same key, same id).
        if existing is None:
            await self.results.create_pending(request_id, spec.name, tenant, envelope.now_ms())
        headers = inject({ROUTE_KEY_HEADER: call.route_key} if call.route_key else {})
        fresh = await durable.publish_once(self.bus.js, durable.request_subject(spec.name), raw, request_id, headers)
        duplicate = existing is not None or not fresh
        metrics.DURABLE.labels("gateway", INGRESS, "duplicate" if duplicate else "accepted").inc()
        return gateway_pb2.SubmitResponse(request_id=request_id, duplicate=duplicate)

    async def get_result(self, request_id: str) -> gateway_pb2.Result:
        envelope.check_request_id(request_id)
        result = await self.results.get(request_id)
        principal = auth.current()
        if principal is not None and result.tenant != principal.tenant and auth.Role.ADMIN not in principal.roles:
            # Not another tenant's business, not even whether the id exists.
            raise NotFound(f"no durable request {request_id!r} (never accepted, or its result expired)")
        return result

    # --- ingress ------------------------------------------------------------------------------------------

    async def on_request(self, msg: Msg) -> None:
        """One accepted request: store its parts on ``loom.work.*``, then ack it."""
        js = self.bus.js
        if await durable.give_up_if_redelivered(js, "gateway", INGRESS, msg, self.lane):
            return None
        try:
            req = gateway_pb2.PredictRequest.FromString(msg.data)
        except DecodeError:
            return await durable.dead_letter(js, "gateway", INGRESS, msg, "undecodable loom.v1.PredictRequest")
        headers = msg.headers or {}
        pipeline = msg.subject.removeprefix(durable.request_subject(""))
        seq = msg.metadata.sequence.stream if msg.metadata.sequence is not None else 0
        first_id = headers.get(durable.DLQ_MSG_ID) or headers.get(durable.MSG_ID, "")  # replays keep the first
        request_id = req.request_id or first_id or f"seq-{seq}"
        accepted_ms = int(msg.metadata.timestamp.timestamp() * 1000) if msg.metadata.timestamp else envelope.now_ms()
        try:
            envelope.check_request_id(request_id)
        except LoomError as exc:
            return await durable.dead_letter(js, "gateway", INGRESS, msg, str(exc))
        # The tenant comes from the record Submit wrote, never from a header a publisher could set.
        record = await self.results.find(request_id)
        if record is not None and record.state != gateway_pb2.Result.PENDING:
            await msg.ack()  # answered already: a copy published again after the duplicate window
            metrics.DURABLE.labels("gateway", INGRESS, "duplicate").inc()
            return None
        tenant = record.tenant if record is not None else ""
        accepted_ms = record.accepted_unix_ms if record is not None and record.accepted_unix_ms else accepted_ms
        try:
            parts = self._parts(req, pipeline, request_id, accepted_ms, tenant, headers.get(ROUTE_KEY_HEADER, ""))
        except LoomError as exc:
            # The publisher's mistake: the request is answered (FAILED) with the reason.
            failed = gateway_pb2.Result(
                request_id=request_id, state=gateway_pb2.Result.FAILED, pipeline=pipeline, tenant=tenant
            )
            failed.accepted_unix_ms = accepted_ms
            failed.error.CopyFrom(to_proto(exc, "gateway"))
            await self.results.answer(failed)
            await msg.ack()
            metrics.DURABLE.labels("gateway", INGRESS, "rejected").inc()
            return None
        for part in parts:
            if self.claims is not None:
                await self.claims.offload(part)
            msg_id = durable.part_msg_id(request_id, part.part_id, len(part.slip))
            await durable.publish_once(
                js, durable.work_subject(part.slip[0]), part.SerializeToString(), msg_id, inject({})
            )
        if record is None:  # published on NATS: Submit wrote its record before it published
            await self.results.create_pending(request_id, pipeline, tenant, accepted_ms)
        await msg.ack()
        metrics.DURABLE.labels("gateway", INGRESS, "forwarded").inc()
        return None

    def _parts(
        self, req: gateway_pb2.PredictRequest, pipeline: str, request_id: str, accepted_ms: int, tenant: str, key: str
    ) -> list[pb.Part]:
        if req.pipeline and req.pipeline != pipeline:
            raise InvalidArgument(f"the request names pipeline {req.pipeline!r} but was published for {pipeline!r}")
        call = convert.call_from_proto(req, None)
        call.pipeline, call.route_key = pipeline, key
        spec, _ = self.core.validate(dataclasses.replace(call, timeout_ms=0, request_id=""))
        deadline_ms = accepted_ms + self._timeout_ms(call)
        return self.core.make_parts(spec, call, request_id, deadline_ms, durable=True, tenant=tenant)
