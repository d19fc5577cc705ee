import copy
import math
from typing import Any, cast

import numpy as np
import pytest

from services.monitor.drift import ALERT, WATCH, Baseline, DriftBook, FeatureKey, band, psi

pytestmark = pytest.mark.unit

N = 500
TOKEN_SIZES = [8, 12, 16, 24, 32]
TOKEN_SHARES = [0.4, 0.3, 0.15, 0.1, 0.05]


def samples(rng: np.random.Generator, kind: str, n: int = N) -> np.ndarray:
    if kind == "length":  # text lengths in characters
        return rng.lognormal(3.0, 0.5, n)
    if kind == "brightness":  # mean pixel value, 0..1
        return np.asarray(np.clip(rng.normal(0.5, 0.12, n), 0.0, 1.0), dtype=np.float64)
    if kind == "tokens":  # token counts from a handful of padded sizes: heavy ties
        return np.asarray(rng.choice(TOKEN_SIZES, size=n, p=TOKEN_SHARES), dtype=np.float64)
    if kind == "mostly_one":  # 60 % of the sample is one value
        tail = rng.integers(6, 40, n - n * 6 // 10)
        return np.asarray(np.concatenate([np.full(n * 6 // 10, 5.0), tail]), dtype=np.float64)
    raise AssertionError(kind)


def sample_psi(reference: np.ndarray, actual: np.ndarray) -> float:
    base = Baseline.from_sample(reference)
    return psi(base.proportions, base.proportions_of(actual))


def evaluate(book: DriftBook, t: int) -> list[dict[str, Any]]:
    return cast(list[dict[str, Any]], book.evaluate(t))


def dump(book: DriftBook) -> dict[str, Any]:
    return cast(dict[str, Any], book.dump())


def feed(book: DriftBook, values, version: str = "1", kind: str = "input", t: int = 1_000, pipeline: str = "p"):
    feature = "length" if kind == "input" else "score"  # one name cannot be both kinds
    for v in values:
        book.record(pipeline, "m", version, feature, float(v), kind, t)


def test_psi_by_hand_and_eps_floor() -> None:
    assert psi(np.array([0.5, 0.5]), np.array([0.5, 0.5])) == 0.0
    expected = 0.25 * math.log(0.5 / 0.25) + 0.25 * math.log(0.75 / 0.5)
    assert psi(np.array([0.5, 0.5]), np.array([0.25, 0.75])) == pytest.approx(expected)  # 0.2747
    # An empty bin is floored at eps, so the value is finite and large.
    assert 1.0 < psi(np.array([0.5, 0.5, 0.0]), np.array([0.0, 0.5, 0.5])) < 20.0
    with pytest.raises(ValueError):
        psi(np.array([0.5, 0.5]), np.array([1.0]))


def test_band_thresholds() -> None:
    assert (WATCH, ALERT) == (0.1, 0.2)
    assert [band(x) for x in (0.0, 0.0999, 0.1, 0.15, 0.2, 0.2001, 3.0)] == [
        "stable",
        "stable",
        "watch",
        "watch",
        "watch",
        "alert",
        "alert",
    ]


@pytest.mark.parametrize("kind", ["length", "brightness", "tokens", "mostly_one"])
def test_same_distribution_is_stable(kind: str) -> None:
    # A seed per kind: from one seed, lengths and brightness are monotone in the same normal draws and bin alike.
    rng = np.random.default_rng([20240611, *kind.encode()])
    value = sample_psi(samples(rng, kind), samples(rng, kind))
    assert value < WATCH, value


def test_clear_shifts_alert() -> None:
    rng = np.random.default_rng(7)
    longer = sample_psi(samples(rng, "length"), samples(rng, "length") * 3)
    darker = sample_psi(samples(rng, "brightness"), samples(rng, "brightness") * 0.6)
    bigger_batches = sample_psi(samples(rng, "tokens"), rng.choice([24, 32], size=N).astype(float))
    assert min(longer, darker, bigger_batches) > ALERT, (longer, darker, bigger_batches)


def test_ties_give_no_empty_bins() -> None:
    rng = np.random.default_rng(3)
    for kind in ("tokens", "mostly_one"):
        ref = samples(rng, kind)
        base = Baseline.from_sample(ref)
        assert np.all(base.proportions > 0), (kind, base.proportions)
        assert not np.isin(base.edges, ref).any()  # edges fall between values, never on one
        assert base.proportions.sum() == pytest.approx(1.0)
    # At most `bins` distinct values: one bin per value.
    tokens = Baseline.from_sample(samples(rng, "tokens"))
    assert tokens.edges.tolist() == [10.0, 14.0, 20.0, 28.0]
    assert tokens.proportions == pytest.approx(TOKEN_SHARES, abs=0.05)
    # Continuous data: deciles.
    lengths = Baseline.from_sample(samples(rng, "length"))
    assert len(lengths.edges) == 9 and lengths.proportions == pytest.approx([0.1] * 10)


def test_constant_reference_gets_a_bin_of_its_own() -> None:
    base = Baseline.from_sample([4.0] * 50)
    assert len(base.edges) == 2 and base.edges[0] < 4.0 < base.edges[1]
    assert base.proportions.tolist() == [0.0, 1.0, 0.0]
    assert psi(base.proportions, base.proportions_of([4.0] * 50)) == pytest.approx(0.0)
    assert psi(base.proportions, base.proportions_of([5.0] * 50)) > ALERT
    assert psi(base.proportions, base.proportions_of([3.0] * 50)) > ALERT


def test_book_captures_then_evaluates_with_bounded_history() -> None:
    rng = np.random.default_rng(11)
    book = DriftBook(reference_size=N, window=N, min_samples=100, history=3)
    feed(book, samples(rng, "length")[:200])
    (row,) = evaluate(book, 2_000)
    assert (row["band"], row["psi"], row["baseline_samples"], row["window_samples"]) == ("capturing", None, 200, 0)
    feed(book, samples(rng, "length")[:300])  # reference complete at 500
    feed(book, samples(rng, "length")[:50])
    (row,) = evaluate(book, 3_000)
    assert (row["band"], row["psi"], row["baseline_samples"], row["window_samples"]) == ("stable", None, N, 50)
    feed(book, samples(rng, "length")[:450])
    (row,) = evaluate(book, 4_000)
    assert row["window_samples"] == N and row["band"] == "stable" and row["psi"] < WATCH
    feed(book, samples(rng, "length") * 3)  # the whole window is now three times longer
    for t in (5_000, 6_000, 7_000):
        (row,) = evaluate(book, t)
    assert row["band"] == "alert" and row["psi"] > ALERT
    assert [h["t"] for h in row["history"]] == [5_000, 6_000, 7_000]  # bounded at 3
    assert book.snapshot() == [row]
    assert book.items() == N and len(book) == 1


def test_new_version_is_compared_with_the_old_versions_baseline() -> None:
    rng = np.random.default_rng(5)
    book = DriftBook(reference_size=N, window=N, min_samples=100)
    feed(book, samples(rng, "length"), version="1", t=1_000)
    feed(book, samples(rng, "length") * 3, version="2", t=2_000)
    rows = {r["version"]: r for r in evaluate(book, 3_000)}
    assert rows["2"]["baseline_samples"] == N and rows["2"]["window_samples"] == N
    assert rows["2"]["band"] == "alert"
    v1 = book.baseline_for(FeatureKey("p", "m", "1", "length", "input"))
    assert book.baseline_for(FeatureKey("p", "m", "2", "length", "input")) is v1
    assert [f["version"] for f in dump(book)["features"]] == ["1"]  # v2 captured nothing of its own
    # An output feature is a different series and has no baseline to borrow.
    feed(book, [1.0], version="2", kind="output")
    out = next(r for r in evaluate(book, 4_000) if r["kind"] == "output")
    assert out["band"] == "capturing"


def test_capture_resets_one_pipeline_or_all() -> None:
    rng = np.random.default_rng(9)
    book = DriftBook(reference_size=100, window=100, min_samples=50)
    feed(book, samples(rng, "length", 200), pipeline="a")
    feed(book, samples(rng, "length", 200), pipeline="b")
    assert book.capture("a") == 1
    feed(book, [10.0], pipeline="a")
    rows = {r["pipeline"]: r for r in evaluate(book, 1)}
    assert (rows["a"]["band"], rows["a"]["baseline_samples"], rows["a"]["window_samples"]) == ("capturing", 1, 0)
    assert (rows["b"]["baseline_samples"], rows["b"]["window_samples"]) == (100, 100) and rows["b"]["psi"] is not None
    assert book.capture(None) == 2 and evaluate(book, 2) == [] and book.items() == 0


def test_dump_load_round_trip() -> None:
    rng = np.random.default_rng(13)
    book = DriftBook(reference_size=N, window=N, min_samples=100)
    feed(book, samples(rng, "tokens"), version="1")
    feed(book, samples(rng, "tokens"), kind="output")
    doc = dump(book)
    assert doc["version"] == 1 and len(doc["features"]) == 2
    entry = doc["features"][0]
    assert set(entry) == {
        *("pipeline", "model", "version", "feature", "kind"),
        *("edges", "proportions", "samples", "captured_unix_ms"),
    }
    fresh = DriftBook(reference_size=N, window=N, min_samples=100)
    assert fresh.load(copy.deepcopy(doc)) == 2
    assert dump(fresh) == doc
    window = samples(rng, "tokens")
    feed(book, window)
    feed(fresh, window)
    assert evaluate(fresh, 1)[0]["psi"] == evaluate(book, 1)[0]["psi"] < WATCH


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(version=2), "version"),
        (lambda d: d.update(features={}), "features must be a list"),
        (lambda d: d["features"][0].update(proportions=[1.0]), r"len\(edges\) \+ 1"),
        (lambda d: d["features"][0].update(edges=d["features"][0]["edges"][::-1]), "ascending"),
        (lambda d: d["features"][0]["proportions"].__setitem__(0, 0.9), "sum to 1"),
        (lambda d: d["features"][0].update(kind="sideways"), "kind"),
        (lambda d: d["features"][0].update(samples=-1), "samples"),
        (lambda d: d["features"][0].update(edges="1,2"), "edges must be a list"),
        (lambda d: d["features"].append(copy.deepcopy(d["features"][0])), "duplicate"),
    ],
)
def test_load_rejects_malformed_documents(change, message: str) -> None:
    book = DriftBook(reference_size=50, window=50, min_samples=10)
    feed(book, np.arange(50.0))
    before = dump(book)
    doc = copy.deepcopy(before)
    change(doc)
    with pytest.raises(ValueError, match=message):
        book.load(doc)
    assert dump(book) == before  # all or nothing


def test_keys_are_bounded_and_drops_counted() -> None:
    book = DriftBook(reference_size=10, max_keys=2)
    for feature in ("a", "b", "c", "c"):
        book.record("p", "m", "1", feature, 1.0, "input", 0)
    assert len(book) == 2 and book.dropped == 2 and book.items() == 2
    assert not book.record("p", "m", "1", "a", float("nan"), "input", 0) and book.invalid == 1
    with pytest.raises(ValueError):
        book.record("p", "m", "1", "a", 1.0, "sideways", 0)


def test_an_input_and_an_output_feature_cannot_share_a_name() -> None:
    """loom_drift_psi has no kind label: the second kind of one name is refused, never merged or overwritten."""
    book = DriftBook(reference_size=10, window=10, min_samples=5)
    assert book.record("p", "m", "1", "score", 0.5, "input", 1)
    assert not book.record("p", "m", "1", "score", 0.9, "output", 1)
    assert book.clashes == 1 and len(book) == 1
    assert book.record("p", "m", "1", "top_score", 0.9, "output", 1)  # a distinct name is fine
    assert book.record("p", "m", "2", "score", 0.9, "output", 1)  # so is another version
    rows = book.evaluate(2)
    names = [(r["version"], r["feature"]) for r in rows]
    assert len(names) == len(set(names)) == 3  # one series per exported label set
    base = Baseline.from_sample([float(i) for i in range(20)]).to_dict()
    both: dict[str, Any] = {
        "version": 1,
        "features": [
            {"pipeline": "p", "model": "m", "version": "9", "feature": "x", "kind": kind, **base}
            for kind in ("input", "output")
        ],
    }
    with pytest.raises(ValueError, match="both an input and an output"):
        book.load(both)
    clash = {"version": 1, "features": [{**both["features"][1], "version": "1", "feature": "score"}]}
    with pytest.raises(ValueError, match="is an input feature here"):
        book.load(clash)
