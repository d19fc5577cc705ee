"""gRPC adapter for ``loom.v1.Admin``: decode, call :class:`AdminCore`, encode.

Methods take raw bytes (:func:`services.gateway.edges.grpc_unary`), so a
malformed message is INVALID_ARGUMENT and every :class:`LoomError` its own
status with its message; anything else is INTERNAL. The actor of every audit
entry is the authenticated caller (``services.gateway.access``).

The registry's documents and the protobuf messages share their field names,
so the conversions below are ``json_format`` both ways. In proto3 an unset
number reads as zero: a rollout step's ``min_requests``/``window_s`` and the
thresholds left at zero take the gateway's defaults; a traffic policy is taken
as sent (a shadow's ``percent`` of 0 mirrors nothing).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from services.common.pb.loom.v1 import admin_pb2 as pb
from services.common.registry.schema import ModelRecord, Rollout
from services.gateway.admin import AdminCore, caller
from services.gateway.edges import GrpcCall, grpc_unary

SERVICE = "loom.v1.Admin"


# --- conversions --------------------------------------------------------------------------------


def record_to_proto(rec: ModelRecord) -> pb.ModelRecord:
    return json_format.ParseDict(rec.model_dump(mode="json", exclude_none=True), pb.ModelRecord())


def rollout_to_proto(rollout: Rollout) -> pb.Rollout:
    return json_format.ParseDict(rollout.model_dump(mode="json", exclude_none=True), pb.Rollout())


def entry_to_proto(entry: Mapping[str, object]) -> pb.AuditEntry:
    text = {k: str(entry.get(k) or "") for k in ("time", "actor", "action", "target", "result", "source", "service")}
    seq = entry.get("seq")
    return pb.AuditEntry(
        seq=seq if isinstance(seq, int) else 0,
        details_json=json.dumps(entry.get("details") or {}, default=str, sort_keys=True),
        **text,
    )


def _dict(msg: Message, *, zeros: bool) -> dict[str, Any]:
    return json_format.MessageToDict(msg, always_print_fields_with_no_presence=zeros, preserving_proto_field_name=True)


def policy_from_proto(policy: pb.TrafficPolicy) -> dict[str, Any]:
    return _dict(policy, zeros=True)


def steps_from_proto(steps: Any) -> list[dict[str, Any]]:
    # The weight always counts (0 is refused with a message); the other fields at 0 mean "default".
    return [{**_dict(step, zeros=False), "weight": step.weight} for step in steps]


# --- the servicer -------------------------------------------------------------------------------


class AdminGrpc:
    def __init__(self, admin: AdminCore) -> None:
        self.admin = admin

    async def list_models(self, _: pb.ListModelsRequest, __: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[record_to_proto(r) for r in await self.admin.list_models()])

    async def get_model(self, req: pb.GetModelRequest, _: grpc.aio.ServicerContext) -> pb.ModelRecord:
        return record_to_proto(await self.admin.get_model(req.model))

    async def register_version(self, req: pb.RegisterVersionRequest, ctx: grpc.aio.ServicerContext) -> pb.ModelRecord:
        rec = await self.admin.register(req.model, req.source, version=req.version, notes=req.notes, actor=caller())
        return record_to_proto(rec)

    async def retire_version(self, req: pb.RetireVersionRequest, ctx: grpc.aio.ServicerContext) -> pb.ModelRecord:
        return record_to_proto(await self.admin.retire(req.model, req.version, actor=caller()))

    async def set_traffic(self, req: pb.SetTrafficRequest, ctx: grpc.aio.ServicerContext) -> pb.ModelRecord:
        policy = policy_from_proto(req.policy) if req.HasField("policy") else None
        return record_to_proto(await self.admin.set_traffic(req.model, policy, actor=caller()))

    async def start_rollout(self, req: pb.StartRolloutRequest, ctx: grpc.aio.ServicerContext) -> pb.Rollout:
        thresholds = _dict(req.thresholds, zeros=False) if req.HasField("thresholds") else None
        rollout = await self.admin.start_rollout(
            req.model,
            req.version,
            steps=steps_from_proto(req.steps),
            thresholds=thresholds,
            actor=caller(),
        )
        return rollout_to_proto(rollout)

    async def pause_rollout(self, req: pb.RolloutActionRequest, ctx: grpc.aio.ServicerContext) -> pb.Rollout:
        return rollout_to_proto(await self.admin.pause_rollout(req.model, req.reason, actor=caller()))

    async def resume_rollout(self, req: pb.RolloutActionRequest, ctx: grpc.aio.ServicerContext) -> pb.Rollout:
        return rollout_to_proto(await self.admin.resume_rollout(req.model, actor=caller()))

    async def abort_rollout(self, req: pb.RolloutActionRequest, ctx: grpc.aio.ServicerContext) -> pb.Rollout:
        return rollout_to_proto(await self.admin.abort_rollout(req.model, req.reason, actor=caller()))

    async def get_rollout(self, req: pb.GetRolloutRequest, _: grpc.aio.ServicerContext) -> pb.RolloutStatus:
        status = await self.admin.rollout_status(req.model)
        out = pb.RolloutStatus(history=[rollout_to_proto(r) for r in status.history])
        if status.current is not None:
            out.current.CopyFrom(rollout_to_proto(status.current))
        return out

    async def promote(self, req: pb.PromoteRequest, ctx: grpc.aio.ServicerContext) -> pb.ModelRecord:
        return record_to_proto(await self.admin.promote(req.model, req.version, actor=caller()))

    async def rollback(self, req: pb.RollbackRequest, ctx: grpc.aio.ServicerContext) -> pb.ModelRecord:
        return record_to_proto(await self.admin.rollback(req.model, req.reason, actor=caller()))

    async def list_audit(self, req: pb.ListAuditRequest, _: grpc.aio.ServicerContext) -> pb.ListAuditResponse:
        entries = await self.admin.audit_entries(limit=req.limit or 100, model=req.model)
        return pb.ListAuditResponse(entries=[entry_to_proto(e) for e in entries])

    def handler(self) -> grpc.GenericRpcHandler:
        methods: dict[str, tuple[Any, GrpcCall]] = {
            "ListModels": (pb.ListModelsRequest, self.list_models),
            "GetModel": (pb.GetModelRequest, self.get_model),
            "RegisterVersion": (pb.RegisterVersionRequest, self.register_version),
            "RetireVersion": (pb.RetireVersionRequest, self.retire_version),
            "SetTraffic": (pb.SetTrafficRequest, self.set_traffic),
            "StartRollout": (pb.StartRolloutRequest, self.start_rollout),
            "PauseRollout": (pb.RolloutActionRequest, self.pause_rollout),
            "ResumeRollout": (pb.RolloutActionRequest, self.resume_rollout),
            "AbortRollout": (pb.RolloutActionRequest, self.abort_rollout),
            "GetRollout": (pb.GetRolloutRequest, self.get_rollout),
            "Promote": (pb.PromoteRequest, self.promote),
            "Rollback": (pb.RollbackRequest, self.rollback),
            "ListAudit": (pb.ListAuditRequest, self.list_audit),
        }
        handlers = {name: grpc_unary(SERVICE, name, req, call) for name, (req, call) in methods.items()}
        return grpc.method_handlers_generic_handler(SERVICE, handlers)
