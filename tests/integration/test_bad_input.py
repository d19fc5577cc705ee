"""Bad input gets a typed error, nothing crashes, a neighbour's request still works."""

from __future__ import annotations

import threading

import grpc
import pytest

from services.common.launch.mesh import SERVICES, Mesh, grpc_serving
from services.common.pb.loom.v1 import gateway_pb2
from tests.support import gateway_channel, http_json, predict_grpc, predict_http

pytestmark = pytest.mark.integration


def predict_url(mesh: Mesh, pipeline: str = "embed") -> str:
    return f"{mesh.gateway_http}/v1/pipelines/{pipeline}:predict"


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"inputs": {"text": ""}}, 400, "empty"),
        ({"inputs": {"text": "   "}}, 400, "empty"),
        ({"inputs": {"text": 42}}, 400, "must be a string"),
        ({"inputs": "hello"}, 400, "'inputs'"),
        ({"inputs": {}}, 400, "no inputs"),
        ({"inputs": {"image": "abc"}}, 400, "unknown input"),
        ({"inputs": {"text": "hi"}, "timeout_ms": "soon"}, 400, "timeout_ms"),
        ({"inputs": {"text": "hi"}, "timeout_ms": -5}, 400, "negative"),
        ({"inputs": {"text": "hi"}, "request_id": "a/b c"}, 400, "request_id"),
        ({"inputs": {"text": "hi"}, "surprise": 1}, 400, "unknown field"),
        ([1, 2, 3], 400, "JSON object"),
    ],
)
def test_http_bad_json_is_400_with_json_body(mesh: Mesh, body: object, status: int, needle: str) -> None:
    code, reply = http_json(predict_url(mesh), body)
    assert code == status
    assert reply["error"]["code"] == "INVALID_ARGUMENT"
    assert needle in reply["error"]["message"]


def test_http_invalid_json_unknown_pipeline_and_oversize(mesh: Mesh) -> None:
    code, reply = http_json(predict_url(mesh), raw=b"{not json")
    assert code == 400 and reply["error"]["code"] == "INVALID_ARGUMENT"

    code, reply = http_json(predict_url(mesh, "nope"), {"inputs": {"text": "hi"}})
    assert code == 404 and reply["error"]["code"] == "NOT_FOUND" and "nope" in reply["error"]["message"]

    # Above the body limit (28 MiB by default): refused on the declared length, before reading it.
    body = b'{"inputs": {"text": "' + b"a" * (30 * 1024 * 1024) + b'"}}'
    code, reply = http_json(predict_url(mesh), raw=body)
    assert code == 413 and reply["error"]["code"] == "RESOURCE_EXHAUSTED"
    assert f"limit of {28 * 1024 * 1024} bytes" in reply["error"]["message"]


def test_grpc_bad_input_codes(mesh: Mesh) -> None:
    with pytest.raises(grpc.RpcError) as err:
        predict_grpc(mesh.gateway_grpc, "")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "empty" in err.value.details()

    with pytest.raises(grpc.RpcError) as err:
        predict_grpc(mesh.gateway_grpc, "hi", pipeline="nope")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    with pytest.raises(grpc.RpcError) as err:
        predict_grpc(mesh.gateway_grpc, "a" * (30 * 1024 * 1024))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    with gateway_channel(mesh.gateway_grpc) as channel:
        raw = channel.unary_unary("/loom.v1.Gateway/Predict")
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\x0a\xff\xff\xff\xff\x0f", timeout=10)  # a length-delimited field running past the end
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed" in err.value.details()

    req = gateway_pb2.PredictRequest(pipeline="embed")
    req.inputs["text"].SetInParent()  # an input with no value
    with gateway_channel(mesh.gateway_grpc) as channel, pytest.raises(grpc.RpcError) as err:
        channel.unary_unary("/loom.v1.Gateway/Predict")(req.SerializeToString(), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_tiny_deadline_is_deadline_exceeded_not_a_hang(mesh: Mesh) -> None:
    code, reply = predict_http(mesh.gateway_http, "short deadline", timeout_ms=1)
    assert code == 504 and reply["error"]["code"] == "DEADLINE_EXCEEDED"


def test_bad_input_storm_does_not_hurt_a_good_request(mesh: Mesh) -> None:
    results: dict[str, object] = {}

    def good() -> None:
        results["good"] = predict_http(mesh.gateway_http, "a perfectly fine sentence about football")

    def bad(i: int) -> None:
        results[f"bad{i}"] = http_json(predict_url(mesh), raw=b"\x00\xff" * i)

    threads = [threading.Thread(target=bad, args=(i,)) for i in range(1, 20)]
    threads.insert(10, threading.Thread(target=good))
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    status, body = results["good"]  # type: ignore[misc]
    assert status == 200 and body["outputs"]["text"]["labels"][0]["label"] == "sports"
    assert all(results[f"bad{i}"][0] == 400 for i in range(1, 20))  # type: ignore[index]
    for name in SERVICES:
        assert grpc_serving(f"127.0.0.1:{mesh.ports[f'{name}_grpc']}"), name
