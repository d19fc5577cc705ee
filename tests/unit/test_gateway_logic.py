import pytest

from services.common.bus import Bus
from services.common.errors import DeadlineExceeded, InvalidArgument, NotFound
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
