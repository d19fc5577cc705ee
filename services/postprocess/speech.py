"""Speech segments from per-frame voice-activity probabilities (the Silero VAD model's output).

Hysteresis as in Silero's ``get_speech_timestamps``: speech starts on a frame
at or above ``threshold`` and ends only once the probability has stayed below
``neg_threshold`` for ``min_silence_s`` (frames in between neither start nor
end anything), so a wobble around one threshold does not chop a sentence.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from services.common.errors import InvalidArgument

# Frame counts times frame lengths are compared with durations given in seconds:
# allow for 3 * 0.1 being 0.30000000000000004.
_EPS = 1e-9


def _raw_segments(
    probs: np.ndarray, threshold: float, neg_threshold: float, silence_frames: float
) -> list[tuple[int, int]]:
    """(first, end) frame indices of each stretch of speech, end exclusive."""
    segments: list[tuple[int, int]] = []
    start: int | None = None
    silent_since: int | None = None
    for i, p in enumerate(probs.tolist()):
        if start is None:
            if p >= threshold:
                start = i
            continue
        if p >= threshold:
            silent_since = None
        elif p < neg_threshold and silent_since is None:
            silent_since = i
        if silent_since is not None and i + 1 - silent_since >= silence_frames - _EPS:
            segments.append((start, silent_since))
            start = silent_since = None
    if start is not None:  # speech runs to the end (or its silence was too short to close it)
        segments.append((start, len(probs) if silent_since is None else silent_since))
    return segments


def speech_segments(
    probs: np.ndarray,
    *,
    frame_s: float = 0.032,
    threshold: float = 0.5,
    neg_threshold: float | None = None,
    min_speech_s: float = 0.25,
    min_silence_s: float = 0.1,
    pad_s: float = 0.03,
    duration_s: float | None = None,
) -> list[tuple[float, float]]:
    """(start, end) seconds of each speech segment, sorted and not overlapping.

    ``probs`` holds one probability per frame of ``frame_s`` seconds (512 samples
    at 16 kHz by default). ``neg_threshold`` defaults to ``threshold - 0.15``.
    Segments shorter than ``min_speech_s`` are dropped, the rest padded by
    ``pad_s`` on each side, clamped to [0, ``duration_s``] (default: the frames'
    total length) and merged where the padding makes them touch.
    """
    p = np.asarray(probs, dtype=np.float32)
    if p.ndim == 2 and 1 in p.shape:
        p = p.reshape(-1)  # [1, T] or [T, 1], as the model may return them
    if p.ndim != 1:
        raise InvalidArgument(f"speech probabilities of shape {list(p.shape)}, expected [frames]")
    if frame_s <= 0:
        raise InvalidArgument(f"frame length must be positive, got {frame_s}")
    neg = threshold - 0.15 if neg_threshold is None else neg_threshold
    if neg > threshold:
        raise InvalidArgument(f"neg_threshold {neg} is above threshold {threshold}")
    end_of_audio = len(p) * frame_s if duration_s is None else duration_s

    merged: list[tuple[float, float]] = []
    for first, end in _raw_segments(p, threshold, neg, min_silence_s / frame_s):
        if (end - first) * frame_s < min_speech_s - _EPS:
            continue
        start_s = max(0.0, first * frame_s - pad_s)
        end_s = min(end_of_audio, end * frame_s + pad_s)
        if end_s <= start_s:
            continue  # frames past the end of the audio (the model pads the last window)
        if merged and start_s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end_s))
        else:
            merged.append((start_s, end_s))
    return merged


def speech_ratio(segments: Sequence[tuple[float, float]], duration_s: float) -> float:
    """The fraction of ``duration_s`` covered by (non-overlapping) segments, in [0, 1]."""
    if duration_s <= 0:
        return 0.0
    spoken = sum(max(0.0, end - start) for start, end in segments)
    return min(1.0, spoken / duration_s)
