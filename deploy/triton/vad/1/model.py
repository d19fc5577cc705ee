"""Triton python-backend model "vad": Silero VAD (16 kHz "sequence" ONNX export).

Input (per request): ``audio`` float32 ``[n, samples]`` - mono 16 kHz samples in
[-1, 1]; each row is an independent clip (normally ``n = 1``). Output:
``speech_probs`` float32 ``[n, ceil(samples / 512)]`` - one speech probability per
512-sample (32 ms) frame, frame ``i`` covering samples ``[512 i, 512 (i + 1))``; the
last partial frame is zero-padded. Empty audio gives an empty row, not an error.

The ONNX graph (``silero_vad_16k_sequence.onnx``, shipped in the ``silero-vad``
wheel) takes ``input`` ``[frames, 576]``, ``h`` and ``c`` ``[1, 1, 128]`` and
returns ``speech_probs`` ``[frames]``, ``hn``, ``cn``. Its first axis is **time**,
not a batch: the LSTM runs through the frames in order. Row ``i`` of ``input`` is
the last 64 samples of frame ``i - 1`` (zeros for the first frame) followed by the
512 samples of frame ``i``. Long clips are cut into blocks of
``max_frames_per_call`` frames with ``hn``/``cn`` carried from block to block; the
result is bit-identical to the stock streaming model run frame by frame. Because
``h``/``c`` have batch size 1, requests of a dynamic batch (ragged lengths
allowed) are run one after another.

The ``silero_vad`` package itself is never imported (it imports torch): the file is
found with ``importlib.util.find_spec``. A malformed request gets its own
INVALID_ARG error; the other requests are still served.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort  # type: ignore[import-untyped, unused-ignore]
import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found, unused-ignore]

FloatArray = npt.NDArray[np.float32]

PACKAGE = "silero_vad"
ONNX_FILE = os.path.join("data", "silero_vad_16k_sequence.onnx")
INPUT_NAME = "audio"
OUTPUT_NAME = "speech_probs"
FRAME = 512  # samples per frame at 16 kHz (32 ms)
CONTEXT = 64  # samples of the previous frame prepended to each frame
STATE_SHAPE = (1, 1, 128)


class RequestError(ValueError):
    """A problem with one request; reported to that request only."""


def _param(config: dict[str, Any], key: str, default: str) -> str:
    value = config.get("parameters", {}).get(key, {}).get("string_value", default)
    text = str(value).strip() if value is not None else ""
    return text or default


def locate_onnx(config: dict[str, Any], model_dir: str) -> str:
    explicit = _param(config, "model_path", "")
    if explicit:
        path = explicit if os.path.isabs(explicit) else os.path.join(model_dir, explicit)
        if not os.path.isfile(path):
            raise pb_utils.TritonModelException(f"vad: parameter model_path={explicit!r} -> {path} does not exist")
        return path
    spec = importlib.util.find_spec(PACKAGE)
    for location in list(spec.submodule_search_locations or []) if spec is not None else []:
        candidate = os.path.join(location, ONNX_FILE)
        if os.path.isfile(candidate):
            return candidate
    raise pb_utils.TritonModelException(
        f"vad: {PACKAGE}/{ONNX_FILE} not found: set parameter model_path or install silero-vad "
        "(pip install --no-deps silero-vad) into the stub's interpreter"
    )


def frame_rows(audio: FloatArray) -> FloatArray:
    """``[frames, 576]``: each 512-sample frame (last one zero-padded) after the previous frame's last 64 samples."""
    count = -(-audio.size // FRAME)
    frames = np.zeros((count, FRAME), dtype=np.float32)
    frames.reshape(-1)[: audio.size] = audio
    rows = np.zeros((count, CONTEXT + FRAME), dtype=np.float32)
    rows[:, CONTEXT:] = frames
    rows[1:, :CONTEXT] = frames[:-1, -CONTEXT:]
    return rows


def _error(message: str, code: Any = None) -> Any:
    if code is None:
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        started = time.perf_counter()
        self.model_config: dict[str, Any] = json.loads(args["model_config"])
        cfg = self.model_config
        self.onnx_path = locate_onnx(cfg, args["model_repository"])
        try:
            intra = max(int(_param(cfg, "intra_op_threads", "1")), 1)
            self.max_frames = max(int(_param(cfg, "max_frames_per_call", "1024")), 1)
        except ValueError as exc:
            raise pb_utils.TritonModelException(f"vad: bad parameter: {exc}") from exc

        options = ort.SessionOptions()
        options.intra_op_num_threads = intra
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers: list[Any] = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            device_id = int(args.get("model_instance_device_id", "0") or "0")
            providers = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
        self.session = ort.InferenceSession(self.onnx_path, sess_options=options, providers=providers)

        self.probabilities(np.zeros(FRAME * 4, dtype=np.float32))  # warm-up
        self.load_s = time.perf_counter() - started
        pb_utils.Logger.log_info(
            f"vad: loaded {self.onnx_path} in {self.load_s:.2f}s providers={self.session.get_providers()} "
            f"intra_op_threads={intra} max_frames_per_call={self.max_frames}"
        )

    def probabilities(self, audio: FloatArray) -> FloatArray:
        """Speech probability per 512-sample frame of one 16 kHz clip."""
        if audio.size == 0:
            return np.zeros(0, dtype=np.float32)
        rows = frame_rows(audio)
        h = np.zeros(STATE_SHAPE, dtype=np.float32)
        c = np.zeros(STATE_SHAPE, dtype=np.float32)
        parts: list[FloatArray] = []
        for first in range(0, rows.shape[0], self.max_frames):
            probs, h, c = self.session.run(
                ["speech_probs", "hn", "cn"], {"input": rows[first : first + self.max_frames], "h": h, "c": c}
            )
            parts.append(np.asarray(probs, dtype=np.float32).reshape(-1))
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _read(self, request: Any) -> FloatArray:
        tensor = pb_utils.get_input_tensor_by_name(request, INPUT_NAME)
        if tensor is None:
            raise RequestError(f"missing input {INPUT_NAME!r}")
        arr = tensor.as_numpy()
        if arr.ndim != 2:
            raise RequestError(f"input {INPUT_NAME!r} must be [n, samples], got shape {list(arr.shape)}")
        if arr.dtype != np.float32:
            raise RequestError(f"input {INPUT_NAME!r} must be FP32, got {arr.dtype}")
        if arr.size and not np.isfinite(arr).all():
            raise RequestError(f"input {INPUT_NAME!r} contains NaN or infinite samples")
        audio: FloatArray = arr
        return audio

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = []
        for request in requests:
            try:
                audio = self._read(request)
            except RequestError as exc:
                responses.append(_error(f"vad: {exc}", pb_utils.TritonError.INVALID_ARG))
                continue
            except Exception as exc:  # must not fail the batch or the stub
                responses.append(_error(f"vad: bad request: {exc}", pb_utils.TritonError.INVALID_ARG))
                continue
            try:
                frames = -(-audio.shape[1] // FRAME)
                out = np.zeros((audio.shape[0], frames), dtype=np.float32)
                for row in range(audio.shape[0]):
                    out[row] = self.probabilities(np.ascontiguousarray(audio[row]))
            except Exception as exc:  # reported to this request only
                responses.append(_error(f"vad: inference failed: {type(exc).__name__}: {exc}"))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(OUTPUT_NAME, out)]))
        return responses

    def finalize(self) -> None:
        self.session = None
