"""The gateway speaks KServe v2: unmodified tritonclient (gRPC and HTTP) against the real mesh."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from services.common.launch.mesh import Mesh
from services.preprocess.text import TextTokenizer
from tests.media import text_image
from tests.support import BearerAuth, bearer, eventually, metric, read_spans

pytestmark = pytest.mark.integration

TEXT = "The central bank raised interest rates again this quarter."


@pytest.fixture(scope="module")
def g(mesh: Mesh) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(mesh.gateway_grpc)
    client.register_plugin(BearerAuth())  # every call carries the tests' key, as headers=... would
    yield client
    client.close()


@pytest.fixture(scope="module")
def h(mesh: Mesh) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(mesh.gateway_http.removeprefix("http://"), network_timeout=60)
    client.register_plugin(BearerAuth())
    yield client
    client.close()


def texts(module: Any, name: str, *values: bytes) -> Any:
    inp = module.InferInput(name, [len(values)], "BYTES")
    inp.set_data_from_numpy(np.array(values, dtype=np.object_))
    return inp


def token_inputs(module: Any, text: str) -> list[Any]:
    tensors, _ = TextTokenizer().encode(text)
    inputs = []
    for name, array in tensors.items():
        inp = module.InferInput(name, [1, array.shape[0]], "INT64")
        inp.set_data_from_numpy(array[np.newaxis, :])
        inputs.append(inp)
    return inputs


def result_json(result: Any) -> dict[str, Any]:
    raw = result.as_numpy("result")[0]
    return dict(json.loads(raw if isinstance(raw, bytes | str) else bytes(raw)))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_server_health_and_metadata(g: grpcclient.InferenceServerClient, h: httpclient.InferenceServerClient) -> None:
    assert g.is_server_live() and g.is_server_ready()
    assert h.is_server_live() and h.is_server_ready()
    meta = g.get_server_metadata()
    assert meta.name == "loom" and meta.version and list(meta.extensions) == ["binary_tensor_data"]
    assert h.get_server_metadata() == {"name": "loom", "version": meta.version, "extensions": ["binary_tensor_data"]}


def test_model_metadata_and_readiness(g: grpcclient.InferenceServerClient, h: httpclient.InferenceServerClient) -> None:
    content = h.get_model_metadata("content")
    print("content metadata:", json.dumps(content))
    assert content["versions"] == ["1"] and content["platform"] == "loom_pipeline"
    assert [(i["name"], i["datatype"], i["shape"]) for i in content["inputs"]] == [
        ("text", "BYTES", [-1]),
        ("image", "BYTES", [-1]),
        ("audio", "BYTES", [-1]),
    ]
    assert [o["name"] for o in content["outputs"]] == ["result", "embedding", "topics", "topic_scores"]
    assert g.get_model_metadata("content", as_json=True)["inputs"][0] == {
        "name": "text",
        "datatype": "BYTES",
        "shape": ["-1"],  # protobuf's JSON writes int64 as strings
    }

    minilm = h.get_model_metadata("minilm")
    print("minilm metadata:", json.dumps(minilm))
    assert minilm["name"] == "minilm" and "1" in minilm["versions"]
    assert {(i["name"], i["datatype"]) for i in minilm["inputs"]} == {
        ("input_ids", "INT64"),
        ("attention_mask", "INT64"),
        ("token_type_ids", "INT64"),
    }
    assert minilm["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}]
    assert g.get_model_metadata("minilm").outputs[0].name == "embedding"
    assert h.get_model_metadata("minilm", "1")["name"] == "minilm"

    for client in (g, h):
        assert client.is_model_ready("minilm") and client.is_model_ready("minilm", "1")
        assert client.is_model_ready("embed") and client.is_model_ready("embed", "1")
        assert not client.is_model_ready("embed", "7") and not client.is_model_ready("no-such-model")
    # content needs minilm, ocr and vad: ready exactly when the inference service has all three.
    index = {(m["name"], m.get("version", "")): m["state"] for m in h.get_model_repository_index()}
    served = all(index.get((m, "1")) == "READY" for m in ("minilm", "ocr", "vad"))
    assert g.is_model_ready("content") == h.is_model_ready("content") == served
    assert index[("embed", "1")] == "READY"


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_embed_pipeline(
    mesh: Mesh, g: grpcclient.InferenceServerClient, h: httpclient.InferenceServerClient, transport: str
) -> None:
    client, module = (g, grpcclient) if transport == "grpc" else (h, httpclient)
    before = metric(mesh.gateway_http, "loom_requests_total", pipeline="embed", protocol=f"kserve-{transport}")
    result = client.infer("embed", [texts(module, "text", TEXT.encode())], request_id="my id, not Loom's")
    body = result_json(result)
    assert body["pipeline"] == "embed" and body["degraded"] is False and len(body["trace_id"]) == 32
    assert body["outputs"]["text"]["model"] == "minilm" and len(body["outputs"]["text"]["embedding"]) == 384
    assert body["request_id"] != "my id, not Loom's"  # not a Loom id: Loom made its own ...
    response = result.get_response()
    assert (response.id if transport == "grpc" else response["id"]) == "my id, not Loom's"  # ... and echoes theirs
    embedding = result.as_numpy("embedding")
    assert embedding.dtype == np.float32 and embedding.shape == (1, 384)
    assert abs(float(np.linalg.norm(embedding)) - 1.0) < 1e-4
    np.testing.assert_allclose(embedding[0], body["outputs"]["text"]["embedding"], atol=1e-6)
    topics = result.as_numpy("topics")
    assert topics[0] in (b"finance", "finance") and result.as_numpy("topic_scores").dtype == np.float32
    assert metric(mesh.gateway_http, "loom_requests_total", pipeline="embed", protocol=f"kserve-{transport}") == (
        before + 1
    )

    # Only what is asked for; over HTTP also as JSON rather than binary.
    wanted = [module.InferRequestedOutput("embedding", **({} if transport == "grpc" else {"binary_data": False}))]
    only = client.infer(
        "embed", [texts(module, "text", TEXT.encode())], outputs=wanted, request_id=f"kserve-{transport}"
    )
    assert only.as_numpy("result") is None and only.as_numpy("embedding").shape == (1, 384)


def test_the_trace_starts_at_the_kserve_server_span(mesh: Mesh, g: grpcclient.InferenceServerClient) -> None:
    body = result_json(g.infer("embed", [texts(grpcclient, "text", b"trace me through kserve")]))

    def spans() -> list[dict[str, Any]]:
        found = [s for s in read_spans(mesh.workdir / "traces") if s["trace_id"] == body["trace_id"]]
        assert {s["service"] for s in found} >= {"gateway", "preprocess", "inference", "postprocess", "fusion"}
        return found

    root = [s for s in eventually(spans) if s["parent_id"] is None]
    assert [(s["name"], s["kind"]) for s in root] == [("inference.GRPCInferenceService/ModelInfer", "SERVER")]


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_content_pipeline_text_and_image(
    g: grpcclient.InferenceServerClient, h: httpclient.InferenceServerClient, transport: str
) -> None:
    client, module = (g, grpcclient) if transport == "grpc" else (h, httpclient)
    text_only = client.infer("content", [texts(module, "text", TEXT.encode())], parameters={"timeout_ms": 20000})
    body = result_json(text_only)
    assert set(body["outputs"]) == {"text"} and body["topics"][0]["label"] == "finance"
    assert text_only.as_numpy("embedding").shape == (1, 384)
    assert text_only.as_numpy("topics")[0] in (b"finance", "finance")

    image = texts(module, "image", text_image("HELLO WORLD"))
    both = result_json(client.infer("content", [texts(module, "text", TEXT.encode()), image]))
    assert set(both["outputs"]) == {"text", "image"}, both
    assert "HELLO" in both["outputs"]["image"]["text"].upper(), both["outputs"]["image"]


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_minilm_direct_matches_the_pipeline(
    mesh: Mesh, g: grpcclient.InferenceServerClient, h: httpclient.InferenceServerClient, transport: str
) -> None:
    client, module = (g, grpcclient) if transport == "grpc" else (h, httpclient)
    counted = {"pipeline": "model:minilm", "protocol": f"kserve-{transport}", "code": "OK"}
    before = metric(mesh.gateway_http, "loom_requests_total", **counted)
    timed = {"stage": "gateway", "pipeline": "model:minilm", "model": "minilm", "version": "1"}
    timed_before = metric(mesh.gateway_http, "loom_stage_duration_seconds_count", **timed)
    text = "A man is playing a guitar on the stage."
    pipeline = client.infer("embed", [texts(module, "text", text.encode())]).as_numpy("embedding")
    result = client.infer("minilm", token_inputs(module, text), parameters={"bypass_cache": True})
    raw = result.as_numpy("embedding")
    assert raw.dtype == np.float32 and raw.shape == (1, 384)
    assert cosine(raw, pipeline) > 0.999
    version = result.get_response().model_version if transport == "grpc" else result.get_response()["model_version"]
    assert version == "1"

    # Two rows in one request: the gateway splits them into parts and stacks the answers.
    inputs = token_inputs(module, text)
    for inp, (_, array) in zip(inputs, TextTokenizer().encode(text)[0].items(), strict=True):
        inp.set_shape([2, array.shape[0]])
        inp.set_data_from_numpy(np.stack([array, array]))
    batch = client.infer("minilm", inputs).as_numpy("embedding")
    assert batch.shape == (2, 384) and cosine(batch[1], pipeline) > 0.999
    # Direct model calls have a metric label of their own.
    assert metric(mesh.gateway_http, "loom_requests_total", **counted) == before + 2
    # ... and are timed as the gateway stage, with the version that answered.
    assert metric(mesh.gateway_http, "loom_stage_duration_seconds_count", **timed) == timed_before + 2


def test_unknown_model_is_not_found(g: grpcclient.InferenceServerClient, h: httpclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as grpc_err:
        g.infer("no-such-model", [texts(grpcclient, "text", b"hi")])
    assert grpc_err.value.status() == "StatusCode.NOT_FOUND"
    assert "embed" in grpc_err.value.message() and "minilm" in grpc_err.value.message()
    with pytest.raises(InferenceServerException) as http_err:
        h.get_model_metadata("no-such-model")
    assert http_err.value.status() == "404" and "unknown model" in http_err.value.message()


@pytest.mark.parametrize(
    ("inputs", "needle"),
    [
        (lambda m: [texts(m, "text", b"a", b"b")], "exactly one element"),
        (lambda m: [texts(m, "picture", b"a")], "unknown input"),
        (lambda m: [texts(m, "text", b"\xff\xfe")], "UTF-8"),
    ],
)
def test_malformed_requests_are_invalid_argument(
    g: grpcclient.InferenceServerClient, h: httpclient.InferenceServerClient, inputs: Any, needle: str
) -> None:
    with pytest.raises(InferenceServerException) as grpc_err:
        g.infer("embed", inputs(grpcclient))
    assert grpc_err.value.status() == "StatusCode.INVALID_ARGUMENT" and needle in grpc_err.value.message()
    with pytest.raises(InferenceServerException) as http_err:
        h.infer("embed", inputs(httpclient))
    assert http_err.value.status() == "400" and needle in http_err.value.message()


def post_json(url: str, body: Any) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers=bearer())
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_rest_pure_json_with_a_base64_file(mesh: Mesh) -> None:
    image = {"b64": base64.b64encode(text_image("HELLO WORLD")).decode()}
    status, body = post_json(
        f"{mesh.gateway_http}/v2/models/content/versions/1/infer",
        {"id": "json-1", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [image]}]},
    )
    assert status == 200, body
    assert body["model_name"] == "content" and body["model_version"] == "1" and body["id"] == "json-1"
    outputs = {o["name"]: o for o in body["outputs"]}
    assert "parameters" not in outputs["result"]  # JSON data, not binary: nothing asked for binary
    result = json.loads(outputs["result"]["data"][0])
    assert result["request_id"] == "json-1" and "HELLO" in result["outputs"]["image"]["text"].upper()


def test_errors_are_kserve_shaped(mesh: Mesh, g: grpcclient.InferenceServerClient) -> None:
    status, body = post_json(f"{mesh.gateway_http}/v2/models/embed/infer", {"inputs": 3})
    assert status == 400 and set(body) == {"error"} and "'inputs' list" in body["error"]
    # What Loom does not offer says so, in a shape tritonclient can read.
    with urllib.request.urlopen(
        urllib.request.Request(f"{mesh.gateway_http}/v2", headers=bearer()), timeout=10
    ) as resp:
        assert json.loads(resp.read())["name"] == "loom"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(
            urllib.request.Request(f"{mesh.gateway_http}/v2/models/embed/config", headers=bearer()), timeout=10
        )
    assert (
        err.value.code == 404 and "does not offer GET /v2/models/embed/config" in json.loads(err.value.read())["error"]
    )
    with pytest.raises(InferenceServerException) as grpc_err:
        g.get_model_config("minilm")
    assert grpc_err.value.status() == "StatusCode.UNIMPLEMENTED" and "ModelConfig" in grpc_err.value.message()
