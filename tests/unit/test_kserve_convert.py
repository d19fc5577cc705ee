"""KServe v2 conversions (kserve_wire, kserve_rest, kserve_convert): gRPC, REST + binary extension, Loom; both ways.

Requests are built, and responses read, by tritonclient's own helpers, so
these tests pin compatibility with an unmodified client, not our reading of it.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2
from tritonclient.grpc._utils import _get_inference_request as grpc_request
from tritonclient.http._utils import _get_inference_request as http_request

from services.common.errors import Internal, InvalidArgument, LoomError, NotFound
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.pb.loom.v1 import gateway_pb2
from services.common.pipelines import PipelineRegistry
from services.gateway import kserve_convert as kc
from services.gateway import kserve_rest as kr
from services.gateway import kserve_wire as kw

pytestmark = pytest.mark.unit

PIPELINES = PipelineRegistry()
NUMERIC = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"]


def sample(datatype: str) -> np.ndarray:
    if datatype == "BOOL":
        return np.array([[True, False, True], [False, False, True]])
    return (np.arange(6).reshape(2, 3) * 3).astype(kw.NUMPY[datatype])


def grpc_msg(model: str, arrays: dict[str, np.ndarray], *, outputs: tuple[str, ...] = (), **params: Any) -> Any:
    inputs = []
    for name, array in arrays.items():
        dt = "BYTES" if array.dtype == np.object_ else grpcclient.np_to_triton_dtype(array.dtype)
        inp = grpcclient.InferInput(name, list(array.shape), dt)
        inp.set_data_from_numpy(array)
        inputs.append(inp)
    wanted = [grpcclient.InferRequestedOutput(o) for o in outputs] or None
    return grpc_request(model, inputs, "", "req-1", wanted, 0, False, False, 0, None, params or None)


def http_body(
    arrays: dict[str, np.ndarray], *, binary: bool = True, outputs: dict[str, bool] | None = None, **params: Any
) -> tuple[bytes, int | None]:
    inputs = []
    for name, array in arrays.items():
        dt = "BYTES" if array.dtype == np.object_ else httpclient.np_to_triton_dtype(array.dtype)
        inp = httpclient.InferInput(name, list(array.shape), dt)
        inp.set_data_from_numpy(array, binary_data=binary)
        inputs.append(inp)
    wanted = [httpclient.InferRequestedOutput(n, binary_data=b) for n, b in (outputs or {}).items()] or None
    body, size = http_request(inputs, "req-1", wanted, 0, False, False, 0, None, params or None)
    return body, size


def rest(model: str, body: bytes, size: int | None) -> kw.InferRequest:
    return kr.request_from_rest(model, "", body, None if size is None else str(size))


# ------------------------------------------------------------------- tensors
def test_bytes_pack_roundtrip_and_truncation() -> None:
    items = [b"", b"hello", "h\u00e9".encode(), bytes(range(256))]
    assert kw.unpack_bytes(kw.pack_bytes(items)) == items
    with pytest.raises(InvalidArgument, match="length prefix"):
        kw.unpack_bytes(b"\x05\x00")
    with pytest.raises(InvalidArgument, match="past the end"):
        kw.unpack_bytes(b"\x05\x00\x00\x00abc")


@pytest.mark.parametrize("datatype", NUMERIC)
def test_from_values_and_back(datatype: str) -> None:
    array = sample(datatype)
    tensor = kw.KTensor.from_values("x", datatype, [2, 3], array.tolist()).check()
    assert tensor.data == array.astype(kw.NUMPY[datatype]).tobytes()
    assert tensor.values() == array.ravel().tolist()


@pytest.mark.parametrize(
    ("datatype", "values", "needle"),
    [
        ("UINT8", [300], "out of range"),
        ("INT8", [-129], "out of range"),
        ("INT32", [1.5], "does not fit"),
        ("INT64", [True], "does not fit"),
        ("BOOL", [1], "does not fit"),
        ("FP32", ["1.0"], "does not fit"),
        ("BF16", [1.0], "cannot be given as JSON"),
    ],
)
def test_from_values_rejects(datatype: str, values: list[Any], needle: str) -> None:
    with pytest.raises(InvalidArgument, match=needle):
        kw.KTensor.from_values("x", datatype, [1], values)


@pytest.mark.parametrize(
    ("tensor", "needle"),
    [
        (kw.KTensor("x", "FP32", [2], b"\x00" * 4), "needs 8 bytes"),
        (kw.KTensor("x", "BYTES", [2], kw.pack_bytes([b"a"])), "needs 2 elements"),
        (kw.KTensor("x", "FP32", [-1], b""), "negative"),
        (kw.KTensor("x", "FP8", [1], b"\x00"), "unknown datatype"),
    ],
)
def test_check_rejects(tensor: kw.KTensor, needle: str) -> None:
    with pytest.raises(InvalidArgument, match=needle):
        tensor.check()


# ---------------------------------------------------------------------- gRPC
@pytest.mark.parametrize("datatype", NUMERIC)
def test_grpc_raw_inputs(datatype: str) -> None:
    array = sample(datatype)
    req = kw.request_from_grpc(grpc_msg("m", {"x": array}))
    (tensor,) = req.inputs
    assert (tensor.name, tensor.datatype, tensor.shape) == ("x", datatype, [2, 3])
    assert tensor.data == array.tobytes()
    assert req.model == "m" and req.id == "req-1"


@pytest.mark.parametrize("datatype", [d for d in NUMERIC if d != "FP16"])
def test_grpc_typed_contents(datatype: str) -> None:
    array = sample(datatype)
    msg = service_pb2.ModelInferRequest(model_name="m")
    inp = msg.inputs.add(name="x", datatype=datatype, shape=[2, 3])
    getattr(inp.contents, kw.CONTENTS[datatype]).extend(array.ravel().tolist())
    assert kw.request_from_grpc(msg).inputs[0].data == array.astype(kw.NUMPY[datatype]).tobytes()


def test_grpc_bytes_contents_parameters_and_outputs() -> None:
    msg = service_pb2.ModelInferRequest(model_name="embed", id="a")
    inp = msg.inputs.add(name="text", datatype="BYTES", shape=[1])
    inp.contents.bytes_contents.append(b"hello")
    inp.parameters["content_type"].string_param = "text/plain"
    msg.parameters["timeout_ms"].int64_param = 1500
    msg.parameters["bypass_cache"].bool_param = True
    msg.outputs.add(name="embedding")
    req = kw.request_from_grpc(msg)
    assert req.inputs[0].data == kw.pack_bytes([b"hello"])
    assert req.inputs[0].parameters == {"content_type": "text/plain"}
    assert req.parameters == {"timeout_ms": 1500, "bypass_cache": True}
    assert req.outputs == ["embedding"]


def test_grpc_rejects_malformed() -> None:
    msg = grpc_msg("m", {"x": sample("FP32"), "y": sample("INT32")})
    del msg.raw_input_contents[1]
    with pytest.raises(InvalidArgument, match="raw_input_contents holds 1"):
        kw.request_from_grpc(msg)
    msg = service_pb2.ModelInferRequest(model_name="m")
    msg.inputs.add(name="x", datatype="FP16", shape=[1])
    with pytest.raises(InvalidArgument, match="raw_input_contents"):
        kw.request_from_grpc(msg)
    msg = grpc_msg("m", {"x": sample("FP32")})
    msg.raw_input_contents[0] = b"\x00" * 3
    with pytest.raises(InvalidArgument, match="needs 24 bytes"):
        kw.request_from_grpc(msg)
    msg = grpc_msg("m", {"x": sample("FP32")})
    msg.outputs.add(name="y").parameters["classification"].int64_param = 2
    with pytest.raises(InvalidArgument, match="classification"):
        kw.request_from_grpc(msg)


def test_grpc_response_reads_back_in_tritonclient() -> None:
    texts = np.array([b"a", "\u00e9t\u00e9".encode()], dtype=np.object_)
    outputs = [
        kw.KTensor("e", "FP32", [1, 3], np.array([[0.5, 1.0, 2.0]], np.float32).tobytes()),
        kw.KTensor("t", "BYTES", [2], kw.pack_bytes(list(texts))),
    ]
    resp = kw.to_grpc_response(kw.InferResult("m", "1", "id-1", outputs, {"trace_id": "abc"}))
    result = grpcclient.InferResult(resp)
    np.testing.assert_array_equal(result.as_numpy("e"), [[0.5, 1.0, 2.0]])
    assert list(result.as_numpy("t")) == list(texts)
    assert resp.parameters["trace_id"].string_param == "abc" and resp.id == "id-1"


# ---------------------------------------------------------------------- REST
@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("datatype", [*NUMERIC, "BYTES"])
def test_rest_inputs_json_and_binary(datatype: str, binary: bool) -> None:
    array = np.array([["a", "bc", ""]], dtype=np.object_) if datatype == "BYTES" else sample(datatype)
    body, size = http_body({"x": array}, binary=binary)
    assert (size is not None) == binary
    (tensor,) = rest("m", body, size).inputs
    expected = kw.pack_bytes([s.encode() for s in array.ravel()]) if datatype == "BYTES" else array.tobytes()
    assert tensor.data == expected and tensor.shape == list(array.shape) and tensor.datatype == datatype


def test_rest_mixed_binary_inputs_keep_their_order() -> None:
    body, size = http_body({"a": sample("INT64"), "b": np.array([b"\xff\x00"], dtype=np.object_)})
    a, b = rest("m", body, size).inputs
    assert a.data == sample("INT64").tobytes() and b.data == kw.pack_bytes([b"\xff\x00"])


def test_rest_parameters_outputs_and_b64() -> None:
    header = {
        "id": "r1",
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [{"b64": "iVBORw=="}]}],
        "outputs": [{"name": "result", "parameters": {"binary_data": True}}, {"name": "topics"}],
        "parameters": {"timeout_ms": 900, "binary_data_output": False},
    }
    req = rest("content", json.dumps(header).encode(), None)
    assert req.inputs[0].data == kw.pack_bytes([b"\x89PNG"])
    assert req.outputs == ["result", "topics"] and req.binary_outputs == {"result": True}
    assert req.binary_default is False and req.parameters["timeout_ms"] == 900 and req.id == "r1"


SIZED = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"parameters":{"binary_data_size":8}}]}'


@pytest.mark.parametrize(
    ("body", "length", "needle"),
    [
        (b"{not json", None, "not valid JSON"),
        (b"[]", None, "'inputs' list"),
        (b'{"inputs": [{"name": "x"}]}', None, "'datatype'"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": "1"}]}', None, "'shape'"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}', None, "neither 'data'"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1]}]}', None, "needs 8 bytes"),
        (b'{"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": [1]}]}', None, "BYTES elements"),
        (b'{"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": [{"b64": "*"}]}]}', None, "base64"),
        (b'{"inputs": [], "outputs": [{"name": "y", "parameters": {"classification": 3}}]}', None, "binary_data"),
        (b'{"inputs": [], "parameters": []}', None, "'parameters'"),
        (b'{"inputs": [], "id": 5}', None, "'id'"),
        (b'{"inputs": []}', "x", "must be an integer"),
        (b'{"inputs": []}', "99", "does not fit"),
        (b'{"inputs": []}xyz', "14", "3 bytes of binary data"),
        (SIZED + b"abcd", str(len(SIZED)), "binary_data_size 8"),
    ],
)
def test_rest_rejects_malformed(body: bytes, length: str | None, needle: str) -> None:
    with pytest.raises(InvalidArgument, match=needle):
        kr.request_from_rest("m", "", body, length)


def test_rest_response_json_and_binary_read_back_in_tritonclient() -> None:
    emb = np.array([[0.25, -1.0]], np.float32)
    outputs = [
        kw.KTensor("result", "BYTES", [1], kw.pack_bytes([b'{"a": 1}'])),
        kw.KTensor("embedding", "FP32", [1, 2], emb.tobytes()),
        kw.KTensor("raw", "BYTES", [1], kw.pack_bytes([b"\xff"])),  # not UTF-8: must go binary
    ]
    res = kw.InferResult("embed", "1", "r1", outputs, {"trace_id": "t"})
    for req, binaries in [
        (kw.InferRequest("embed"), {"raw"}),
        (kw.InferRequest("embed", binary_default=True), {"result", "embedding", "raw"}),
        (kw.InferRequest("embed", binary_outputs={"embedding": True}), {"embedding", "raw"}),
    ]:
        body, size = kr.to_rest_response(req, res)
        result = httpclient.InferResult.from_response_body(body, header_length=size)
        header = json.loads(body[:size] if size else body)
        assert {o["name"] for o in header["outputs"] if "parameters" in o} == binaries
        np.testing.assert_array_equal(result.as_numpy("embedding"), emb)
        assert result.as_numpy("result")[0] in (b'{"a": 1}', '{"a": 1}')
        assert result.as_numpy("raw")[0] == b"\xff"
        assert result.get_response()["parameters"] == {"trace_id": "t"} and header["id"] == "r1"


def test_metadata_to_json() -> None:
    meta = kc.pipeline_metadata(PIPELINES.get("embed"))
    assert kr.metadata_to_json(meta) == {
        "name": "embed",
        "versions": ["1"],
        "platform": "loom_pipeline",
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [
            {"name": "result", "datatype": "BYTES", "shape": [1]},
            {"name": "embedding", "datatype": "FP32", "shape": [1, -1]},
            {"name": "topics", "datatype": "BYTES", "shape": [-1]},
            {"name": "topic_scores", "datatype": "FP32", "shape": [-1]},
        ],
    }


# ---------------------------------------------------------------- Loom side
def bytes_input(name: str, *items: bytes) -> kw.KTensor:
    return kw.KTensor(name, "BYTES", [len(items)], kw.pack_bytes(list(items)))


def test_options() -> None:
    assert kc.options(kw.InferRequest("m", id="ok_id-1", parameters={"timeout_ms": 50})) == kc.Options(
        50, False, "ok_id-1"
    )
    assert kc.options(kw.InferRequest("m", parameters={"timeout": 2_000_500})).timeout_ms == 2001
    # An id Loom cannot use is not used (Loom makes one); the caller still gets theirs back.
    assert kc.options(kw.InferRequest("m", id="has spaces/and.dots")).request_id == ""
    for params in ({"timeout_ms": "5"}, {"timeout_ms": -1}, {"timeout": True}, {"bypass_cache": 1}):
        with pytest.raises(InvalidArgument):
            kc.options(kw.InferRequest("m", parameters=params))


def test_call_from_request_for_a_pipeline() -> None:
    req = kw.InferRequest(
        "content",
        id="r-1",
        inputs=[bytes_input("text", "h\u00e9llo".encode()), bytes_input("image", b"\x89PNG")],
        parameters={"timeout_ms": 800, "bypass_cache": True},
    )
    req.inputs[1].parameters["content_type"] = "image/png"
    call = kc.call_from_request(PIPELINES.get("content"), req, remaining_s=2.0)
    assert call.pipeline == "content" and call.inputs == {"text": "h\u00e9llo", "image": b"\x89PNG"}
    assert (call.timeout_ms, call.bypass_cache, call.request_id) == (800, True, "r-1")
    assert call.content_types == {"image": "image/png"} and call.transport_remaining_s == 2.0


@pytest.mark.parametrize(
    ("req", "error", "needle"),
    [
        (kw.InferRequest("embed", inputs=[bytes_input("text", b"a", b"b")]), InvalidArgument, "exactly one"),
        (kw.InferRequest("embed", inputs=[bytes_input("text", b"\xff")]), InvalidArgument, "UTF-8"),
        (kw.InferRequest("embed", inputs=[bytes_input("image", b"x")]), InvalidArgument, "unknown input"),
        (kw.InferRequest("embed", inputs=[bytes_input("text", b"a")] * 2), InvalidArgument, "twice"),
        (kw.InferRequest("embed", inputs=[kw.KTensor("text", "INT32", [1], b"\0" * 4)]), InvalidArgument, "BYTES"),
        (kw.InferRequest("embed", outputs=["nope"]), InvalidArgument, "unknown output"),
        (kw.InferRequest("embed", version="2"), NotFound, "version"),
    ],
)
def test_call_from_request_rejects(req: kw.InferRequest, error: type[LoomError], needle: str) -> None:
    with pytest.raises(error, match=needle):
        kc.call_from_request(PIPELINES.get("embed"), req)


def predict_response() -> gateway_pb2.PredictResponse:
    resp = gateway_pb2.PredictResponse(request_id="rid", trace_id="t" * 32, pipeline="content")
    text = resp.outputs["text"].text
    text.model, text.model_version = "minilm", "1"
    text.embedding.extend([0.6, 0.8])
    text.labels.add(label="finance", score=0.9)
    resp.outputs["image"].image.topics.add(label="sport", score=0.5)
    resp.topics.add(label="finance", score=0.7)
    resp.topics.add(label="sport", score=0.2)
    return resp


def test_pipeline_result_all_outputs() -> None:
    res = kc.pipeline_result(kw.InferRequest("content", id="caller id"), predict_response())
    by_name = {o.name: o for o in res.outputs}
    assert list(by_name) == ["result", "embedding", "topics", "topic_scores"]
    body = json.loads(kw.unpack_bytes(by_name["result"].data)[0])
    assert body["request_id"] == "rid" and body["outputs"]["text"]["embedding"] == pytest.approx([0.6, 0.8])
    assert by_name["embedding"].shape == [1, 2]
    np.testing.assert_allclose(np.frombuffer(by_name["embedding"].data, np.float32), [0.6, 0.8], rtol=1e-6)
    assert kw.unpack_bytes(by_name["topics"].data) == [b"finance", b"sport"]
    np.testing.assert_allclose(np.frombuffer(by_name["topic_scores"].data, np.float32), [0.7, 0.2], rtol=1e-6)
    assert (res.model, res.version, res.id) == ("content", "1", "caller id")
    assert res.parameters == {"request_id": "rid", "trace_id": "t" * 32}


def test_pipeline_result_requested_outputs_and_fallbacks() -> None:
    resp = predict_response()
    del resp.topics[:]  # no fused topics: the first output with labels stands in
    res = kc.pipeline_result(kw.InferRequest("content", outputs=["topics", "result"]), resp)
    assert [o.name for o in res.outputs] == ["topics", "result"] and res.id == "rid"
    assert kw.unpack_bytes(res.outputs[0].data) == [b"sport"]  # "image" sorts before "text"
    del resp.outputs["text"]
    res = kc.pipeline_result(kw.InferRequest("content", outputs=["embedding", "result"]), resp)
    assert [o.name for o in res.outputs] == ["result"]  # no text, no embedding; `result` says why


def test_model_rows_split_and_stack_back() -> None:
    ids = np.array([[101, 7, 102], [101, 8, 102]], np.int64)
    words = np.array([[b"a"], [b"bc"]], dtype=np.object_)
    req = kw.request_from_grpc(grpc_msg("minilm", {"input_ids": ids, "w": words}))
    rows = kc.model_rows(req, batched=True)
    assert len(rows) == 2 and list(rows[1]["input_ids"].shape) == [3]
    assert np.frombuffer(rows[1]["input_ids"].data, np.int64).tolist() == [101, 8, 102]
    assert rows[1]["w"].data == kw.pack_bytes([b"bc"]) and rows[1]["w"].datatype == "BYTES"
    (whole,) = kc.model_rows(req, batched=False)
    assert list(whole["input_ids"].shape) == [2, 3]

    answers = []
    for i in range(2):
        part = pb.Part(request_id=f"r{i}", model="minilm", model_version="1")
        part.tensors["embedding"].CopyFrom(
            pb.Tensor(datatype="FP32", shape=[2], data=np.full(2, i, np.float32).tobytes())
        )
        answers.append(part)
    res = kc.model_result(req, answers, batched=True, request_id="r0")
    (out,) = res.outputs
    assert out.shape == [2, 2] and np.frombuffer(out.data, np.float32).tolist() == [0, 0, 1, 1]
    assert (res.model, res.version, res.id, res.parameters) == ("minilm", "1", "req-1", {"request_id": "r0"})
    answers[1].tensors["embedding"].shape[:] = [1, 2]
    with pytest.raises(Internal, match="disagree"):
        kc.model_result(req, answers, batched=True, request_id="r0")
    with pytest.raises(InvalidArgument, match="no output"):
        kc.model_result(kw.InferRequest("minilm", outputs=["nope"]), answers, batched=True, request_id="r0")


def test_model_rows_rejects() -> None:
    with pytest.raises(InvalidArgument, match="no inputs"):
        kc.model_rows(kw.InferRequest("minilm"), batched=True)
    ragged = kw.InferRequest(
        "minilm",
        inputs=[kw.KTensor("a", "INT64", [1, 2], b"\0" * 16), kw.KTensor("b", "INT64", [2, 1], b"\0" * 16)],
    )
    with pytest.raises(InvalidArgument, match="same batch size"):
        kc.model_rows(ragged, batched=True)


def test_models_from_list() -> None:
    models = kc.models_from_list(
        b'[{"name": "minilm", "versions": ["1"]}, {"name": "vad", "versions": [], "max_batch_size": 0}]'
    )
    assert models["minilm"] == kc.ModelEntry("minilm", ("1",)) and models["minilm"].batched
    assert not models["vad"].batched and models["vad"].versions == ()
    with pytest.raises(Internal):
        kc.models_from_list(b'{"minilm": 1}')


def test_pipeline_metadata_follows_the_inputs() -> None:
    meta = kc.pipeline_metadata(PIPELINES.get("content"))
    assert [i.name for i in meta.inputs] == ["text", "image", "audio"]
    assert all(i.datatype == "BYTES" and list(i.shape) == [-1] for i in meta.inputs)
    assert [o.name for o in meta.outputs] == ["result", "embedding", "topics", "topic_scores"]
