"""The real tritonserver serving deploy/triton/ocr (RapidOCR) and deploy/triton/vad (Silero VAD).

One TritonServer for the module on free ports serves the whole repository
(minilm, ocr, vad); an unmodified tritonclient.grpc client calls it. Inputs are made
offline by tests/media.py: text drawn with Pillow, speech from espeak-ng.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from services.common.launch.procs import free_port
from services.common.triton_server import TritonServer
from tests import media

pytestmark = pytest.mark.integration

# Real parts only: a missing package is a failed install, never a skip.
import onnxruntime as ort  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

REPO = Path(__file__).resolve().parents[2] / "deploy" / "triton"
PHRASE = "LOOM SERVES MODELS"
SENTENCE = "Loom serves models on Triton and detects the voice in this sentence"
RATE = 16000
FRAME = 512
TOLERANCE_S = 0.1


# ---------------------------------------------------------------------- helpers
def _ocr(client: grpcclient.InferenceServerClient, image: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(lines, scores [L], boxes [L, 4, 2]) for one BGR [H, W, C] uint8 image."""
    batch = image[np.newaxis]
    tensor = grpcclient.InferInput("image", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch)
    result = client.infer("ocr", [tensor])
    text, score, box = (result.as_numpy(name) for name in ("text", "score", "box"))
    assert text is not None and score is not None and box is not None
    assert text.shape[0] == score.shape[0] == box.shape[0] == 1
    assert text.shape[1] == score.shape[1] == box.shape[1]
    assert score.dtype == np.float32 and box.dtype == np.float32
    return [t.decode("utf-8") for t in text[0]], score[0], box[0]


def _vad(client: grpcclient.InferenceServerClient, samples: np.ndarray) -> np.ndarray:
    batch = np.ascontiguousarray(samples, dtype=np.float32)[np.newaxis]
    tensor = grpcclient.InferInput("audio", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    probs = client.infer("vad", [tensor]).as_numpy("speech_probs")
    assert probs is not None and probs.dtype == np.float32 and probs.shape[0] == 1
    return np.asarray(probs[0])


def _frames(samples: int) -> int:
    return -(-samples // FRAME)


def _stock_silero(samples: np.ndarray) -> np.ndarray:
    """Reference: the stock streaming export (silero_vad.onnx) run frame by frame, as silero's OnnxWrapper does."""
    spec = importlib.util.find_spec("silero_vad")
    assert spec is not None and spec.submodule_search_locations
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    padded = np.zeros(_frames(samples.size) * FRAME, dtype=np.float32)
    padded[: samples.size] = samples
    state = np.zeros((2, 1, 128), dtype=np.float32)
    context = np.zeros((1, 64), dtype=np.float32)
    sr = np.array(RATE, dtype=np.int64)
    probs = []
    for start in range(0, padded.size, FRAME):
        chunk = np.concatenate((context, padded[np.newaxis, start : start + FRAME]), axis=1)
        out, state = session.run(None, {"input": chunk, "state": state, "sr": sr})
        probs.append(float(out[0, 0]))
        context = chunk[:, -64:]
    return np.asarray(probs, dtype=np.float32)


def _executions(client: grpcclient.InferenceServerClient, model: str, at_least: int = 0) -> tuple[int, int]:
    """(inference_count, execution_count); waits up to 5 s for the count to reach ``at_least``.

    Triton updates the statistics just after it sends the responses, so a read
    right after the last reply can miss the last requests of a burst.
    """
    deadline = time.monotonic() + 5.0
    while True:
        stats = client.get_inference_statistics(model).model_stats[0]
        if int(stats.inference_count) >= at_least or time.monotonic() > deadline:
            return int(stats.inference_count), int(stats.execution_count)
        time.sleep(0.02)


# --------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def server() -> Iterator[TritonServer]:
    srv = TritonServer(REPO, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
    srv.start()
    try:
        srv.wait_ready(timeout=120)
        yield srv
    finally:
        srv.close()


@pytest.fixture(scope="module")
def client(server: TritonServer) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(server.grpc_url)


@pytest.fixture(scope="module")
def speech() -> tuple[np.ndarray, float, float]:
    wav, start_s, end_s = media.speech_wav(SENTENCE, lead_silence_s=1.0, tail_silence_s=1.0, rate=RATE)
    samples, rate = media.decode_audio(wav)
    assert rate == RATE
    return samples, start_s, end_s


# ------------------------------------------------------------------------ tests
def test_all_models_ready_with_the_documented_contract(client: grpcclient.InferenceServerClient) -> None:
    for model in ("minilm", "ocr", "vad"):
        assert client.is_model_ready(model), model
    ocr = client.get_model_metadata("ocr")
    assert [(t.name, t.datatype, list(t.shape)) for t in ocr.inputs] == [("image", "UINT8", [-1, -1, -1, 3])]
    assert [(t.name, t.datatype, list(t.shape)) for t in ocr.outputs] == [
        ("text", "BYTES", [-1, -1]),
        ("score", "FP32", [-1, -1]),
        ("box", "FP32", [-1, -1, 4, 2]),
    ]
    vad = client.get_model_metadata("vad")
    assert [(t.name, t.datatype, list(t.shape)) for t in vad.inputs] == [("audio", "FP32", [-1, -1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in vad.outputs] == [("speech_probs", "FP32", [-1, -1])]
    assert client.get_model_config("ocr").config.max_batch_size == 4
    assert client.get_model_config("vad").config.max_batch_size == 8


def test_ocr_reads_the_phrase(client: grpcclient.InferenceServerClient) -> None:
    image = media.bgr_array(media.text_image(PHRASE))
    height, width = image.shape[:2]
    lines, scores, boxes = _ocr(client, image)
    assert lines, "no text found"
    assert PHRASE.replace(" ", "") in "".join(lines).replace(" ", "").upper(), lines
    assert (scores > 0.5).all(), scores
    assert boxes.shape == (len(lines), 4, 2)
    assert (boxes[..., 0] >= 0).all() and (boxes[..., 0] <= width).all(), boxes
    assert (boxes[..., 1] >= 0).all() and (boxes[..., 1] <= height).all(), boxes
    # The boxes are in the input's pixels: together they cover the ink, give or take a few pixels.
    ys, xs = np.nonzero(image.min(axis=2) < 128)
    margin = 8
    assert boxes[..., 0].min() <= xs.min() + margin and boxes[..., 0].max() >= xs.max() - margin, boxes
    assert boxes[..., 1].min() <= ys.min() + margin and boxes[..., 1].max() >= ys.max() - margin, boxes


def test_ocr_blank_image_has_no_lines(client: grpcclient.InferenceServerClient) -> None:
    lines, scores, boxes = _ocr(client, media.bgr_array(media.text_image("")))
    assert lines == []
    assert scores.shape == (0,)
    assert boxes.shape == (0, 4, 2)


def test_ocr_concurrent_images_of_different_sizes(server: TritonServer) -> None:
    cases = [
        ((640, 160), 48, PHRASE),
        ((900, 300), 64, PHRASE),
        ((420, 100), 30, PHRASE),
        ((300, 200), 40, ""),
    ]
    images = [media.bgr_array(media.text_image(p, size=s, font_size=f)) for s, f, p in cases]
    clients = [grpcclient.InferenceServerClient(server.grpc_url) for _ in images]
    barrier = threading.Barrier(len(images))

    def call(i: int) -> list[str]:
        barrier.wait()
        return _ocr(clients[i], images[i])[0]

    with ThreadPoolExecutor(len(images)) as pool:
        results = list(pool.map(call, range(len(images))))
    for (_, _, phrase), lines in zip(cases, results, strict=True):
        if phrase:
            assert phrase.replace(" ", "") in "".join(lines).replace(" ", "").upper(), lines
        else:
            assert lines == []


def test_ocr_malformed_input_is_an_error_and_the_server_keeps_serving(
    client: grpcclient.InferenceServerClient,
) -> None:
    # Wrong channel count: Triton itself rejects it against dims [-1, -1, 3].
    with pytest.raises(InferenceServerException, match="unexpected shape"):
        _ocr(client, np.zeros((10, 10, 1), dtype=np.uint8))
    # Shape-valid but empty: model.py answers INVALID_ARG for this request only.
    with pytest.raises(InferenceServerException, match="empty image"):
        _ocr(client, np.zeros((0, 8, 3), dtype=np.uint8))
    with pytest.raises(InferenceServerException, match="larger than"):
        _ocr(client, np.zeros((8193, 1, 3), dtype=np.uint8))
    # rapidocr's own resizing fails on it: still a per-request error, not a dead stub.
    with pytest.raises(InferenceServerException, match="too thin"):
        _ocr(client, np.full((2, 3000, 3), 255, dtype=np.uint8))
    lines, _, _ = _ocr(client, media.bgr_array(media.text_image(PHRASE)))
    assert PHRASE.replace(" ", "") in "".join(lines).replace(" ", "").upper(), lines


def test_vad_marks_the_spoken_part_only(
    client: grpcclient.InferenceServerClient, speech: tuple[np.ndarray, float, float]
) -> None:
    samples, start_s, end_s = speech
    probs = _vad(client, samples)
    assert probs.shape == (_frames(samples.size),)
    # Frame i covers [i, i + 1) * 32 ms.
    begins = np.arange(probs.size) * FRAME / RATE
    ends = begins + FRAME / RATE
    voiced = probs > 0.5
    assert voiced.any()
    first, last = begins[voiced].min(), ends[voiced].max()
    assert abs(first - start_s) <= TOLERANCE_S, (first, start_s)
    assert abs(last - end_s) <= TOLERANCE_S, (last, end_s)
    silent = (ends <= start_s - TOLERANCE_S) | (begins >= end_s + TOLERANCE_S)
    assert not voiced[silent].any(), probs[silent].max()
    inside = (begins >= start_s) & (ends <= end_s)
    assert voiced[inside].mean() >= 0.8, voiced[inside].mean()
    # Same numbers as silero's stock streaming model run frame by frame.
    np.testing.assert_allclose(probs, _stock_silero(samples), atol=1e-4)


def test_vad_silence_has_no_speech(client: grpcclient.InferenceServerClient) -> None:
    samples, rate = media.decode_audio(media.silence_wav(3.0, rate=RATE))
    assert rate == RATE
    probs = _vad(client, samples)
    assert probs.shape == (_frames(samples.size),)
    assert probs.max() < 0.5


def test_vad_empty_audio_gives_no_frames(client: grpcclient.InferenceServerClient) -> None:
    assert _vad(client, np.zeros(0, dtype=np.float32)).shape == (0,)


def test_vad_concurrent_requests_of_different_lengths(
    server: TritonServer, speech: tuple[np.ndarray, float, float]
) -> None:
    samples = speech[0]
    offset = RATE  # slices that start at the speech
    lengths = [0, 1, 511, 512, 513, 8000, 3 * RATE + 7, samples.size - offset]
    clips = [samples[offset : offset + n] for n in lengths]
    first = grpcclient.InferenceServerClient(server.grpc_url)
    singles = [_vad(first, clip) for clip in clips]
    clients = [grpcclient.InferenceServerClient(server.grpc_url) for _ in clips]
    barrier = threading.Barrier(len(clips))

    def call(i: int) -> np.ndarray:
        barrier.wait()
        return _vad(clients[i], clips[i])

    # Whether a burst shares an execution depends on the CPU being free; a few
    # bursts make it certain that ragged batches were formed and answered right.
    batched = False
    for _ in range(5):
        requests_before, executions_before = _executions(first, "vad")
        with ThreadPoolExecutor(len(clips)) as pool:
            results = list(pool.map(call, range(len(clips))))
        requests_after, executions_after = _executions(first, "vad", at_least=requests_before + len(clips))
        for n, got, single in zip(lengths, results, singles, strict=True):
            assert got.shape == (_frames(n),), (n, got.shape)
            np.testing.assert_array_equal(got, single)
        assert requests_after - requests_before == len(clips)
        if executions_after - executions_before < len(clips):
            batched = True
            break
    assert batched, "dynamic batcher formed no batch in five bursts"


def test_vad_malformed_input_is_an_error(client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException, match="NaN"):
        _vad(client, np.full(1000, np.nan, dtype=np.float32))
    assert _vad(client, np.zeros(1024, dtype=np.float32)).shape == (2,)
