from typing import Any, cast

import pytest

from services.monitor.accuracy import AccuracyBook, AnswerBook

pytestmark = pytest.mark.unit


def snapshot(book: AccuracyBook) -> list[dict[str, Any]]:
    return cast(list[dict[str, Any]], book.snapshot())


def answered(n: int, label: str = "cat", start: int = 0, version: str = "1", answers: AnswerBook | None = None):
    if answers is None:
        answers = AnswerBook()
    for i in range(start, start + n):
        answers.add("clf", f"r{i}", "resnet", version, label, now_ms=i)
    return answers


def test_answer_book_is_bounded_and_counts_evictions() -> None:
    answers = answered(5, answers=AnswerBook(max_answers=3))
    assert len(answers) == 3 and answers.dropped == 2
    assert answers.get("clf", "r0") is None and answers.get("clf", "r4") is not None
    assert answers.get("other", "r4") is None  # keyed by pipeline too
    answers.add("clf", "r2", "resnet", "2", "dog", now_ms=9)  # a repeated id replaces, nothing evicted
    again = answers.get("clf", "r2")
    assert again is not None and (again.version, again.label) == ("2", "dog")
    assert len(answers) == 3 and answers.dropped == 2
    answers.add("clf", "r5", "resnet", "1", "cat", now_ms=10)
    assert answers.get("clf", "r3") is None and answers.get("clf", "r2") is not None  # r2 moved to the back


def test_feedback_results() -> None:
    book = AccuracyBook(answered(3))
    assert book.feedback("clf", "r0", None, None, 1) == "invalid"
    assert book.feedback("clf", "r0", "", None, 1) == "invalid"
    assert book.feedback("clf", "nope", "cat", None, 1) == "unknown_request"
    assert book.feedback("clf", "r0", "cat", None, 1) == "joined"
    assert book.feedback("clf", "r0", "dog", None, 1) == "duplicate"
    assert book.feedback("clf", "r0", None, True, 1) == "duplicate"
    assert book.feedback("clf", "r1", None, False, 1) == "joined"
    assert book.feedback("clf", "r2", "dog", True, 1) == "joined"  # the label wins over the flag: wrong
    (row,) = snapshot(book)
    assert (row["pipeline"], row["model"], row["version"], row["samples"]) == ("clf", "resnet", "1", 3)
    assert row["accuracy"] == pytest.approx(1 / 3)
    assert row["reference_accuracy"] is None and row["drop_points"] is None


def test_contradicting_burst_drops_accuracy() -> None:
    answers = answered(300)
    book = AccuracyBook(answers, window=50, min_samples=20, min_reference=20)
    for i in range(60):
        book.feedback("clf", f"r{i}", "cat", None, i)
    (row,) = snapshot(book)
    # 10 judged answers have left the window: too few for a reference yet.
    assert (row["accuracy"], row["reference_accuracy"], row["drop_points"]) == (1.0, None, None)
    for i in range(60, 100):
        book.feedback("clf", f"r{i}", "cat", None, i)
    (row,) = snapshot(book)
    assert (row["accuracy"], row["reference_accuracy"], row["drop_points"]) == (1.0, 1.0, 0.0)
    assert (row["precision"], row["recall"]) == (1.0, 1.0)
    for i in range(100, 110):  # callers say these were dogs
        book.feedback("clf", f"r{i}", "dog", None, i)
    (row,) = snapshot(book)
    assert row["samples"] == 50 and row["accuracy"] == pytest.approx(0.8)
    assert row["reference_accuracy"] == 1.0  # 60 judged before the window, all right
    assert row["drop_points"] == pytest.approx(20.0) and row["drop_points"] > 5
    # Precision over predicted labels (only "cat": 40/50); recall over true labels (cat 40/40, dog 0/10).
    assert row["precision"] == pytest.approx(0.8) and row["recall"] == pytest.approx(0.5)


def test_drop_needs_min_samples_in_the_window() -> None:
    answers = answered(30, version="1")
    answered(5, start=100, version="2", answers=answers)
    book = AccuracyBook(answers, window=10, min_samples=5, min_reference=20)
    for i in range(30):
        book.feedback("clf", f"r{i}", "cat", None, i)
    for i in range(100, 104):
        book.feedback("clf", f"r{i}", "dog", None, i)
    rows = {r["version"]: r for r in snapshot(book)}
    assert rows["1"]["reference_accuracy"] == 1.0 and rows["1"]["drop_points"] == 0.0
    assert rows["2"]["accuracy"] == 0.0 and rows["2"]["samples"] == 4 and rows["2"]["drop_points"] is None


def test_macro_precision_recall_by_hand() -> None:
    answers = AnswerBook()
    pairs = [("cat", "cat"), ("cat", "cat"), ("cat", "dog"), ("dog", "dog"), ("dog", "cat"), ("bird", "bird")]
    pairs += [("cat", "bird")]
    for i, (predicted, _) in enumerate(pairs):
        answers.add("clf", f"r{i}", "resnet", "1", predicted, now_ms=0)
    answers.add("clf", "flag", "resnet", "1", "dog", now_ms=0)
    book = AccuracyBook(answers)
    for i, (_, truth) in enumerate(pairs):
        assert book.feedback("clf", f"r{i}", truth, None, 0) == "joined"
    book.feedback("clf", "flag", None, True, 0)  # right, but no truth label: accuracy only
    (row,) = snapshot(book)
    assert row["accuracy"] == pytest.approx(5 / 8)
    # precision: cat 2/4, dog 1/2, bird 1/1; recall: cat 2/3, dog 1/2, bird 1/2
    assert row["precision"] == pytest.approx((2 / 4 + 1 / 2 + 1) / 3)
    assert row["recall"] == pytest.approx((2 / 3 + 1 / 2 + 1 / 2) / 3)


def test_series_buckets_and_keys_are_bounded() -> None:
    answers = answered(10)
    answers.add("clf", "other", "vit", "1", "cat", now_ms=0)
    book = AccuracyBook(answers, bucket_s=60, max_buckets=2, max_keys=1)
    book.feedback("clf", "r0", "cat", None, 1_000)
    book.feedback("clf", "r1", "dog", None, 59_999)
    book.feedback("clf", "r2", "cat", None, 60_000)
    (row,) = snapshot(book)
    assert row["series"] == [
        # cat answered twice (once right): precision cat 1/2; recall cat 1/1, dog 0/1
        {"t": 0, "accuracy": 0.5, "precision": 0.5, "recall": 0.5, "samples": 2},
        {"t": 60_000, "accuracy": 1.0, "precision": 1.0, "recall": 1.0, "samples": 1},
    ]
    book.feedback("clf", "r3", "cat", None, 130_000)
    assert [b["t"] for b in snapshot(book)[0]["series"]] == [60_000, 120_000]
    assert book.feedback("clf", "other", "cat", None, 130_000) == "joined"  # joined, but over max_keys
    assert book.dropped == 1 and len(book) == 1
    assert book.feedback("clf", "other", "cat", None, 130_000) == "duplicate"


def test_series_uses_ten_second_buckets_by_default() -> None:
    book = AccuracyBook(answered(4))
    book.feedback("clf", "r0", "cat", None, 1_000)
    book.feedback("clf", "r1", None, False, 9_999)  # right/wrong only: accuracy, no precision or recall
    book.feedback("clf", "r2", None, True, 10_000)
    (row,) = snapshot(book)
    assert row["series"] == [
        {"t": 0, "accuracy": 0.5, "precision": 1.0, "recall": 1.0, "samples": 2},
        {"t": 10_000, "accuracy": 1.0, "precision": None, "recall": None, "samples": 1},
    ]


def test_a_bucket_with_too_many_labels_reports_no_precision_or_recall() -> None:
    from services.monitor.accuracy import MAX_BUCKET_LABELS

    n = MAX_BUCKET_LABELS + 5
    book = AccuracyBook(answered(n))
    for i in range(n):
        book.feedback("clf", f"r{i}", f"label{i}", None, 500)
    (row,) = snapshot(book)
    (point,) = row["series"]
    assert point["samples"] == n and point["accuracy"] == 0.0
    assert point["precision"] is None and point["recall"] is None
    assert row["precision"] is not None  # the window's figures are not affected
