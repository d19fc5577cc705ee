"""The admin API's edges: protobuf <-> registry documents, and the rollout plan's defaults."""

from __future__ import annotations

import json
from typing import Any, cast

import pytest
from google.protobuf import json_format

from services.common.errors import InvalidArgument
from services.common.pb.loom.v1 import admin_pb2 as pb
from services.common.registry.schema import ModelRecord, RolloutStep, TrafficPolicy
from services.gateway.admin import AdminCore, actor_of, parse
from services.gateway.admin_grpc import entry_to_proto, policy_from_proto, record_to_proto, steps_from_proto
from services.gateway.settings import GatewaySettings
from tests.unit.test_loomctl_admin import RECORD

pytestmark = pytest.mark.unit


def test_a_record_survives_the_trip_through_protobuf() -> None:
    rec = ModelRecord.model_validate(RECORD)
    msg = pb.ModelRecord.FromString(record_to_proto(rec).SerializeToString())
    assert msg.versions["1"].artifacts["model.py"] == RECORD["versions"]["1"]["artifacts"]["model.py"]
    assert msg.rollout.analysis[0].checks[1].threshold == 1.5 and not msg.rollout.analysis[0].checks[1].ok
    doc = json_format.MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    assert ModelRecord.model_validate(doc) == rec


def test_a_policy_from_protobuf_keeps_zeros_and_reads_int64_text() -> None:
    msg = pb.TrafficPolicy(stable="1", canary=pb.Canary(version="2", weight=0))
    msg.rules.add(name="short", version="1", max_tokens=16)
    policy = parse(TrafficPolicy, policy_from_proto(msg), "traffic policy")
    assert policy.canary is not None and policy.canary.weight == 0
    assert policy.rules[0].max_tokens == 16 and policy.rules[0].min_inflight is None and policy.shadow is None
    with pytest.raises(InvalidArgument, match=r"traffic policy: canary.weight: .*less than or equal to 100"):
        parse(TrafficPolicy, {"stable": "1", "canary": {"version": "2", "weight": 150}}, "traffic policy")
    with pytest.raises(InvalidArgument, match="traffic policy is missing"):
        parse(TrafficPolicy, None, "traffic policy")


def test_rollout_steps_take_the_gateway_defaults_for_what_they_leave_out() -> None:
    settings = GatewaySettings(rollout_steps=[5, 100], rollout_min_requests=40, rollout_window_s=12)
    core = AdminCore(cast(Any, None), cast(Any, None), cast(Any, None), settings)
    assert core._steps(None) == [RolloutStep(weight=w, min_requests=40, window_s=12) for w in (5, 100)]
    grpc_steps = steps_from_proto([pb.RolloutStep(weight=10), pb.RolloutStep(weight=50, min_requests=3)])
    assert core._steps(grpc_steps) == [
        RolloutStep(weight=10, min_requests=40, window_s=12),
        RolloutStep(weight=50, min_requests=3, window_s=12),
    ]
    with pytest.raises(InvalidArgument, match=r"steps\[0\]: weight: .*less than or equal to 100"):
        core._steps([{"weight": 150}])
    with pytest.raises(InvalidArgument, match=r"steps\[1\] must be an object"):
        core._steps([{"weight": 10}, 50])


def test_audit_entries_and_actors() -> None:
    entry = {"seq": 9, "time": "t", "actor": "a", "action": "traffic.set", "target": "minilm", "result": "refused",
             "details": {"error": "no"}, "service": "gateway"}  # fmt: skip
    msg = entry_to_proto(entry)
    assert (msg.seq, msg.action, msg.result, msg.source) == (9, "traffic.set", "refused", "")
    assert json.loads(msg.details_json) == {"error": "no"}
    assert actor_of("  ") == "anonymous" and actor_of(" ops@h ") == "ops@h" and len(actor_of("x" * 500)) == 128
