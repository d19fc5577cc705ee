"""Hypothesis over every gRPC method on every port of the session mesh: a client's mistake is never INTERNAL.

The methods are enumerated as test_auth_everywhere.py does (the servicers each service registers,
resolved in the descriptor pool), so a method added later is fuzzed without a change here. Each
gets a bounded, derandomized corpus, sent as raw bytes with the admin key through
``channel.unary_unary(path)`` (no serializer: whatever bytes we like reach the server):

- random bytes, and a string field carrying bytes that are not UTF-8;
- messages generated from the method's input descriptor (every field type, nested messages, maps,
  repeated fields, open enums, now and then a 64 kB string);
- a valid message of the method cut short and bit-flipped, or with another message appended (two
  members of a oneof, a field twice: protobuf merges, the last member wins).

No answer may be INTERNAL, UNKNOWN or DATA_LOSS. Afterwards every service still serves, a normal
predict answers, and no service logged a Traceback while the corpus ran.

State: the admin write methods get names that no model has (mutations of ``fuzz-no-such-model``),
so a register, traffic change or rollout is refused NOT_FOUND/INVALID_ARGUMENT, never applied.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from services.common.launch.mesh import SERVICES, Mesh, grpc_serving
from services.common.pb.loom.v1 import gateway_pb2
from tests.fuzzlog import recording
from tests.integration.test_auth_everywhere import HEALTH, Port, ports  # noqa: F401 - ports is a fixture
from tests.support import grpc_auth, predict_http

pytestmark = pytest.mark.integration

EXAMPLES = 24  # per method: ~55 methods, the whole file well under 60 s on 2 busy cores
STREAM_EXAMPLES = 8
BAD = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
NO_MODEL = "fuzz-no-such-model"
OTLP_EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def _message(full_name: str) -> type[Message]:
    return message_factory.GetMessageClass(descriptor_pool.Default().FindMessageTypeByName(full_name))


def _scalar(field: Any) -> st.SearchStrategy[Any]:
    t = field.type
    if t == FieldDescriptor.TYPE_STRING:
        huge = st.just(64 * 1024).map(lambda n: "x" * n)  # mapped: a repr of the value would flood warnings
        return st.text(max_size=24) | st.sampled_from(["", NO_MODEL, "embed", "content", "1"]) | huge
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return st.floats(width=32 if t == FieldDescriptor.TYPE_FLOAT else 64)
    if t == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values]) | st.integers(-5, 1000)  # open enums
    unsigned = t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED32,
                     FieldDescriptor.TYPE_FIXED64)  # fmt: skip
    wide = t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
                 FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64)  # fmt: skip
    bits = 64 if wide else 32
    low, high = (0, 2**bits - 1) if unsigned else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return st.integers(low, high) | st.sampled_from([0, 1, -1 if low < 0 else 2, high])


def messages(desc: Any, depth: int = 0) -> st.SearchStrategy[bytes]:
    """Serialized messages of type ``desc``: any subset of fields set, nested up to 3 deep."""
    cls = message_factory.GetMessageClass(desc)

    def value(field: Any) -> st.SearchStrategy[Any]:
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            single = _scalar(field)
        elif depth >= 3:
            return st.none()
        else:
            single = messages(field.message_type, depth + 1).map(
                message_factory.GetMessageClass(field.message_type).FromString
            )
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key, val = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            inner = messages(val.message_type, depth + 1) if val.message_type is not None else None
            vals = (
                inner.map(message_factory.GetMessageClass(val.message_type).FromString)
                if inner is not None
                else _scalar(val)
            )
            return st.dictionaries(_scalar(key), vals, max_size=3)
        if field.is_repeated:
            return st.lists(single, max_size=3)
        return single

    fields = {f.name: st.none() | value(f) for f in desc.fields}

    def build(values: dict[str, Any]) -> bytes:
        msg = cls()
        for name, v in values.items():
            if v is None:
                continue
            field = desc.fields_by_name[name]
            target = getattr(msg, name)
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                for k, item in v.items():
                    if isinstance(item, Message):
                        target[k].CopyFrom(item)
                    else:
                        target[k] = item
            elif field.is_repeated:
                target.extend(v)
            elif isinstance(v, Message):
                target.CopyFrom(v)
            else:
                setattr(msg, name, v)
        return msg.SerializeToString()

    return st.fixed_dictionaries(fields).map(build)


def _valid(path: str, input_type: str) -> bytes:
    """One valid request of the method (reaching past decoding into the handler)."""
    if path == "/loom.v1.Gateway/Predict":
        req = gateway_pb2.PredictRequest(pipeline="embed", timeout_ms=5000)
        req.inputs["text"].text = "fuzzing the gateway over gRPC"
        return req.SerializeToString()
    if path == "/loom.v1.Gateway/Submit":
        sub = gateway_pb2.SubmitRequest(request=gateway_pb2.PredictRequest(pipeline="embed", timeout_ms=5000))
        sub.request.inputs["text"].text = "fuzzing the durable lane over gRPC"
        return sub.SerializeToString()
    msg = _message(input_type)()
    for name in ("model", "model_name", "name", "request_id", "pipeline", "version", "service"):
        if (
            name in msg.DESCRIPTOR.fields_by_name
            and msg.DESCRIPTOR.fields_by_name[name].type == FieldDescriptor.TYPE_STRING
        ):
            setattr(msg, name, {"request_id": "0" * 32, "version": "1", "service": ""}.get(name, NO_MODEL))
    if path == OTLP_EXPORT:
        span = msg.resource_spans.add().scope_spans.add().spans.add()  # type: ignore[attr-defined]
        span.trace_id, span.span_id, span.name = b"\x01" * 16, b"\x02" * 8, "fuzz"
    return msg.SerializeToString()


def _damaged(valid: bytes) -> st.SearchStrategy[bytes]:
    def cut(args: tuple[int, int, int]) -> bytes:
        end, at, flip = args
        data = bytearray(valid[:end])
        if data:
            data[at % len(data)] ^= flip or 1
        return bytes(data)

    return st.tuples(st.integers(0, len(valid)), st.integers(0, 1000), st.integers(0, 255)).map(cut)


NOT_UTF8 = st.binary(min_size=1, max_size=32).map(lambda b: b"\x0a" + bytes([len(b) + 1]) + b"\xff" + b)


def corpus(path: str, input_type: str, n: int) -> list[bytes]:
    """``n`` payloads for ``path``, the same every run."""
    desc = descriptor_pool.Default().FindMessageTypeByName(input_type)
    valid = _valid(path, input_type)
    generated = messages(desc)
    strategy = st.one_of(
        st.binary(max_size=512),
        NOT_UTF8,
        generated,
        _damaged(valid),
        st.tuples(st.just(valid), generated).map(lambda pair: pair[0] + pair[1]),  # a oneof mix, a field twice
    )
    out: list[bytes] = [valid]

    @settings(max_examples=n, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(strategy)
    def collect(payload: bytes) -> None:
        out.append(payload)

    collect()
    return out


def send(channel: grpc.Channel, path: str, streaming: bool, payload: bytes) -> grpc.StatusCode:
    """The status of one call of ``path`` with ``payload`` as the request's bytes."""
    try:
        if path.endswith("/Watch"):  # streams until cancelled: the first answer (or the error) is enough
            answers = channel.unary_stream(path)(payload, timeout=10, metadata=grpc_auth())
            next(answers, None)
            answers.cancel()
        elif streaming:
            for _ in channel.stream_stream(path)(iter([payload]), timeout=15, metadata=grpc_auth()):
                pass
        else:
            channel.unary_unary(path)(payload, timeout=15, metadata=grpc_auth())
    except grpc.RpcError as err:
        code: grpc.StatusCode = err.code()
        return code
    return grpc.StatusCode.OK


def _input_type(path: str) -> str:
    service, method = path.split("/")[1:]
    return str(descriptor_pool.Default().FindServiceByName(service).methods_by_name[method].input_type.full_name)


def _fuzz(port: Port, path: str, streaming: bool, seen: Counter[str]) -> list[str]:
    """Send ``path``'s corpus; tally the codes into ``seen``; return the calls that earned a code in BAD."""
    bad = []
    with grpc.insecure_channel(port.grpc) as channel:
        for payload in corpus(path, _input_type(path), STREAM_EXAMPLES if streaming else EXAMPLES):
            code = send(channel, path, streaming, payload)
            seen[code.name] += 1
            if code in BAD:
                bad.append(f"{port.service} {path} {code.name} payload={payload[:80]!r} ({len(payload)} B)")
    return bad


def _healthy_and_quiet(mesh: Mesh, before: dict[str, int]) -> None:
    """Every service serves, a predict answers, and no service logged a Traceback since ``before``."""
    for service in SERVICES:
        assert grpc_serving(f"127.0.0.1:{mesh.ports[f'{service}_grpc']}", timeout=5), f"{service} stopped serving"
    status, answer = predict_http(mesh.gateway_http, "still answering after the gRPC fuzz")
    assert status == 200 and len(answer["outputs"]["text"]["embedding"]) == 384, answer
    for replica, size in before.items():
        with (mesh.workdir / "logs" / f"{replica}.log").open("rb") as log:
            log.seek(size)
            written = log.read().decode("utf-8", "replace")
        assert "Traceback" not in written, f"{replica} raised on the fuzz:\n{written[-3000:]}"


def _log_sizes(mesh: Mesh) -> dict[str, int]:
    return {f"{s}-0": (mesh.workdir / "logs" / f"{s}-0.log").stat().st_size for s in SERVICES}


# The methods in three groups: Loom's own, the standard health service (grpc_health's servicer, which
# services/common/lifecycle.py registers with a decoder of its own: the generated one made a non-UTF-8
# `service` UNKNOWN) and the monitor's OTLP receiver (which also decodes the bytes itself).


def _group(path: str) -> str:
    return "health" if path in HEALTH else "otlp-export" if path == OTLP_EXPORT else "loom"


@pytest.mark.parametrize(
    "group",
    [
        "loom",
        "health",
        "otlp-export",
    ],
)
def test_no_grpc_method_answers_internal_to_malformed_requests(
    group: str,
    mesh: Mesh,
    ports: list[Port],  # noqa: F811
) -> None:
    before = _log_sizes(mesh)
    bad: list[str] = []
    methods = [(p, path, streaming) for p in ports for path, streaming in sorted(p.methods) if _group(path) == group]
    with recording(f"grpc-{group}", methods=len(methods), examples_per_method=EXAMPLES) as seen:
        for port, path, streaming in methods:
            bad += _fuzz(port, path, streaming, seen)
    print(f"\nfuzz-grpc {group}: {len(methods)} methods, {sum(seen.values())} calls, {dict(seen)}")
    expected = {"loom": 30, "health": 2 * len(SERVICES), "otlp-export": 1}[group]
    assert len(methods) >= expected, [m[1] for m in methods]
    assert seen["OK"] >= 1 and sum(seen.values()) >= len(methods) * STREAM_EXAMPLES  # valid calls went through
    assert not bad, "\n".join(bad[:30])
    _healthy_and_quiet(mesh, before)
