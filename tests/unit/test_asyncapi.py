"""deploy/asyncapi.yaml: a consistent AsyncAPI 3 document that has a channel for every subject Loom builds,
the headers the code really sends, and protobuf payloads equal to protos/loom/v1; the gateway serves it."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from services.common import audit, durable, subjects
from services.common.lifecycle import Runtime
from services.gateway import durable as gateway_durable
from services.gateway.http_api import ASYNCAPI
from services.gateway.service import Gateway
from services.gateway.settings import GatewaySettings
from services.monitor.alerts import SEVERITIES

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "deploy" / "asyncapi.yaml"
PROTOS = ROOT / "protos" / "loom" / "v1"
PROTOBUF = "application/vnd.google.protobuf;version=3"

# One sample call per subject builder, and whether systems outside Loom may use the subject.
PUBLIC: dict[Callable[..., str], tuple[Any, ...]] = {
    durable.request_subject: ("embed",),
    durable.result_subject: ("content",),
    durable.dlq_subject: (durable.consumer_name(durable.work_subject(subjects.infer("minilm"))),),
    subjects.feedback: ("embed",),
    subjects.alert: ("P2",),
}
INTERNAL: dict[Callable[..., str], tuple[Any, ...]] = {
    subjects.pre: ("image",),
    subjects.infer: ("ocr",),
    subjects.post: ("topics",),
    subjects.fuse: (3,),
    subjects.telemetry: ("inference",),
    subjects.model_query: ("metadata",),
    durable.work_subject: (subjects.post("embed"),),
    subjects.audit: ("model.register",),
}
NOT_BUILDERS = {subjects.fuse_partition, subjects.last_token}


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(DOC.read_text())
    return loaded


def ref(doc: dict[str, Any], pointer: str) -> Any:
    assert pointer.startswith("#/"), pointer
    node: Any = doc
    for key in pointer[2:].split("/"):
        assert key in node, f"{pointer}: no {key!r}"
        node = node[key]
    return node


def tag(item: dict[str, Any]) -> str:
    (only,) = {t["name"] for t in item["tags"]} & {"public", "internal"}
    return str(only)


def matches(doc: dict[str, Any], subject: str) -> list[str]:
    """The channels whose address (parameters as one token each, within their enum) covers ``subject``."""
    found = []
    for name, channel in doc["channels"].items():
        params = channel.get("parameters", {})
        pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^.]+)", re.escape(channel["address"]))
        hit = re.fullmatch(pattern, subject)
        if hit is None:
            continue
        enums = {k: ref(doc, p["$ref"]) if "$ref" in p else p for k, p in params.items()}
        if all(v in enums[k].get("enum", [v]) for k, v in hit.groupdict().items()):
            found.append(name)
    return found


# --- the document -------------------------------------------------------------------------------


def test_it_is_asyncapi_3_with_servers_and_tags(doc: dict[str, Any]) -> None:
    assert str(doc["asyncapi"]).startswith("3.")
    assert doc["info"]["title"] and doc["info"]["version"]
    assert {t["name"] for t in doc["info"]["tags"]} == {"public", "internal"}
    assert {s["protocol"] for s in doc["servers"].values()} == {"nats"}


def test_channels_declare_exactly_their_parameters_and_real_messages(doc: dict[str, Any]) -> None:
    for name, channel in doc["channels"].items():
        placeholders = set(re.findall(r"\{(\w+)\}", channel["address"]))
        assert placeholders == set(channel.get("parameters", {})), name
        for param in channel.get("parameters", {}).values():
            if "$ref" in param:
                ref(doc, param["$ref"])
        assert channel["messages"], name
        for message in channel["messages"].values():
            assert message["$ref"].startswith("#/components/messages/"), name
            ref(doc, message["$ref"])
        tag(channel)
    used = {m["$ref"].rsplit("/", 1)[1] for c in doc["channels"].values() for m in c["messages"].values()}
    assert used == set(doc["components"]["messages"]), "a message no channel carries"


def test_operations_point_at_channels_and_their_messages(doc: dict[str, Any]) -> None:
    served = set()
    for name, op in doc["operations"].items():
        assert op["action"] in ("send", "receive"), name
        channel_ref = op["channel"]["$ref"]
        channel = ref(doc, channel_ref)
        served.add(channel_ref.rsplit("/", 1)[1])
        assert tag(op) == tag(channel), name
        for message in op["messages"]:
            # AsyncAPI 3: an operation's messages are a subset of its channel's.
            assert message["$ref"].startswith(channel_ref + "/messages/"), (name, message)
            ref(doc, message["$ref"])
    assert served == set(doc["channels"]), "a channel without an operation"


def test_every_subject_builder_has_a_channel_of_its_audience(doc: dict[str, Any]) -> None:
    builders = {f for _, f in inspect.getmembers(subjects, inspect.isfunction) if f.__module__ == subjects.__name__}
    builders |= {f for n, f in inspect.getmembers(durable, inspect.isfunction) if n.endswith("_subject")}
    assert builders - NOT_BUILDERS == set(PUBLIC) | set(INTERNAL), "a new subject builder: give it a channel"
    for audience, table in (("public", PUBLIC), ("internal", INTERNAL)):
        for build, args in table.items():
            subject = build(*args)
            found = matches(doc, subject)
            assert len(found) == 1, f"{build.__name__}{args} -> {subject}: channels {found}"
            assert tag(doc["channels"][found[0]]) == audience, subject
    for severity in SEVERITIES:
        assert matches(doc, subjects.alert(severity)) == ["alerts"], severity
    assert not matches(doc, subjects.alert("P3"))


def test_every_kind_of_audit_entry_has_the_audit_channel(doc: dict[str, Any]) -> None:
    # AuditLog.append refuses an action whose first word is not one of audit.KINDS, so these are
    # all the audit subjects there are; a new kind needs its place in the channel's enum.
    for kind in audit.KINDS:
        assert matches(doc, subjects.audit(f"{kind}.something")) == ["auditLog"], kind
    assert not matches(doc, subjects.audit("payroll.export"))
    assert doc["channels"]["auditLog"]["address"].replace("{kind}", ">") == audit.SUBJECTS
    schema = doc["components"]["messages"]["AuditEntry"]["payload"]
    fields = {"time", "service", "action", "actor", "target", "result", "details", "source"}
    assert set(schema["required"]) == set(schema["properties"]) == fields


def test_headers_are_the_ones_the_code_sends(doc: dict[str, Any]) -> None:
    messages = doc["components"]["messages"]
    request = set(messages["PredictRequest"]["headers"]["properties"])
    assert {durable.MSG_ID, gateway_durable.ROUTE_KEY_HEADER, durable.DLQ_MSG_ID} == request
    traced = set(doc["components"]["messageTraits"]["traced"]["headers"]["properties"])
    assert {"traceparent", "tracestate"} == traced
    assert {"$ref": "#/components/messageTraits/traced"} in messages["PredictRequest"]["traits"]
    dlq = set(messages["DeadLetter"]["headers"]["properties"])
    names = [durable.DLQ_REASON, durable.DLQ_SUBJECT, durable.DLQ_STREAM_HDR, durable.DLQ_SEQ]
    names += [durable.DLQ_DELIVERIES, durable.DLQ_MSG_ID, durable.MSG_ID]
    assert dlq == set(names)
    stages = ref(doc, "#/channels/deadLetters/parameters/stage")["examples"]
    assert gateway_durable.INGRESS in stages


# --- protobuf payloads --------------------------------------------------------------------------


def proto_blocks(text: str) -> dict[str, str]:
    """Top-level ``message``/``enum`` blocks by name, comments dropped and whitespace collapsed."""
    text = re.sub(r"//[^\n]*", "", text)
    blocks = {}
    for m in re.finditer(r"^(?:message|enum)\s+(\w+)\s*\{", text, re.M):
        depth, i = 0, m.end() - 1
        while True:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                break
            i += 1
        blocks[m.group(1)] = " ".join(text[m.start() : i + 1].split())
    return blocks


def used_types(block: str) -> set[str]:
    """Message and enum types a block's fields use, less the ones it nests."""
    fields = set()
    for statement in re.split(r"[;{}]", block):
        field = re.fullmatch(r"\s*(?:repeated |optional )?(?:map<\w+, ?)?(\w+)>? \w+ = \d+\s*", statement)
        if field is not None and field.group(1)[0].isupper():
            fields.add(field.group(1))
    nested = set(re.findall(r"(?:message|enum) (\w+) \{", block)[1:])
    return fields - nested


SOURCE = {
    name: block for path in sorted(PROTOS.glob("*.proto")) for name, block in proto_blocks(path.read_text()).items()
}


def test_protobuf_payloads_are_the_real_messages_with_everything_they_use(doc: dict[str, Any]) -> None:
    seen = 0
    for name, message in doc["components"]["messages"].items():
        payload = message["payload"]
        if not isinstance(payload, dict) or payload.get("schemaFormat") != PROTOBUF:
            assert message.get("contentType") != "application/x-protobuf", name
            continue
        seen += 1
        root = message["x-protobuf-message"].removeprefix("loom.v1.")
        assert message["name"] == f"loom.v1.{root}", name
        schema = payload["schema"]
        assert 'syntax = "proto3";' in schema and "package loom.v1;" in schema, name
        blocks = proto_blocks(schema)
        for block_name, block in blocks.items():
            assert block == SOURCE[block_name], f"{name}: {block_name} differs from protos/loom/v1"
        used = set().union(*(used_types(b) for b in blocks.values()))
        assert used <= set(blocks), f"{name}: {used - set(blocks)} used but not defined"
        # The one message nothing else uses is the payload (how AsyncAPI's protobuf parser picks it).
        assert set(blocks) - used == {root}, name
    assert seen == 6


def test_used_types_reads_fields_maps_and_nested_enums() -> None:
    result = proto_blocks((PROTOS / "gateway.proto").read_text())["Result"]
    assert used_types(result) == {"PredictResponse", "Error"}
    assert used_types(SOURCE["PredictResponse"]) == {"PartOutput", "Error", "Label"}


# --- served by the gateway ----------------------------------------------------------------------


async def test_the_gateway_serves_the_document() -> None:
    assert ASYNCAPI == DOC
    settings = GatewaySettings()
    gateway = Gateway(settings)
    rt = Runtime.create("gateway", settings)
    # Not ready yet: the documents are served all the same (they need no pipeline specs).
    gateway.bind(rt)
    app = web.Application()
    gateway.add_http(app)
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/asyncapi.yaml")
        assert resp.status == 200 and resp.content_type == "application/yaml"
        assert await resp.text() == DOC.read_text()
        assert (await client.get("/openapi.yaml")).status == 200
        assert (await client.get("/v1/pipelines")).status == 503  # the data plane still waits
