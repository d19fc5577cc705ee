import base64
import re

import pytest

from services.common.bus import Bus
from services.common.errors import DeadlineExceeded, InvalidArgument, NotFound, ResourceExhausted
from services.common.pb.loom.v1 import gateway_pb2
from services.common.pipelines import PipelineRegistry
from services.gateway import convert
from services.gateway.core import GatewayCore, PredictCall
from services.gateway.settings import GatewaySettings

pytestmark = pytest.mark.unit


@pytest.fixture
def core() -> GatewayCore:
    return GatewayCore(Bus("gateway"), GatewaySettings(max_text_chars=50), PipelineRegistry())


def test_validate_accepts_and_picks_the_deadline(core: GatewayCore) -> None:
    spec, timeout = core.validate(PredictCall("embed", {"text": "hi"}))
    assert spec.name == "embed" and timeout == 5000
    assert core.validate(PredictCall("embed", {"text": "hi"}, timeout_ms=250))[1] == 250
    assert core.validate(PredictCall("embed", {"text": "hi"}, timeout_ms=9000, transport_remaining_s=1.5))[1] == 1500


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (PredictCall("nope", {"text": "hi"}), NotFound),
        (PredictCall("embed", {}), InvalidArgument),
        (PredictCall("embed", {"text": " "}), InvalidArgument),
        (PredictCall("embed", {"text": "x" * 51}), InvalidArgument),
        (PredictCall("embed", {"audio": "x"}), InvalidArgument),
        (PredictCall("embed", {"text": "hi"}, timeout_ms=10**9), InvalidArgument),
        (PredictCall("embed", {"text": "hi"}, request_id="a.b"), InvalidArgument),
        (PredictCall("embed", {"text": "hi"}, transport_remaining_s=0.0), DeadlineExceeded),
    ],
)
def test_validate_rejects(core: GatewayCore, call: PredictCall, error: type[Exception]) -> None:
    with pytest.raises(error):
        core.validate(call)


def test_json_edge() -> None:
    call = convert.call_from_json("embed", {"inputs": {"text": "hi"}, "timeout_ms": 10, "request_id": "r"})
    assert call == PredictCall("embed", {"text": "hi"}, 10, "r")
    assert call.bypass_cache is False
    for bad in [{"inputs": {"text": "hi"}, "timeout_ms": True}, {"inputs": None}, "text"]:
        with pytest.raises(InvalidArgument):
            convert.call_from_json("embed", bad)


def test_response_to_json() -> None:
    resp = gateway_pb2.PredictResponse(request_id="r", trace_id="t" * 32, pipeline="embed")
    text = resp.outputs["text"].text
    text.model, text.model_version = "minilm", "1"
    text.embedding.extend([0.5, -0.5])
    text.labels.add(label="sports", score=0.25)
    resp.timings_ms["gateway_total"] = 1.23456
    body = convert.response_to_json(resp)
    assert body["outputs"]["text"] == {
        "model": "minilm",
        "model_version": "1",
        "embedding": [0.5, -0.5],
        "labels": [{"label": "sports", "score": 0.25}],
    }
    assert body["timings_ms"] == {"gateway_total": 1.235} and body["degraded"] is False and "errors" not in body


PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32
WAV = b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 32


@pytest.mark.parametrize(
    ("inputs", "error", "says"),
    [
        ({"image": b""}, InvalidArgument, "empty (0 bytes)"),
        ({"image": b"GIF89a" + b"\x00" * 20}, InvalidArgument, "image/gif"),
        ({"audio": b"definitely not audio at all"}, InvalidArgument, "not a supported audio file"),
        ({"audio": PNG}, InvalidArgument, "image file"),
        ({"image": "a string"}, InvalidArgument, "send its bytes"),
        ({"text": b"bytes"}, InvalidArgument, "send a string"),
        ({"image": PNG + b"\x00" * 100}, ResourceExhausted, "the limit is 100 bytes"),
    ],
)
def test_file_inputs_are_checked_at_the_door(inputs: dict[str, str | bytes], error: type[Exception], says: str) -> None:
    core = GatewayCore(Bus("gateway"), GatewaySettings(max_input_bytes=100), PipelineRegistry())
    with pytest.raises(error, match=re.escape(says)):
        core.validate(PredictCall("content", inputs))


def test_content_takes_any_subset_of_its_inputs(core: GatewayCore) -> None:
    for inputs in ({"text": "hi"}, {"image": PNG}, {"audio": WAV, "text": "hi"}, {"image": PNG, "audio": WAV}):
        spec, timeout = core.validate(PredictCall("content", inputs))  # type: ignore[arg-type]
        assert spec.name == "content" and timeout == spec.deadline_ms


def test_json_and_form_edges_carry_files() -> None:
    call = convert.call_from_json(
        "content",
        {
            "inputs": {"image": {"b64": base64.b64encode(PNG).decode(), "content_type": "image/png"}},
            "bypass_cache": True,
        },
    )
    assert call.inputs == {"image": PNG} and call.content_types == {"image": "image/png"} and call.bypass_cache
    with pytest.raises(InvalidArgument, match="base64"):
        convert.call_from_json("content", {"inputs": {"image": {"b64": "***"}}})
    with pytest.raises(InvalidArgument, match="must be a string"):
        convert.call_from_json("content", {"inputs": {"image": [1, 2]}})
    form = convert.call_from_form(
        "content",
        {"text": (b"hello", "", False), "image": (PNG, "image/png", True), "timeout_ms": (b"1500", "", False)},
    )
    assert form.inputs == {"text": "hello", "image": PNG} and form.timeout_ms == 1500
    with pytest.raises(InvalidArgument, match="timeout_ms"):
        convert.call_from_form("content", {"timeout_ms": (b"soon", "", False)})


def test_proto_edge_carries_files() -> None:
    req = gateway_pb2.PredictRequest(pipeline="content", bypass_cache=True)
    req.inputs["image"].data = PNG
    req.inputs["image"].content_type = "image/png"
    req.inputs["text"].text = "hi"
    call = convert.call_from_proto(req, None)
    assert call.inputs == {"image": PNG, "text": "hi"} and call.content_types == {"image": "image/png"}
    assert call.bypass_cache
