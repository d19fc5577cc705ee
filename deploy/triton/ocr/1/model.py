"""Triton python-backend model "ocr": RapidOCR PP-OCRv4 text detection + recognition.

Input (per request): ``image`` uint8 ``[1, H, W, 3]`` in **BGR** order (as OpenCV
decodes), one image per request. Outputs, one row per recognised line, sorted top
to bottom then left to right:

* ``text``  BYTES/STRING ``[1, L]`` - the line, UTF-8;
* ``score`` FP32 ``[1, L]``          - recognition confidence (lines below
  ``min_score`` are dropped);
* ``box``   FP32 ``[1, L, 4, 2]``    - corners (x, y) in the input image's pixels,
  clockwise from top-left.

No text gives ``L = 0`` (empty tensors, not an error). A malformed request (wrong
rank, channel count, dtype, empty or oversized image, more than one image, an
aspect ratio so extreme that rapidocr's resizing makes a side 0 px) gets its own
INVALID_ARG error; the other requests of the batch are still served.

Requests of one dynamic batch may have different image sizes
(``allow_ragged_batch``); each is run on its own.

The ONNX files are those shipped inside the ``rapidocr_onnxruntime`` package
(``models/ch_PP-OCRv4_det_infer.onnx``, ``..._rec_infer.onnx`` and
``ch_ppocr_mobile_v2.0_cls_infer.onnx``), found with ``importlib.util.find_spec``.
Nothing is downloaded.

Detector input size: rapidocr 1.4.4 ignores ``det_limit_side_len`` when
``det_limit_type="max"`` (it picks 960/1500/2000 from the image size, so a 1800 px
photo is detected at full size, ~1.5 s on 2 cores). This model makes the limit
effective: the detector sees the image scaled down so that its longer side is at
most ``det_limit_side_len`` (never scaled up). Boxes are mapped back to the
input's pixels either way.
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

PACKAGE = "rapidocr_onnxruntime"
MODEL_FILES = {
    "det": "ch_PP-OCRv4_det_infer.onnx",
    "rec": "ch_PP-OCRv4_rec_infer.onnx",
    "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
}
INPUT_NAME = "image"
MAX_SIDE = 8192  # pixels; a larger image is rejected (rapidocr shrinks anything over 2000 px anyway)
TRUE_WORDS = ("1", "true", "yes", "on")


class RequestError(ValueError):
    """A problem with one request; reported to that request only."""


def _param(config: dict[str, Any], key: str, default: str) -> str:
    value = config.get("parameters", {}).get(key, {}).get("string_value", default)
    text = str(value).strip() if value is not None else ""
    return text or default


def locate_models() -> dict[str, str]:
    """Paths of the det/rec/cls ONNX files inside the installed rapidocr_onnxruntime."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        paths = {key: os.path.join(location, "models", name) for key, name in MODEL_FILES.items()}
        if all(os.path.isfile(path) for path in paths.values()):
            return paths
    raise pb_utils.TritonModelException(
        f"ocr: the ONNX files {sorted(MODEL_FILES.values())} were not found: install "
        "rapidocr-onnxruntime==1.4.4 (it ships them in rapidocr_onnxruntime/models/) into the stub's interpreter"
    )


def read_image(request: Any) -> npt.NDArray[np.uint8]:
    """The request's single BGR image as a contiguous ``[H, W, 3]`` uint8 array."""
    tensor = pb_utils.get_input_tensor_by_name(request, INPUT_NAME)
    if tensor is None:
        raise RequestError(f"missing input {INPUT_NAME!r}")
    arr = tensor.as_numpy()
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise RequestError(f"input {INPUT_NAME!r} must be [1, H, W, 3] (BGR), got shape {list(arr.shape)}")
    if arr.shape[0] != 1:
        raise RequestError(f"send one image per request (batch dim 1), got {arr.shape[0]}")
    if arr.dtype != np.uint8:
        raise RequestError(f"input {INPUT_NAME!r} must be UINT8, got {arr.dtype}")
    height, width = int(arr.shape[1]), int(arr.shape[2])
    if height < 1 or width < 1:
        raise RequestError(f"empty image: {height}x{width}")
    if max(height, width) > MAX_SIDE:
        raise RequestError(f"image {width}x{height} is larger than {MAX_SIDE} px on a side")
    image: npt.NDArray[np.uint8] = np.ascontiguousarray(arr[0])
    return image


def _error(message: str, code: Any = None) -> Any:
    if code is None:
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        started = time.perf_counter()
        self.model_config: dict[str, Any] = json.loads(args["model_config"])
        cfg = self.model_config
        try:
            self.intra = max(int(_param(cfg, "intra_op_threads", "2")), 1)
            self.det_limit = int(_param(cfg, "det_limit_side_len", "960"))
            self.min_score = float(_param(cfg, "min_score", "0.5"))
        except ValueError as exc:
            raise pb_utils.TritonModelException(f"ocr: bad parameter: {exc}") from exc
        if self.det_limit < 32:
            raise pb_utils.TritonModelException(f"ocr: det_limit_side_len must be >= 32, not {self.det_limit}")
        self.use_cls = _param(cfg, "use_cls", "false").lower() in TRUE_WORDS
        self.paths = locate_models()

        # Imported here, after the files were found: the package downloads nothing.
        from rapidocr_onnxruntime import RapidOCR  # type: ignore[import-untyped, unused-ignore]
        from rapidocr_onnxruntime.ch_ppocr_det.utils import (  # type: ignore[import-untyped, unused-ignore]
            DetPreProcess,
        )

        self.engine = RapidOCR(
            det_model_path=self.paths["det"],
            rec_model_path=self.paths["rec"],
            cls_model_path=self.paths["cls"],
            det_limit_type="max",
            det_limit_side_len=self.det_limit,
            use_cls=self.use_cls,
            text_score=self.min_score,
            intra_op_num_threads=self.intra,
            inter_op_num_threads=1,
            print_verbose=False,
        )
        det = self.engine.text_det
        limit = self.det_limit
        # rapidocr 1.4.4 replaces the limit by 960/1500/2000 in "max" mode; make it mean what it says.
        det.get_preprocess = lambda _max_wh: DetPreProcess(limit, "max", det.mean, det.std)

        self.providers = self._maybe_use_gpu(args)
        self._warm_up()
        self.load_s = time.perf_counter() - started
        pb_utils.Logger.log_info(
            f"ocr: loaded PP-OCRv4 from {os.path.dirname(self.paths['det'])} in {self.load_s:.2f}s "
            f"providers={self.providers} intra_op_threads={self.intra} det_limit_side_len={self.det_limit} "
            f"use_cls={self.use_cls} min_score={self.min_score}"
        )

    def _maybe_use_gpu(self, args: dict[str, str]) -> list[str]:
        """On a KIND_GPU instance with CUDAExecutionProvider available, move the three sessions to its device."""
        sessions = {
            "det": self.engine.text_det.infer,
            "rec": self.engine.text_rec.session,
            "cls": self.engine.text_cls.infer,
        }
        if args.get("model_instance_kind") != "GPU":
            return list(sessions["det"].session.get_providers())
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            pb_utils.Logger.log_warn("ocr: KIND_GPU instance but onnxruntime has no CUDAExecutionProvider; using CPU")
            return list(sessions["det"].session.get_providers())
        device_id = int(args.get("model_instance_device_id", "0") or "0")
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers: list[Any] = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
        for key, wrapper in sessions.items():
            wrapper.session = ort.InferenceSession(self.paths[key], sess_options=options, providers=providers)
        return list(sessions["det"].session.get_providers())

    def _warm_up(self) -> None:
        """One detector pass and one recogniser pass, so the first request pays no allocations."""
        blank = np.full((64, 256, 3), 255, dtype=np.uint8)
        self.engine(blank)
        self.engine.text_rec([blank[:48]])
        if self.use_cls:
            self.engine.text_cls([blank[:48]])

    def recognise(self, image: npt.NDArray[np.uint8]) -> tuple[list[bytes], list[float], npt.NDArray[np.float32]]:
        result, _elapsed = self.engine(image)
        if not result:
            return [], [], np.zeros((0, 4, 2), dtype=np.float32)
        texts = [str(line[1]).encode("utf-8") for line in result]
        scores = [float(line[2]) for line in result]
        boxes = np.asarray([line[0] for line in result], dtype=np.float32).reshape(len(result), 4, 2)
        return texts, scores, boxes

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = []
        for request in requests:
            try:
                image = read_image(request)
            except RequestError as exc:
                responses.append(_error(f"ocr: {exc}", pb_utils.TritonError.INVALID_ARG))
                continue
            except Exception as exc:  # must not fail the batch or the stub
                responses.append(_error(f"ocr: bad request: {exc}", pb_utils.TritonError.INVALID_ARG))
                continue
            try:
                texts, scores, boxes = self.recognise(image)
            except Exception as exc:  # reported to this request only
                if type(exc).__name__ == "ResizeImgError":  # rapidocr scaled a side to 0 px
                    height, width = image.shape[:2]
                    message = f"ocr: image {width}x{height} is too thin to process (extreme aspect ratio)"
                    responses.append(_error(message, pb_utils.TritonError.INVALID_ARG))
                    continue
                responses.append(_error(f"ocr: inference failed: {type(exc).__name__}: {exc}"))
                continue
            text_arr = np.empty((1, len(texts)), dtype=np.object_)
            for i, text in enumerate(texts):
                text_arr[0, i] = text
            outputs = [
                pb_utils.Tensor("text", text_arr),
                pb_utils.Tensor("score", np.asarray(scores, dtype=np.float32).reshape(1, len(scores))),
                pb_utils.Tensor("box", np.ascontiguousarray(boxes[np.newaxis])),
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses

    def finalize(self) -> None:
        self.engine = None
