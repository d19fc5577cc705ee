"""Hypothesis over every function that decodes an untrusted payload.

A client's mistake must come back as a typed :class:`LoomError` (INVALID_ARGUMENT and friends),
never as an unexpected exception that the edge would turn into INTERNAL. Bytes from the bus must
either decode or raise ``DecodeError``, which the stages and the durable ingress catch (dead letter
or drop). Each property runs a bounded, derandomized number of examples, so the file takes seconds.
"""

from __future__ import annotations

import contextlib
import json
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common import envelope
from services.common.errors import LoomError
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.pb.loom.v1 import gateway_pb2
from services.gateway import convert, kserve_rest, kserve_wire
from services.gateway.core import PredictCall
from services.gateway.http_api import GatewayHttp
from services.gateway.settings import GatewaySettings
from tests.fuzzlog import counted

pytestmark = pytest.mark.unit

FUZZ = settings(
    max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)

SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=25,
)
#: Keys a client would plausibly send, so the generator reaches past the "unknown field" check.
KEYS = st.sampled_from(["inputs", "timeout_ms", "request_id", "bypass_cache"])
BODIES = st.dictionaries(KEYS, JSON, max_size=4) | st.fixed_dictionaries(
    {
        "inputs": st.dictionaries(
            st.sampled_from(["text", "image", "audio"]), JSON | st.fixed_dictionaries({"b64": st.text(max_size=30)})
        )
    },
    optional={"timeout_ms": JSON, "request_id": JSON, "bypass_cache": JSON},
)


def _valid_request() -> gateway_pb2.PredictRequest:
    req = gateway_pb2.PredictRequest(pipeline="embed", timeout_ms=2000, request_id="r-1")
    req.inputs["text"].text = "a sentence to embed " * 4
    req.inputs["image"].data = bytes(range(64))
    req.inputs["image"].content_type = "image/png"
    return req


VALID_PREDICT = _valid_request().SerializeToString()
VALID_PART = pb.Part(
    request_id="r-1", part_id="text", pipeline="embed", slip=["loom.pre.text"], text="hi"
).SerializeToString()


def _decode_or_decode_error(cls: Any, data: bytes) -> Any:
    try:
        return cls.FromString(data)
    except DecodeError:
        return None


@FUZZ
@given(body=JSON | BODIES)
@counted("unit-call-from-json-raises-only-loom-errors")
def test_call_from_json_raises_only_loom_errors(body: Any) -> str | None:
    try:
        call = convert.call_from_json("embed", body)
    except LoomError:
        return "typed error"
    assert isinstance(call, PredictCall)
    return None


@settings(max_examples=5, deadline=None, derandomize=True, database=None)
@given(text=st.sampled_from([0, 1_000, 1_000_000, 5_000_000]).map(lambda n: "é" * n))
@counted("unit-huge-text-input-converts-or-raises-typed")
def test_huge_text_input_converts_or_raises_typed(text: str) -> None:
    # Size limits are the edge's job (read_body); the conversion itself must not choke on a large field.
    call = convert.call_from_json("embed", {"inputs": {"text": text}})
    assert call.inputs["text"] == text


@FUZZ
@given(
    fields=st.dictionaries(
        st.sampled_from(["text", "image", "timeout_ms", "request_id", "bypass_cache"]) | st.text(max_size=8),
        st.tuples(st.binary(max_size=64), st.text(max_size=20), st.booleans()),
        max_size=5,
    )
)
@counted("unit-call-from-form-raises-only-loom-errors")
def test_call_from_form_raises_only_loom_errors(fields: dict[str, tuple[bytes, str, bool]]) -> str | None:
    try:
        convert.call_from_form("embed", fields)
    except LoomError:
        return "typed error"
    return None


@FUZZ
@given(data=st.binary(max_size=512))
@counted("unit-random-bytes-decode-or-raise-decode-error")
def test_random_bytes_decode_or_raise_decode_error(data: bytes) -> None:
    for cls in (gateway_pb2.PredictRequest, gateway_pb2.SubmitRequest, pb.Part):
        msg = _decode_or_decode_error(cls, data)
        if isinstance(msg, gateway_pb2.PredictRequest):
            # A decodable request still has to be a valid call, or an InvalidArgument.
            with contextlib.suppress(LoomError):
                convert.call_from_proto(msg, None)


@FUZZ
@given(cut=st.integers(min_value=0, max_value=len(VALID_PREDICT)), flip=st.integers(0, 255), at=st.integers(0, 10_000))
@counted("unit-truncated-and-mutated-messages-decode-or-raise-decode-error")
def test_truncated_and_mutated_messages_decode_or_raise_decode_error(cut: int, flip: int, at: int) -> None:
    for valid, cls in ((VALID_PREDICT, gateway_pb2.PredictRequest), (VALID_PART, pb.Part)):
        data = bytearray(valid[: min(cut, len(valid))])
        if data:
            data[at % len(data)] ^= flip
        msg = _decode_or_decode_error(cls, bytes(data))
        if isinstance(msg, gateway_pb2.PredictRequest):
            with contextlib.suppress(LoomError):
                convert.call_from_proto(msg, None)


@FUZZ
@given(request_id=st.text(max_size=100))
@counted("unit-request-ids-are-checked-not-crashed-on")
def test_request_ids_are_checked_not_crashed_on(request_id: str) -> str | None:
    try:
        assert envelope.check_request_id(request_id) == request_id
    except LoomError:
        return "typed error"
    return None


@FUZZ
@given(data=st.binary(max_size=256))
@counted("unit-bytes-tensor-unpacking-raises-typed")
def test_bytes_tensor_unpacking_raises_typed(data: bytes) -> str | None:
    try:
        kserve_wire.unpack_bytes(data)
    except LoomError:
        return "typed error"
    return None


KSERVE_INPUT = st.fixed_dictionaries(
    {
        "name": st.text(max_size=8) | JSON,
        "datatype": st.sampled_from(["BYTES", "FP32", "INT64", "BOOL", "UINT8", "FP16", "X"]) | JSON,
    },
    optional={
        "shape": st.lists(st.integers(min_value=-(2**70), max_value=2**70), max_size=4) | JSON,
        "data": JSON,
        "parameters": st.fixed_dictionaries({}, optional={"binary_data_size": st.integers(-5, 64) | JSON}) | JSON,
    },
)
KSERVE_BODY = st.fixed_dictionaries(
    {"inputs": st.lists(KSERVE_INPUT, max_size=3) | JSON},
    optional={"id": JSON, "parameters": JSON, "outputs": JSON},
)


@FUZZ
@given(header=KSERVE_BODY | JSON, binary=st.binary(max_size=64), split_delta=st.integers(-3, 3) | st.none())
@counted("unit-kserve-rest-body-raises-only-loom-errors")
def test_kserve_rest_body_raises_only_loom_errors(header: Any, binary: bytes, split_delta: int | None) -> str | None:
    head = json.dumps(header).encode()
    length = None if split_delta is None else str(len(head) + split_delta)
    try:
        kserve_rest.request_from_rest("embed", "", head + binary, length)
    except LoomError:
        return "typed error"
    return None


# --- found by tests/integration/test_fuzz_http.py ------------------------------------------------


async def test_a_malformed_multipart_body_is_invalid_argument_not_internal() -> None:
    # A part header that is not a valid HTTP header (a control character in the field name) made
    # aiohttp's multipart reader raise InvalidHeader, which the edge answered as 500 INTERNAL.
    app = web.Application()
    core = SimpleNamespace(record=lambda *args: None)  # the body is refused before the core is asked
    GatewayHttp(cast(Any, core), cast(Any, None), GatewaySettings(), cast(Any, None)).add_routes(app)
    boundary = "b0undary"
    bad_header = b'--b0undary\r\nContent-Disposition: form-data; name="a\x0cb"\r\n\r\nx\r\n--b0undary--\r\n'
    wrong_boundary = b"--other\r\nContent-Disposition: form-data; name=text\r\n\r\nx\r\n--other--\r\n"
    async with TestClient(TestServer(app)) as client:
        for body in (bad_header, wrong_boundary):
            resp = await client.post(
                "/v1/pipelines/embed:predict",
                data=body,
                headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
            )
            assert resp.status == 400, await resp.text()
            assert (await resp.json())["error"]["code"] == "INVALID_ARGUMENT"
