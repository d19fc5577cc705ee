"""The KServe front door's logic: name lookup, readiness, deadlines, batch rows; the mesh is faked."""

from __future__ import annotations

import json
from typing import Any, cast

import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from services.common.errors import DeadlineExceeded, InvalidArgument, NotFound, Unavailable
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.pipelines import PipelineRegistry
from services.gateway.core import GatewayCore
from services.gateway.kserve_dataplane import KServeDataPlane, server_version
from services.gateway.kserve_wire import InferRequest, KTensor
from services.gateway.settings import GatewaySettings

pytestmark = pytest.mark.unit


class FakeCore:
    """What the data plane uses of GatewayCore: pipelines, settings, model questions and single-model inference."""

    def __init__(self, models: list[dict[str, Any]]) -> None:
        self.pipelines = PipelineRegistry()
        self.settings = GatewaySettings()
        self.models = models
        self.calls: list[tuple[str, dict[str, pb.Tensor], int, str]] = []
        self.timed: list[tuple[str, str, str, str]] = []  # (stage, pipeline label, model, version)

    def observe_stage(self, stage: str, label: str, model: str, version: str, elapsed_ms: float) -> None:
        assert elapsed_ms >= 0
        self.timed.append((stage, label, model, version))

    async def model_query(self, op: str, model: str) -> bytes:
        if op == "list":
            return json.dumps(self.models).encode()
        if op == "ready":
            return bytes(service_pb2.ModelReadyResponse(ready=True).SerializeToString())
        raise AssertionError(op)

    async def infer_model(
        self, model: str, tensors: dict[str, pb.Tensor], *, timeout_ms: int, request_id: str = "", bypass_cache: bool
    ) -> pb.Part:
        self.calls.append((model, tensors, timeout_ms, request_id))
        part = pb.Part(request_id=request_id or f"gen{len(self.calls)}", model=model, model_version="1")
        row = np.frombuffer(tensors["x"].data, np.int64)
        part.tensors["y"].CopyFrom(
            pb.Tensor(datatype="FP32", shape=[1], data=np.array([row.sum()], np.float32).tobytes())
        )
        return part


def plane(models: list[dict[str, Any]] | None = None, *, ready: bool = True) -> tuple[KServeDataPlane, FakeCore]:
    core = FakeCore(
        [{"name": "minilm", "versions": ["1"]}, {"name": "ocr", "versions": []}] if models is None else models
    )
    return KServeDataPlane(cast(GatewayCore, core), lambda: ready), core


def ints(name: str, rows: list[list[int]]) -> KTensor:
    array = np.asarray(rows, np.int64)
    return KTensor(name, "INT64", list(array.shape), array.tobytes())


def test_server_version_comes_from_the_project() -> None:
    assert server_version() not in ("", "unknown")


async def test_names_resolve_pipelines_first_then_models() -> None:
    dp, _ = plane([{"name": "minilm", "versions": ["1"]}, {"name": "embed", "versions": ["1"]}])
    assert (await dp.resolve("embed")).name == "embed"
    with pytest.raises(NotFound, match=r"pipelines: content, embed; models: embed, minilm"):
        await dp.resolve("nope")


async def test_readiness() -> None:
    dp, _ = plane()
    assert await dp.model_ready("embed") and await dp.model_ready("minilm") and await dp.model_ready("minilm", "1")
    assert not await dp.model_ready("content")  # its image input needs ocr, which has no ready version
    assert not await dp.model_ready("embed", "2") and not await dp.model_ready("minilm", "2")
    assert not await dp.model_ready("nope")
    unready, _ = plane(ready=False)
    assert not await unready.model_ready("embed")
    index = await dp.repository_index()
    assert ("content", "1", "UNAVAILABLE", "") in index and ("ocr", "", "UNAVAILABLE", "no ready version") in index


async def test_a_batch_becomes_one_part_per_row() -> None:
    dp, core = plane()
    req = InferRequest("minilm", id="caller-1", inputs=[ints("x", [[1, 2], [3, 4], [5, 6]])])
    res = await dp.infer(req, remaining_s=2.5)
    (out,) = res.outputs
    assert out.shape == [3, 1] and np.frombuffer(out.data, np.float32).tolist() == [3, 7, 11]
    assert [list(t["x"].shape) for _, t, _, _ in core.calls] == [[2]] * 3
    assert {c[2] for c in core.calls} == {2500} and {c[3] for c in core.calls} == {""}  # 3 rows: Loom's own ids
    assert res.id == "caller-1"
    assert core.timed == [("gateway", "model:minilm", "minilm", "1")]  # one call, one sample

    core.calls.clear()
    await dp.infer(InferRequest("minilm", id="caller-1", inputs=[ints("x", [[1, 2]])]))
    assert core.calls[0][3] == "caller-1" and core.calls[0][2] == core.settings.default_timeout_ms


async def test_an_unbatched_model_gets_its_tensors_as_sent() -> None:
    dp, core = plane([{"name": "vad", "versions": ["1"], "max_batch_size": 0}])
    await dp.infer(InferRequest("vad", inputs=[ints("x", [[1, 2], [3, 4]])]))
    assert list(core.calls[0][1]["x"].shape) == [2, 2]


async def test_infer_refusals() -> None:
    dp, core = plane()
    one = [ints("x", [[1]])]
    with pytest.raises(NotFound, match="no ready version '3'"):
        await dp.infer(InferRequest("minilm", version="3", inputs=one))
    with pytest.raises(InvalidArgument, match="at most"):
        await dp.infer(InferRequest("minilm", inputs=one, parameters={"timeout_ms": 10**7}))
    with pytest.raises(InvalidArgument, match="at most 64"):
        await dp.infer(InferRequest("minilm", inputs=[ints("x", [[1]] * 65)]))
    with pytest.raises(DeadlineExceeded):
        await dp.infer(InferRequest("minilm", inputs=one), remaining_s=0.0)
    # Refused calls of a known model are timed too, with no model or version (none answered).
    assert core.timed == [("gateway", "model:minilm", "", "")] * 4
    unready, _ = plane(ready=False)
    with pytest.raises(Unavailable, match="not ready"):
        await unready.infer(InferRequest("embed"))
