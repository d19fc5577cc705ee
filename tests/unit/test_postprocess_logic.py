"""Speech segments from VAD probabilities, and OCR lines in reading order."""

import numpy as np
import pytest

from services.common.errors import Internal, InvalidArgument
from services.postprocess.ocr import OcrLine, joined_text, ocr_lines
from services.postprocess.speech import speech_ratio, speech_segments

pytestmark = pytest.mark.unit

F = 0.1  # a round frame length keeps the expected times readable


def probs(*runs: tuple[float, int]) -> np.ndarray:
    """Concatenated runs of (probability, frames)."""
    return np.concatenate([np.full(n, p, dtype=np.float32) for p, n in runs])


def segments(p: np.ndarray, **kw: float) -> list[tuple[float, float]]:
    options = {"frame_s": F, "min_speech_s": 0.25, "min_silence_s": 0.2, "pad_s": 0.0} | kw
    return speech_segments(p, **options)


def approx(segs: list[tuple[float, float]]) -> object:
    return pytest.approx([x for seg in segs for x in seg])


def flat(segs: list[tuple[float, float]]) -> list[float]:
    return [x for seg in segs for x in seg]


def test_one_block() -> None:
    assert flat(segments(probs((0.1, 5), (0.9, 10), (0.1, 5)))) == approx([(0.5, 1.5)])


def test_speech_to_the_end_and_empty_input() -> None:
    assert flat(segments(probs((0.1, 5), (0.9, 5)))) == approx([(0.5, 1.0)])
    assert segments(np.zeros(0)) == [] and segments(np.zeros(50)) == []


def test_short_gap_is_bridged_long_gap_splits() -> None:
    short_gap = probs((0.9, 5), (0.1, 1), (0.9, 5), (0.1, 5))
    assert flat(segments(short_gap)) == approx([(0.0, 1.1)])
    long_gap = probs((0.9, 5), (0.1, 3), (0.9, 5), (0.1, 5))
    assert flat(segments(long_gap)) == approx([(0.0, 0.5), (0.8, 1.3)])


def test_padding_merges_segments_whose_gap_it_covers() -> None:
    p = probs((0.9, 5), (0.1, 3), (0.9, 5), (0.1, 5))
    assert flat(segments(p, pad_s=0.2)) == approx([(0.0, 1.5)])


def test_too_short_blip_is_dropped() -> None:
    p = probs((0.1, 5), (0.9, 2), (0.1, 5), (0.9, 3), (0.1, 5))
    assert flat(segments(p)) == approx([(1.2, 1.5)])  # 0.2 s dropped, 0.3 s kept


def test_hysteresis() -> None:
    # 0.4 is below the start threshold but above neg_threshold (0.35): it neither starts nor ends speech.
    wobble = probs((0.4, 5), (0.6, 3), (0.4, 10), (0.1, 5))
    assert flat(segments(wobble)) == approx([(0.5, 1.8)])
    # With a neg_threshold above 0.4 the same wobble ends it.
    assert flat(segments(wobble, neg_threshold=0.45)) == approx([(0.5, 0.8)])
    # Silence is counted from the first frame below neg_threshold, through wobbles that do not restart it.
    p = probs((0.9, 5), (0.1, 1), (0.4, 1), (0.1, 5))
    assert flat(segments(p)) == approx([(0.0, 0.5)])


def test_padding_is_clamped_to_the_audio() -> None:
    p = probs((0.9, 4), (0.1, 4), (0.9, 6))
    assert flat(segments(p, pad_s=0.05)) == approx([(0.0, 0.45), (0.75, 1.4)])
    # The model's last window runs past the audio: ends clamp to duration_s.
    assert flat(segments(p, pad_s=0.05, duration_s=1.3)) == approx([(0.0, 0.45), (0.75, 1.3)])


def test_defaults_and_bad_arguments() -> None:
    p = np.concatenate([np.zeros(10), np.ones(20), np.zeros(10)])[None, :]  # [1, T] as the model returns it
    assert flat(speech_segments(p)) == approx([(10 * 0.032 - 0.03, 30 * 0.032 + 0.03)])
    with pytest.raises(InvalidArgument, match="shape"):
        speech_segments(np.zeros((2, 3)))
    with pytest.raises(InvalidArgument, match="neg_threshold"):
        speech_segments(np.zeros(3), threshold=0.5, neg_threshold=0.6)


def test_speech_ratio() -> None:
    assert speech_ratio([(0.0, 1.0), (2.0, 2.5)], 5.0) == pytest.approx(0.3)
    assert speech_ratio([], 5.0) == 0.0 and speech_ratio([(0.0, 1.0)], 0.0) == 0.0
    assert speech_ratio([(0.0, 3.0)], 2.0) == 1.0


def rect(x: float, y: float, w: float, h: float) -> list[list[float]]:
    return [[x, y], [x + w, y], [x + w, y + h], [x, y + h]]


def test_ocr_lines_reading_order_and_filtering() -> None:
    texts = ["world", "second line", "Hello", "  ", "noise", "tilted"]
    scores = np.array([0.9, 0.8, 0.95, 0.99, 0.2, 0.7])
    boxes = np.array(
        [
            rect(100, 12, 80, 20),  # same row as "Hello", 2 px lower
            rect(10, 60, 150, 20),
            rect(10, 10, 80, 20),
            rect(10, 100, 50, 20),  # whitespace only
            rect(200, 10, 50, 20),  # score too low
            rect(200, 18, 60, 20),  # 8 px lower, still within half a line height
        ]
    )
    lines = ocr_lines(texts, scores, boxes)
    assert [line.text for line in lines] == ["Hello", "world", "tilted", "second line"]
    assert joined_text(lines) == "Hello world tilted second line"
    assert lines[0] == OcrLine("Hello", 0.95, (10.0, 10.0, 90.0, 10.0, 90.0, 30.0, 10.0, 30.0))


def test_ocr_lines_next_row_is_not_merged() -> None:
    lines = ocr_lines(["b", "a"], np.array([0.9, 0.9]), np.array([rect(0, 11, 10, 20), rect(50, 0, 10, 20)]))
    assert [line.text for line in lines] == ["a", "b"]  # 11 px apart: more than half of 20


def test_ocr_lines_scaled_back_and_flat_boxes() -> None:
    lines = ocr_lines([" x "], np.array([0.9]), np.array([[1, 2, 3, 2, 3, 4, 1, 4]]), scale=(2.0, 0.5), min_score=0.9)
    assert lines == [OcrLine("x", 0.9, (2.0, 1.0, 6.0, 1.0, 6.0, 2.0, 2.0, 2.0))]
    assert ocr_lines([], np.zeros(0), np.zeros((0, 4, 2))) == [] and joined_text([]) == ""


def test_ocr_lines_nan_score_dropped_and_mismatch_is_internal() -> None:
    assert ocr_lines(["a"], np.array([np.nan]), np.array([rect(0, 0, 1, 1)])) == []
    with pytest.raises(Internal, match="OCR output mismatch"):
        ocr_lines(["a", "b"], np.array([0.9]), np.array([rect(0, 0, 1, 1)]))
