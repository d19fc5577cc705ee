"""Accuracy from feedback: join what callers say was right with the answers the gateway gave.

Per (pipeline, model, version) a recent window of judged answers gives accuracy, macro precision and
macro recall; whatever falls out of the window is added to a cumulative reference, so the reference is
"everything judged before the recent window" and a drop is reference minus recent.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import NamedTuple

JOINED = "joined"
UNKNOWN_REQUEST = "unknown_request"
DUPLICATE = "duplicate"
INVALID = "invalid"


@dataclass
class Answer:
    """What the gateway answered; ``label`` is "" when the answer had none."""

    model: str
    version: str
    label: str
    answered_unix_ms: int
    judged: bool = False


class AnswerBook:
    """The most recent answers by (pipeline, request_id), oldest evicted first."""

    def __init__(self, max_answers: int = 50_000) -> None:
        self.max_answers = max_answers
        self.dropped = 0  # answers evicted before any feedback could find them
        self._answers: OrderedDict[tuple[str, str], Answer] = OrderedDict()

    def __len__(self) -> int:
        return len(self._answers)

    def add(self, pipeline: str, request_id: str, model: str, version: str, label: str, now_ms: int) -> None:
        """Remember an answer; a repeated request_id replaces the older answer."""
        key = (pipeline, request_id)
        self._answers.pop(key, None)
        self._answers[key] = Answer(model, version, label, now_ms)
        while len(self._answers) > self.max_answers:
            self._answers.popitem(last=False)
            self.dropped += 1

    def get(self, pipeline: str, request_id: str) -> Answer | None:
        return self._answers.get((pipeline, request_id))


class Judged(NamedTuple):
    """One judged answer."""

    predicted: str
    truth: str | None  # None when the feedback only said right or wrong
    correct: bool


#: Distinct labels one series bucket counts for its precision and recall; past it they are left out.
MAX_BUCKET_LABELS = 64


@dataclass
class _Bucket:
    """One time bucket of the series: accuracy counts, and per-label counts for macro precision and recall."""

    t: int
    correct: int = 0
    total: int = 0
    tp: dict[str, int] = field(default_factory=dict)
    predicted: dict[str, int] = field(default_factory=dict)
    actual: dict[str, int] = field(default_factory=dict)
    #: Labelled items whose labels were over MAX_BUCKET_LABELS: the bucket then reports no precision/recall.
    overflow: bool = False

    def add(self, item: Judged) -> None:
        self.total += 1
        self.correct += item.correct
        if item.truth is None or self.overflow:
            return
        labels = {item.truth, item.predicted} - {""}
        if len(set(self.actual) | set(self.predicted) | labels) > MAX_BUCKET_LABELS:
            self.overflow = True
            return
        _count_labelled(item.predicted, item.truth, self.tp, self.predicted, self.actual)

    def point(self) -> dict[str, object]:
        precision, recall = (None, None) if self.overflow else _macro(self.tp, self.predicted, self.actual)
        return {
            "t": self.t,
            "accuracy": round(self.correct / self.total, 6),
            "precision": _round(precision),
            "recall": _round(recall),
            "samples": self.total,
        }


@dataclass
class _Key:
    recent: deque[Judged]
    series: deque[_Bucket]
    reference_correct: int = 0
    reference_total: int = 0


class AccuracyBook:
    """Recent-window and reference accuracy per (pipeline, model, version), with a bounded number of keys."""

    def __init__(
        self,
        answers: AnswerBook,
        window: int = 200,
        min_samples: int = 20,
        min_reference: int = 20,
        bucket_s: float = 10,
        max_buckets: int = 360,
        max_keys: int = 200,
    ) -> None:
        self.answers = answers
        self.window = window
        self.min_samples = min_samples
        self.min_reference = min_reference
        self.bucket_ms = max(1, int(bucket_s * 1000))
        self.max_buckets = max_buckets
        self.max_keys = max_keys
        self.dropped = 0  # joined feedback not kept because its key would exceed max_keys
        self._keys: dict[tuple[str, str, str], _Key] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def feedback(self, pipeline: str, request_id: str, label: str | None, correct: bool | None, now_ms: int) -> str:
        """Judge one answer; returns joined, unknown_request, duplicate or invalid.

        A label wins over the ``correct`` flag when both are given. An empty label counts as no label.
        Feedback joined to an answer whose key is over max_keys still reports "joined" and counts in ``dropped``.
        """
        if not label and correct is None:
            return INVALID
        answer = self.answers.get(pipeline, request_id)
        if answer is None:
            return UNKNOWN_REQUEST
        if answer.judged:
            return DUPLICATE
        answer.judged = True
        item = (
            Judged(answer.label, label, answer.label == label) if label else Judged(answer.label, None, bool(correct))
        )
        key = (pipeline, answer.model, answer.version)
        state = self._keys.get(key)
        if state is None:
            if len(self._keys) >= self.max_keys:
                self.dropped += 1
                return JOINED
            state = self._keys[key] = _Key(recent=deque(maxlen=self.window), series=deque(maxlen=self.max_buckets))
        if len(state.recent) == self.window:
            oldest = state.recent[0]
            state.reference_total += 1
            state.reference_correct += oldest.correct
        state.recent.append(item)
        self._count(state.series, now_ms, item)
        return JOINED

    def _count(self, series: deque[_Bucket], now_ms: int, item: Judged) -> None:
        t = now_ms - now_ms % self.bucket_ms
        if not series or t > series[-1].t:
            series.append(_Bucket(t))
        for bucket in reversed(series):
            if bucket.t == t:
                bucket.add(item)
                return
        # Older than every kept bucket (a clock step back): not charted, still in the window.

    def snapshot(self) -> list[dict[str, object]]:
        """One Accuracy row per key."""
        return [self._row(key, state) for key, state in sorted(self._keys.items())]

    def _row(self, key: tuple[str, str, str], state: _Key) -> dict[str, object]:
        recent = list(state.recent)
        accuracy = sum(j.correct for j in recent) / len(recent) if recent else None
        precision, recall = macro_precision_recall(recent)
        reference = (
            state.reference_correct / state.reference_total if state.reference_total >= self.min_reference else None
        )
        drop = None
        if reference is not None and accuracy is not None and len(recent) >= self.min_samples:
            drop = (reference - accuracy) * 100.0
        pipeline, model, version = key
        return {
            "pipeline": pipeline,
            "model": model,
            "version": version,
            "samples": len(recent),
            "accuracy": _round(accuracy),
            "precision": _round(precision),
            "recall": _round(recall),
            "reference_accuracy": _round(reference),
            "drop_points": _round(drop),
            "series": [b.point() for b in state.series],
        }


def macro_precision_recall(judged: list[Judged]) -> tuple[float | None, float | None]:
    """Macro precision over the labels predicted and macro recall over the true labels, among samples with a truth.

    A label that was never predicted has no precision and is left out of the precision average (likewise
    recall for a label never true) rather than counted as 0. "" (an answer without a label) is not a label.
    """
    tp: dict[str, int] = {}
    predicted: dict[str, int] = {}
    actual: dict[str, int] = {}
    for j in judged:
        if j.truth is not None:
            _count_labelled(j.predicted, j.truth, tp, predicted, actual)
    return _macro(tp, predicted, actual)


def _count_labelled(
    pred: str, truth: str, tp: dict[str, int], predicted: dict[str, int], actual: dict[str, int]
) -> None:
    if pred:
        predicted[pred] = predicted.get(pred, 0) + 1
    actual[truth] = actual.get(truth, 0) + 1
    if pred == truth:
        tp[pred] = tp.get(pred, 0) + 1


def _macro(tp: dict[str, int], predicted: dict[str, int], actual: dict[str, int]) -> tuple[float | None, float | None]:
    if not actual:
        return None, None
    precision = sum(tp.get(lab, 0) / n for lab, n in predicted.items()) / len(predicted) if predicted else None
    recall = sum(tp.get(lab, 0) / n for lab, n in actual.items()) / len(actual)
    return precision, recall


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
