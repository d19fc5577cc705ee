"""OTLP conversion, the trace store, and both OTLP receivers (in-process, loopback only)."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
from typing import Any

import grpc
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from google.protobuf import json_format
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as PbResource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind, StatusCode

from services.monitor.otlp import spans_from_json, spans_from_proto
from services.monitor.otlp_receiver import make_http_handler
from services.monitor.traces import TraceStore
from tests.loopback import otlp_receiver

pytestmark = pytest.mark.unit

TRACE = "0af7651916cd43dd8448eb211c80319c"
MS = 1_000_000
T0 = 1_700_000_000_000 * MS  # a plausible unix time in ns


def sid(n: int) -> str:
    return f"{n:016x}"


def kv(key: str, value: Any) -> KeyValue:
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    if isinstance(value, float):
        return KeyValue(key=key, value=AnyValue(double_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=value))


def pb_span(name: str, span: int, parent: int | None, kind: int, start_ms: float, end_ms: float, **attrs: Any) -> Span:
    return Span(
        trace_id=bytes.fromhex(TRACE),
        span_id=bytes.fromhex(sid(span)),
        parent_span_id=bytes.fromhex(sid(parent)) if parent else b"",
        name=name,
        kind=kind,  # type: ignore[arg-type]
        start_time_unix_nano=T0 + int(start_ms * MS),
        end_time_unix_nano=T0 + int(end_ms * MS),
        attributes=[kv(k, v) for k, v in attrs.items()],
    )


def pb_request(service: str | None, replica: str, spans: list[Span]) -> ExportTraceServiceRequest:
    resource = [kv("service.name", service)] if service else []
    resource.append(kv("service.instance.id", replica))
    return ExportTraceServiceRequest(
        resource_spans=[ResourceSpans(resource=PbResource(attributes=resource), scope_spans=[ScopeSpans(spans=spans)])]
    )


def mesh_request() -> ExportTraceServiceRequest:
    """gateway -> NATS -> preprocess -> NATS -> inference, as three services would export it."""
    gw = pb_request(
        "gateway",
        "gateway-1",
        [
            pb_span("POST /v1/predict", 1, None, Span.SPAN_KIND_SERVER, 0, 40, **{
                "loom.request_id": "req-1", "loom.pipeline": "text",
            }),
            pb_span("publish loom.pre.text", 2, 1, Span.SPAN_KIND_PRODUCER, 1, 2),
        ],
    )  # fmt: skip
    pre = pb_request(
        "preprocess",
        "preprocess-1",
        [
            pb_span("consume loom.pre.text", 3, 2, Span.SPAN_KIND_CONSUMER, 5, 10),
            pb_span("publish loom.infer.minilm", 4, 3, Span.SPAN_KIND_PRODUCER, 9, 9.5),
        ],
    )
    inf = pb_request(
        "inference",
        "inference-1",
        [
            # Starts before the producer ends (clock skew between hosts): queue wait clamps to 0.
            pb_span("consume loom.infer.minilm", 5, 4, Span.SPAN_KIND_CONSUMER, 9.25, 30),
            pb_span("triton infer", 6, 5, Span.SPAN_KIND_CLIENT, 12, 28),
        ],
    )
    req = ExportTraceServiceRequest()
    for part in (gw, pre, inf):
        req.resource_spans.extend(part.resource_spans)
    return req


def triton_doc() -> dict[str, Any]:
    """Shaped like what Triton's OpenTelemetry exporter posts: hex ids, string times, numeric kinds."""

    def span(name: str, span_id: int, parent: int, start_ms: float, end_ms: float, **extra: Any) -> dict[str, Any]:
        return {
            "traceId": TRACE,
            "spanId": sid(span_id),
            "parentSpanId": sid(parent),
            "name": name,
            "kind": 2 if name == "InferRequest" else 1,
            "startTimeUnixNano": str(T0 + int(start_ms * MS)),
            "endTimeUnixNano": str(T0 + int(end_ms * MS)),
            "status": {},
            **extra,
        }

    return {
        "resourceSpans": [
            {
                "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "triton"}}]},
                "scopeSpans": [
                    {
                        "scope": {"name": "triton-server"},
                        "spans": [
                            span("compute", 9, 8, 16, 25),
                            span(
                                "InferRequest",
                                7,
                                6,
                                13,
                                27,
                                attributes=[
                                    {"key": "triton.model_name", "value": {"stringValue": "minilm"}},
                                    {"key": "triton.model_version", "value": {"intValue": "1"}},
                                ],
                            ),
                            span("minilm", 8, 7, 14, 26, status={"code": 2, "message": "boom"}),
                        ],
                    }
                ],
            }
        ]
    }


# --- conversion -------------------------------------------------------------------------------------------------


def test_proto_spans_become_internal_dicts() -> None:
    span = pb_span("infer", 0xABC, 0x1, Span.SPAN_KIND_CLIENT, 1, 3, model="minilm", batch=4, score=0.5, hit=True)
    span.attributes.append(KeyValue(key="dims", value=AnyValue(array_value=ArrayValue(values=[AnyValue(int_value=3)]))))
    nested = KeyValueList(values=[kv("a", "b")])
    span.attributes.append(KeyValue(key="nested", value=AnyValue(kvlist_value=nested)))
    span.status.CopyFrom(Status(code=Status.STATUS_CODE_ERROR, message="bad"))
    root = pb_span("root", 0x1, None, Span.SPAN_KIND_UNSPECIFIED, 0, 5)
    (out, out_root) = spans_from_proto(pb_request("inference", "inference-7", [span, root]))
    assert out == {
        "name": "infer",
        "trace_id": TRACE,
        "span_id": "0000000000000abc",
        "parent_id": "0000000000000001",
        "kind": "CLIENT",
        "service": "inference",
        "replica": "inference-7",
        "start_ns": T0 + MS,
        "end_ns": T0 + 3 * MS,
        "status": "ERROR",
        "attributes": {"model": "minilm", "batch": 4, "score": 0.5, "hit": True, "dims": [3], "nested": {"a": "b"}},
    }
    assert (out_root["parent_id"], out_root["kind"], out_root["status"]) == (None, "INTERNAL", "UNSET")
    # No service.name in the resource.
    (anon,) = spans_from_proto(pb_request(None, "x", [root]))
    assert anon["service"] == "unknown_service"


def test_proto_with_a_short_trace_id_is_rejected() -> None:
    req = pb_request("gateway", "g", [pb_span("a", 1, None, Span.SPAN_KIND_SERVER, 0, 1)])
    req.resource_spans[0].scope_spans[0].spans[0].trace_id = b"\x01\x02\x03"
    with pytest.raises(ValueError, match="trace_id must be 16 bytes"):
        spans_from_proto(req)


def test_triton_json_converts() -> None:
    spans = {s["name"]: s for s in spans_from_json(triton_doc())}
    assert set(spans) == {"InferRequest", "minilm", "compute"}
    infer = spans["InferRequest"]
    assert infer["trace_id"] == TRACE and infer["span_id"] == sid(7) and infer["parent_id"] == sid(6)
    assert (infer["service"], infer["replica"], infer["kind"]) == ("triton", None, "SERVER")
    assert infer["start_ns"] == T0 + 13 * MS and infer["end_ns"] == T0 + 27 * MS
    assert infer["attributes"] == {"triton.model_name": "minilm", "triton.model_version": 1}
    assert (spans["compute"]["kind"], spans["compute"]["status"]) == ("INTERNAL", "UNSET")
    assert spans["minilm"]["status"] == "ERROR"


def test_generic_protobuf_json_matches_the_proto_path() -> None:
    """MessageToDict writes ids as base64, enums as names and int64 as strings; all of it must parse."""
    req = mesh_request()
    span = req.resource_spans[0].scope_spans[0].spans[0]
    span.attributes.append(KeyValue(key="blob", value=AnyValue(bytes_value=b"\x00\xff")))
    span.attributes.append(KeyValue(key="ratio", value=AnyValue(double_value=float("inf"))))
    span.status.code = Status.STATUS_CODE_OK
    doc = json_format.MessageToDict(req)
    assert doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["kind"] == "SPAN_KIND_SERVER"  # really names
    assert spans_from_json(json.loads(json.dumps(doc))) == spans_from_proto(req)
    # The proto field names (snake_case) are valid protobuf JSON too.
    snake = json_format.MessageToDict(req, preserving_proto_field_name=True)
    assert spans_from_json(snake) == spans_from_proto(req)


def test_json_variants_are_accepted() -> None:
    doc = triton_doc()
    rs = doc["resourceSpans"][0]
    rs["instrumentationLibrarySpans"] = rs.pop("scopeSpans")  # pre-1.0 exporters
    first = rs["instrumentationLibrarySpans"][0]["spans"][0]
    first["traceId"] = base64.b64encode(bytes.fromhex(TRACE)).decode()
    first["parentSpanId"] = ""
    first["kind"] = "SPAN_KIND_CONSUMER"
    first["startTimeUnixNano"] = T0  # a number rather than a string
    first["status"] = {"code": "STATUS_CODE_OK"}
    first["attributes"] = [
        {"key": "tags", "value": {"arrayValue": {"values": [{"stringValue": "a"}, {"intValue": 2}]}}},
        {"key": "nothing", "value": {}},
    ]
    compute = spans_from_json(doc)[0]
    assert compute["trace_id"] == TRACE and compute["parent_id"] is None
    assert (compute["kind"], compute["status"], compute["start_ns"]) == ("CONSUMER", "OK", T0)
    assert compute["attributes"] == {"tags": ["a", 2], "nothing": None}
    assert spans_from_json({}) == []  # an empty export is valid


def _span_doc(**fields: Any) -> dict[str, Any]:
    span = {"traceId": TRACE, "spanId": sid(1), "name": "x", "startTimeUnixNano": "1", "endTimeUnixNano": "2"}
    span.update(fields)
    return {"resourceSpans": [{"scopeSpans": [{"spans": [span]}]}]}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([], "body must be an object"),
        ({"resourceSpans": {}}, "resourceSpans must be an array"),
        ({"resourceSpans": [1]}, r"resourceSpans\[0\] must be an object"),
        (_span_doc(traceId="abc"), "traceId is neither 32 hex characters nor base64"),
        (_span_doc(traceId="zz" * 16), "traceId is neither"),
        (_span_doc(traceId="0" * 32), "traceId is all zeros"),
        (_span_doc(spanId=base64.b64encode(b"\x01" * 4).decode()), "spanId must be 8 bytes"),
        (_span_doc(spanId=None), "spanId must be a non-empty string"),
        (_span_doc(name=3), "name must be a string"),
        (_span_doc(startTimeUnixNano="soon"), "startTimeUnixNano is not a decimal integer"),
        (_span_doc(endTimeUnixNano=1.5), "endTimeUnixNano must be an integer"),
        (_span_doc(kind="SPAN_KIND_SIDEWAYS"), "unknown enum value"),
        (_span_doc(attributes=[{"key": "k", "value": {"intValue": "x"}}]), "intValue is not an integer"),
        (_span_doc(attributes=[{"key": "k", "value": {"mystery": 1}}]), "no known value field"),
        (_span_doc(attributes=[{"value": {"stringValue": "v"}}]), r"attributes\[0\].key must be a string"),
    ],
)
def test_malformed_json_is_rejected_with_a_location(doc: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        spans_from_json(doc)


# --- the store --------------------------------------------------------------------------------------------------


def full_store() -> TraceStore:
    store = TraceStore()
    assert store.add(spans_from_proto(mesh_request()), now_ms=1) == 6
    assert store.add(spans_from_json(triton_doc()), now_ms=2) == 3
    return store


def test_trace_is_a_tree_with_depths_and_queue_waits() -> None:
    store = full_store()
    trace = store.get("req-1")
    assert trace is not None and trace == store.get(TRACE) and store.get(TRACE.upper()) == trace
    rows = [(s["name"], s["depth"], s["service"]) for s in trace["spans"]]
    assert rows == [
        ("POST /v1/predict", 0, "gateway"),
        ("publish loom.pre.text", 1, "gateway"),
        ("consume loom.pre.text", 2, "preprocess"),
        ("publish loom.infer.minilm", 3, "preprocess"),
        ("consume loom.infer.minilm", 4, "inference"),
        ("triton infer", 5, "inference"),
        ("InferRequest", 6, "triton"),
        ("minilm", 7, "triton"),
        ("compute", 8, "triton"),
    ]
    by_name = {s["name"]: s for s in trace["spans"]}
    assert by_name["consume loom.pre.text"]["queue_wait_ms"] == 3.0  # producer ended at 2 ms, consumer began at 5
    assert by_name["consume loom.infer.minilm"]["queue_wait_ms"] == 0.0  # skewed clocks clamp to zero
    assert all(s["queue_wait_ms"] is None for s in trace["spans"] if s["kind"] != "CONSUMER")
    assert by_name["InferRequest"]["start_ms"] == 13.0 and by_name["InferRequest"]["duration_ms"] == 14.0
    assert by_name["InferRequest"]["parent_id"] == sid(6) and by_name["triton infer"]["replica"] == "inference-1"
    assert by_name["InferRequest"]["attributes"]["triton.model_name"] == "minilm"
    assert trace["trace_id"] == TRACE and (trace["request_id"], trace["pipeline"]) == ("req-1", "text")
    assert trace["start_unix_ms"] == T0 // MS and trace["duration_ms"] == 40.0
    assert trace["services"] == ["gateway", "preprocess", "inference", "triton"]
    assert trace["status"] == "ERROR"  # the minilm span failed
    assert store.get("nope") is None


def test_orphans_are_roots_ordered_by_start() -> None:
    store = TraceStore()
    # Only Triton's spans have arrived: InferRequest's parent (the inference CLIENT span) is unknown.
    store.add(spans_from_json(triton_doc()), now_ms=1)
    extra = pb_request("postprocess", "p", [pb_span("late orphan", 20, 99, Span.SPAN_KIND_CONSUMER, 1, 2)])
    store.add(spans_from_proto(extra), now_ms=2)
    trace = store.get(TRACE)
    assert trace is not None
    rows = [(s["name"], s["depth"]) for s in trace["spans"]]
    assert rows == [("late orphan", 0), ("InferRequest", 0), ("minilm", 1), ("compute", 2)]
    assert trace["request_id"] is None and trace["pipeline"] is None
    assert trace["spans"][0]["queue_wait_ms"] is None  # its producer is not known
    (summary,) = store.recent()
    assert summary == {
        "trace_id": TRACE,
        "request_id": None,
        "pipeline": None,
        "root": "late orphan",
        "services": ["postprocess", "triton"],
        "span_count": 4,
        "duration_ms": 26.0,
        "start_unix_ms": T0 // MS + 1,
        "status": "ERROR",
    }


def _one_span_trace(n: int, request_id: str | None = None, spans: int = 1) -> list[dict[str, Any]]:
    trace_id = f"{n:032x}"
    out = []
    for i in range(spans):
        attrs = {"loom.request_id": request_id} if request_id and i == 0 else {}
        out.append(
            {
                "name": f"s{i}",
                "trace_id": trace_id,
                "span_id": sid(i + 1),
                "parent_id": None if i == 0 else sid(1),
                "kind": "SERVER",
                "service": "gateway",
                "replica": None,
                "start_ns": T0 + i,
                "end_ns": T0 + i + MS,
                "status": "OK",
                "attributes": attrs,
            }
        )
    return out


def test_recent_is_most_recently_updated_first() -> None:
    store = TraceStore()
    for n in (1, 2, 3):
        store.add(_one_span_trace(n, f"r{n}"), now_ms=n)
    store.add(_one_span_trace(1, spans=2)[1:], now_ms=4)  # a late span moves trace 1 to the front
    assert [t["request_id"] for t in store.recent()] == ["r1", "r3", "r2"]
    assert [t["request_id"] for t in store.recent(limit=2)] == ["r1", "r3"]
    assert store.recent()[0]["span_count"] == 2 and store.recent()[0]["status"] == "OK"


def test_lru_eviction_by_trace_count_and_request_index() -> None:
    store = TraceStore(max_traces=2)
    store.add(_one_span_trace(1, "r1"), now_ms=1)
    store.add(_one_span_trace(2, "r2"), now_ms=2)
    store.add(_one_span_trace(1, spans=2)[1:], now_ms=3)  # trace 1 updated: trace 2 is now the oldest
    store.add(_one_span_trace(3, "r3"), now_ms=4)
    assert store.evicted_traces == 1 and len(store) == 2 and store.span_count == 3
    assert store.get("r2") is None and store.get(f"{2:032x}") is None
    assert store.get("r1") is not None and store.get("r3") is not None


def test_request_id_most_recent_wins_and_survives_old_eviction() -> None:
    store = TraceStore(max_traces=2)
    store.add(_one_span_trace(1, "dup"), now_ms=1)
    store.add(_one_span_trace(2, "dup"), now_ms=2)
    assert store.get("dup")["trace_id"] == f"{2:032x}"  # type: ignore[index]
    store.add(_one_span_trace(2, spans=2)[1:], now_ms=3)
    store.add(_one_span_trace(3), now_ms=4)  # evicts trace 1, which no longer owns "dup"
    assert store.get(f"{1:032x}") is None and store.get("dup")["trace_id"] == f"{2:032x}"  # type: ignore[index]
    store.add(_one_span_trace(4), now_ms=5)  # evicts trace 2
    assert store.get("dup") is None


def test_span_limits_drop_and_evict() -> None:
    store = TraceStore(max_spans_per_trace=3, max_spans=5)
    assert store.add(_one_span_trace(1, spans=5), now_ms=1) == 3
    assert store.dropped_spans == 2 and store.span_count == 3
    store.add(_one_span_trace(2, spans=2), now_ms=2)
    assert store.span_count == 5 and store.evicted_traces == 0
    store.add(_one_span_trace(3), now_ms=3)  # 6 spans > 5: the oldest whole trace goes
    assert store.evicted_traces == 1 and store.span_count == 3 and store.get(f"{1:032x}") is None


def test_duplicate_spans_are_ignored() -> None:
    store = TraceStore()
    spans = spans_from_proto(mesh_request())
    store.add(spans, now_ms=1)
    assert store.add(spans, now_ms=2) == 0
    assert store.span_count == 6 and store.duplicate_spans == 6 and store.dropped_spans == 0
    assert store.get("req-1")["span_count"] == 6  # type: ignore[index]


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        TraceStore(max_traces=0)


# --- OTLP/gRPC receiver -----------------------------------------------------------------------------------------


async def test_grpc_receiver_takes_spans_from_the_real_otlp_exporter() -> None:
    store = TraceStore()
    seen: list[int] = []
    async with otlp_receiver(store, on_spans=lambda spans: seen.append(len(spans)), clock=lambda: 42) as port:
        provider = TracerProvider(resource=Resource.create({"service.name": "gateway", "service.instance.id": "gw-1"}))
        provider.add_span_processor(
            SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"127.0.0.1:{port}", insecure=True, timeout=5))
        )
        tracer = provider.get_tracer("test")

        def emit() -> str:
            # SimpleSpanProcessor exports synchronously, so this must run off the server's event loop.
            with tracer.start_as_current_span("POST /v1/predict", kind=SpanKind.SERVER) as root:
                root.set_attribute("loom.request_id", "grpc-req")
                root.set_attribute("loom.pipeline", "text")
                with tracer.start_as_current_span("publish loom.pre.text", kind=SpanKind.PRODUCER) as child:
                    child.set_status(StatusCode.ERROR)
            provider.shutdown()
            return f"{root.get_span_context().trace_id:032x}"

        trace_id = await asyncio.to_thread(emit)

        trace = store.get("grpc-req")
        assert trace is not None and trace["trace_id"] == trace_id and seen == [1, 1]
        assert [(s["name"], s["kind"], s["depth"]) for s in trace["spans"]] == [
            ("POST /v1/predict", "SERVER", 0),
            ("publish loom.pre.text", "PRODUCER", 1),
        ]
        assert trace["services"] == ["gateway"] and trace["spans"][0]["replica"] == "gw-1"
        assert trace["pipeline"] == "text" and trace["status"] == "ERROR"

        # A malformed request is refused with INVALID_ARGUMENT, not stored.
        bad = pb_request("gateway", "g", [pb_span("a", 1, None, Span.SPAN_KIND_SERVER, 0, 1)])
        bad.resource_spans[0].scope_spans[0].spans[0].span_id = b"\x01"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = trace_service_pb2_grpc.TraceServiceStub(channel)  # type: ignore[no-untyped-call]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Export(bad, timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "span_id must be 8 bytes" in (err.value.details() or "")
            reply = await stub.Export(mesh_request(), timeout=5)
            assert isinstance(reply, ExportTraceServiceResponse) and not reply.HasField("partial_success")
        assert store.get("req-1") is not None and len(store) == 2


async def test_grpc_receiver_answers_invalid_argument_to_bytes_that_are_not_a_request() -> None:
    """Garbage on the wire is the caller's mistake: INVALID_ARGUMENT saying so, never UNKNOWN; nothing stored."""
    store = TraceStore()
    async with otlp_receiver(store) as port:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            # Identity (de)serializers: the bytes go out exactly as written.
            export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
            for garbage in (b"\x0a\xff\xff\xff\xff\x0f", b"\xff\x00garbage", b"\x0a\x05\x0a\x03\x0a"):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await export(garbage, timeout=5)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, garbage
                assert "malformed OTLP ExportTraceServiceRequest" in (err.value.details() or "")
            # The same raw channel still gets an answer for a well-formed request.
            reply = await export(mesh_request().SerializeToString(), timeout=5)
            assert ExportTraceServiceResponse.FromString(reply) == ExportTraceServiceResponse()
        assert len(store) == 1


# --- OTLP/HTTP receiver -----------------------------------------------------------------------------------------


def http_app(store: TraceStore, **kwargs: Any) -> web.Application:
    app = web.Application()
    app.router.add_post("/v1/traces", make_http_handler(store, clock=lambda: 7, **kwargs))
    return app


async def test_http_receiver_protobuf_json_and_gzip() -> None:
    store = TraceStore()
    got: list[str] = []
    app = http_app(store, on_spans=lambda spans: got.extend(s["service"] for s in spans))
    async with TestClient(TestServer(app)) as client:
        body = mesh_request().SerializeToString()
        resp = await client.post("/v1/traces", data=body, headers={"Content-Type": "application/x-protobuf"})
        assert resp.status == 200 and resp.content_type == "application/x-protobuf"
        assert ExportTraceServiceResponse.FromString(await resp.read()) == ExportTraceServiceResponse()

        doc = json.dumps(triton_doc()).encode()
        resp = await client.post("/v1/traces", data=doc, headers={"Content-Type": "application/json"})
        assert resp.status == 200 and await resp.json() == {}

        other = triton_doc()
        other["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["spanId"] = sid(10)
        resp = await client.post(
            "/v1/traces",
            data=gzip.compress(json.dumps(other).encode()),
            headers={"Content-Type": "application/json; charset=utf-8", "Content-Encoding": "gzip"},
        )
        assert resp.status == 200 and await resp.json() == {}

    trace = store.get("req-1")
    assert trace is not None and trace["span_count"] == 10
    assert [s["name"] for s in trace["spans"]][-4:] == ["InferRequest", "minilm", "compute", "compute"]
    assert got.count("triton") == 6 and got.count("gateway") == 2


async def test_http_receiver_rejects_bad_bodies() -> None:
    store = TraceStore()
    async with TestClient(TestServer(http_app(store))) as client:

        async def post(data: bytes, content_type: str, **headers: str) -> tuple[int, Any]:
            resp = await client.post("/v1/traces", data=data, headers={"Content-Type": content_type, **headers})
            return resp.status, await resp.json()

        status, body = await post(b"{not json", "application/json")
        assert status == 400 and body["error"]["code"] == "INVALID_ARGUMENT"
        assert "malformed OTLP body" in body["error"]["message"]

        status, body = await post(json.dumps(_span_doc(traceId="abc")).encode(), "application/json")
        assert status == 400 and "traceId" in body["error"]["message"]

        status, body = await post(b"\xff\xff\xff", "application/x-protobuf")
        assert status == 400 and body["error"]["code"] == "INVALID_ARGUMENT"

        status, body = await post(b"{}", "text/plain")
        assert status == 415 and "text/plain" in body["error"]["message"]

        status, body = await post(b"{}", "application/json", **{"Content-Encoding": "compress"})
        assert status == 415 and "compress" in body["error"]["message"]

        # aiohttp fails to inflate it and drops the connection afterwards, hence a fresh one.
        status, body = await post(
            b"not gzip", "application/json", **{"Content-Encoding": "gzip", "Connection": "close"}
        )
        assert status == 400 and body["error"]["code"] == "INVALID_ARGUMENT"
    assert len(store) == 0


async def test_http_receiver_bounds_the_body() -> None:
    store = TraceStore(max_spans_per_trace=1)
    app = http_app(store, max_body_bytes=4096)
    big = json.dumps(triton_doc()).encode() + b" " * 5000
    async with TestClient(TestServer(app)) as client:
        resp = await client.post("/v1/traces", data=big, headers={"Content-Type": "application/json"})
        assert resp.status == 413 and (await resp.json())["error"]["code"] == "RESOURCE_EXHAUSTED"
        # Small on the wire, large once inflated.
        resp = await client.post(
            "/v1/traces",
            data=gzip.compress(big),
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )
        assert resp.status == 413
        # Fits: one span per trace is kept, the rest are reported back as OTLP partial success.
        resp = await client.post(
            "/v1/traces", data=json.dumps(triton_doc()), headers={"Content-Type": "application/json"}
        )
        assert resp.status == 200
        assert await resp.json() == {
            "partialSuccess": {"rejectedSpans": "2", "errorMessage": "trace span limit (1) reached"}
        }
    assert store.span_count == 1 and store.dropped_spans == 2


async def test_http_receiver_inflates_gzip_itself_when_aiohttp_does_not() -> None:
    store = TraceStore()
    app = http_app(store, max_body_bytes=4096)
    doc = json.dumps(triton_doc()).encode()
    server = TestServer(app)
    await server.start_server(auto_decompress=False)  # TestServer's own kwargs never reach the runner
    async with TestClient(server) as client:
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        resp = await client.post("/v1/traces", data=gzip.compress(doc), headers=headers)
        assert resp.status == 200 and store.span_count == 3
        # A gzip bomb is cut off at the limit rather than inflated whole.
        resp = await client.post("/v1/traces", data=gzip.compress(b" " * 10_000_000), headers=headers)
        assert resp.status == 413
        resp = await client.post("/v1/traces", data=gzip.compress(doc)[:-12], headers=headers)
        assert resp.status == 400 and "gzip" in (await resp.json())["error"]["message"]
