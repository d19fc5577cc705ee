"""Input and output drift by the population stability index (PSI).

Each feature of each (pipeline, model, version) first captures a reference sample; once the sample is
full it becomes a baseline (bin edges and the share of values in each bin). Later values go into a
sliding window, and ``evaluate`` compares the window's shares with the baseline's.

A new model version that has no baseline of its own is compared with the most recently captured
baseline of the same pipeline, model and feature from another version: after a rollout the question is
whether the new version sees (or produces) something different from what the old one did. Such a
version does not capture a reference of its own until ``capture`` resets the pipeline.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

WATCH = 0.1
ALERT = 0.2
KINDS = ("input", "output")
FILE_VERSION = 1
# Half-width, relative to max(|c|, 1), of the bin that holds a constant reference value c.
_CONSTANT_HALF_WIDTH = 1e-6


def psi(expected: np.ndarray, actual: np.ndarray, eps: float = 1e-4) -> float:
    """PSI between two proportion vectors; both are floored at ``eps`` and renormalised first."""
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    if e.ndim != 1 or e.shape != a.shape or e.size == 0:
        raise ValueError(f"psi needs two non-empty vectors of the same length, got {e.shape} and {a.shape}")
    e = np.maximum(e, eps)
    a = np.maximum(a, eps)
    e = e / e.sum()
    a = a / a.sum()
    return float(np.sum((a - e) * np.log(a / e)))


def band(value: float) -> str:
    """stable below WATCH, watch from WATCH up to ALERT, alert above ALERT (as the LoomDriftHigh rule)."""
    if value > ALERT:
        return "alert"
    return "watch" if value >= WATCH else "stable"


def _edges(values: np.ndarray, bins: int) -> np.ndarray:
    """Inner edges, each halfway between two distinct sample values, so no reference value sits on an edge.

    Quantile edges on tied data (token counts) land on the tied values and make empty or lopsided bins;
    cutting between distinct values instead gives every bin at least one distinct value. With at most
    ``bins`` distinct values each one gets its own bin.
    """
    distinct, counts = np.unique(values, return_counts=True)
    distinct = np.asarray(distinct, dtype=np.float64)
    if distinct.size == 1:
        c = float(distinct[0])
        half = max(abs(c), 1.0) * _CONSTANT_HALF_WIDTH
        return np.array([c - half, c + half])
    cuts: np.ndarray = (distinct[:-1] + distinct[1:]) / 2.0
    if distinct.size <= bins:
        return cuts
    below = np.cumsum(counts)[:-1] / values.size  # share of the sample below each cut
    targets = np.arange(1, bins) / bins
    nearest = np.abs(below[None, :] - targets[:, None]).argmin(axis=1)
    return np.asarray(np.unique(cuts[nearest]), dtype=np.float64)


def _shares(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    # side="right": a value equal to an edge counts in the bin above it, for the reference and the window alike.
    idx = np.searchsorted(edges, values, side="right")
    return np.bincount(idx, minlength=edges.size + 1) / values.size


@dataclass(frozen=True, eq=False)
class Baseline:
    """Bin edges (inner, ascending) and the reference share of each of the len(edges) + 1 bins."""

    edges: np.ndarray
    proportions: np.ndarray
    samples: int
    captured_unix_ms: int

    @classmethod
    def from_sample(cls, values: Iterable[float] | np.ndarray, bins: int = 10, now_ms: int = 0) -> Baseline:
        v = np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=np.float64).ravel()
        v = v[np.isfinite(v)]
        if v.size == 0:
            raise ValueError("a baseline needs at least one finite value")
        if bins < 2:
            raise ValueError("a baseline needs at least two bins")
        edges = _edges(v, bins)
        return cls(edges=edges, proportions=_shares(edges, v), samples=int(v.size), captured_unix_ms=now_ms)

    def proportions_of(self, values: Iterable[float] | np.ndarray) -> np.ndarray:
        """Share of ``values`` in each bin; a value equal to an edge belongs to the bin above it."""
        v = np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=np.float64).ravel()
        if v.size == 0:
            raise ValueError("no values to bin")
        return _shares(self.edges, v)

    def to_dict(self) -> dict[str, object]:
        return {
            "edges": [float(x) for x in self.edges],
            "proportions": [float(x) for x in self.proportions],
            "samples": self.samples,
            "captured_unix_ms": self.captured_unix_ms,
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, object]) -> Baseline:
        """Build from a baseline file entry; ValueError names what is wrong."""
        edges = _floats(doc.get("edges"), "edges")
        props = _floats(doc.get("proportions"), "proportions")
        if edges.size and not np.all(np.diff(edges) > 0):
            raise ValueError("edges must be strictly ascending")
        if props.size != edges.size + 1:
            raise ValueError(f"proportions has {props.size} entries, expected len(edges) + 1 = {edges.size + 1}")
        if np.any(props < 0) or not math.isclose(float(props.sum()), 1.0, abs_tol=1e-3):
            raise ValueError(f"proportions must be >= 0 and sum to 1, sum is {float(props.sum()):.6f}")
        samples, captured = doc.get("samples"), doc.get("captured_unix_ms")
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
            raise ValueError("samples must be a positive integer")
        if not isinstance(captured, int) or isinstance(captured, bool) or captured < 0:
            raise ValueError("captured_unix_ms must be a non-negative integer")
        return cls(edges=edges, proportions=props, samples=samples, captured_unix_ms=captured)


def _floats(raw: object, name: str) -> np.ndarray:
    if not isinstance(raw, list) or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in raw):
        raise ValueError(f"{name} must be a list of numbers")
    arr = np.asarray(raw, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite")
    return arr


class FeatureKey(NamedTuple):
    """One drift series. ``kind`` is "input" or "output"; it is part of the key.

    A feature name is either an input or an output of one (pipeline, model, version), never both: the
    exported gauge ``loom_drift_psi{pipeline,model,version,feature}`` and the alert id have no kind, so
    the two series would overwrite each other. :meth:`DriftBook.record` refuses the second kind.
    """

    pipeline: str
    model: str
    version: str
    feature: str
    kind: str


@dataclass
class _Feature:
    window: deque[float]
    history: deque[tuple[int, float]]
    reference: list[float] = field(default_factory=list)
    baseline: Baseline | None = None
    last_psi: float | None = None


class DriftBook:
    """Reference capture, sliding windows and PSI per feature, with a bounded number of keys."""

    def __init__(
        self,
        reference_size: int = 1000,
        window: int = 1000,
        min_samples: int = 100,
        max_keys: int = 500,
        history: int = 120,
        bins: int = 10,
    ) -> None:
        self.reference_size = reference_size
        self.window = window
        self.min_samples = min_samples
        self.max_keys = max_keys
        self.history = history
        self.bins = bins
        self.dropped = 0  # values refused because their key would exceed max_keys
        #: Values refused because their feature name is already the other kind's in that model version.
        self.clashes = 0
        self.invalid = 0  # non-finite values ignored
        self._features: dict[FeatureKey, _Feature] = {}
        # (pipeline, model, feature, kind) -> the key holding the newest own baseline, for version fallback.
        self._newest: dict[tuple[str, str, str, str], FeatureKey] = {}

    def __len__(self) -> int:
        return len(self._features)

    def items(self) -> int:
        """Values held in reference samples and windows together."""
        return sum(len(f.reference) + len(f.window) for f in self._features.values())

    def record(
        self, pipeline: str, model: str, version: str, feature: str, value: float, kind: str, now_ms: int
    ) -> bool:
        """Add one value; False when it was dropped (key limit) or ignored (not finite)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        v = float(value)
        if not math.isfinite(v):
            self.invalid += 1
            return False
        key = FeatureKey(pipeline, model, version, feature, kind)
        feat = self._features.get(key)
        if feat is None:
            if _other_kind(key) in self._features:
                self.clashes += 1
                return False
            if len(self._features) >= self.max_keys:
                self.dropped += 1
                return False
            feat = self._features[key] = self._new_feature()
        if feat.baseline is not None or (not feat.reference and self._fallback(key) is not None):
            feat.window.append(v)
            return True
        feat.reference.append(v)
        if len(feat.reference) >= self.reference_size:
            feat.baseline = Baseline.from_sample(feat.reference, self.bins, now_ms)
            feat.reference = []
            self._note_newest(key)
        return True

    def baseline_for(self, key: FeatureKey) -> Baseline | None:
        """The key's own baseline, else (when it is not capturing) the newest one of another version."""
        feat = self._features.get(key)
        if feat is None:
            return None
        if feat.baseline is not None:
            return feat.baseline
        return None if feat.reference else self._fallback(key)

    def evaluate(self, now_ms: int) -> list[dict[str, object]]:
        """Compute PSI where the window is big enough, extend the history, and return a Drift row per key."""
        for key, feat in self._features.items():
            base = self.baseline_for(key)
            if base is None or len(feat.window) < self.min_samples:
                feat.last_psi = None
                continue
            feat.last_psi = psi(base.proportions, base.proportions_of(np.fromiter(feat.window, dtype=np.float64)))
            feat.history.append((now_ms, feat.last_psi))
        return self.snapshot()

    def snapshot(self) -> list[dict[str, object]]:
        """Drift rows as of the last ``evaluate``, without computing anything."""
        rows: list[dict[str, object]] = []
        for key in sorted(self._features):
            feat = self._features[key]
            base = self.baseline_for(key)
            if base is None:
                state, base_samples = "capturing", len(feat.reference)
            else:
                state = "stable" if feat.last_psi is None else band(feat.last_psi)
                base_samples = base.samples
            rows.append(
                {
                    **key._asdict(),
                    "psi": None if feat.last_psi is None else round(feat.last_psi, 6),
                    "band": state,
                    "baseline_samples": base_samples,
                    "window_samples": len(feat.window),
                    "history": [{"t": t, "psi": round(p, 6)} for t, p in feat.history],
                }
            )
        return rows

    def capture(self, pipeline: str | None = None) -> int:
        """Forget baselines, windows and history (of one pipeline, or all); the next values start a new reference."""
        gone = [k for k in self._features if pipeline is None or k.pipeline == pipeline]
        for key in gone:
            del self._features[key]
        self._reindex()
        return len(gone)

    def dump(self) -> dict[str, object]:
        """Own baselines in the baseline file format (borrowed ones and references in progress are left out)."""
        features = [
            {**key._asdict(), **feat.baseline.to_dict()}
            for key, feat in sorted(self._features.items())
            if feat.baseline is not None
        ]
        return {"version": FILE_VERSION, "features": features}

    def load(self, doc: Mapping[str, object]) -> int:
        """Install the baselines of a baseline file; all or nothing, ValueError on a malformed document.

        Loaded baselines replace those of the same keys (a reference in progress is abandoned); windows are
        kept, other keys are untouched. Returns how many were installed (keys over max_keys are dropped).
        """
        loaded = _parse_file(doc)
        clash = next((k for k in loaded if _other_kind(k) in self._features), None)
        if clash is not None:
            raise ValueError(
                f"{'/'.join(clash[:4])} is an {_other_kind(clash).kind} feature here, cannot load it as {clash.kind}"
            )
        installed = 0
        for key, base in loaded.items():
            feat = self._features.get(key)
            if feat is None:
                if len(self._features) >= self.max_keys:
                    self.dropped += 1
                    continue
                feat = self._features[key] = self._new_feature()
            feat.baseline, feat.reference, feat.last_psi = base, [], None
            feat.history.clear()
            installed += 1
        self._reindex()
        return installed

    def _new_feature(self) -> _Feature:
        return _Feature(window=deque(maxlen=self.window), history=deque(maxlen=self.history))

    def _fallback(self, key: FeatureKey) -> Baseline | None:
        other = self._newest.get((key.pipeline, key.model, key.feature, key.kind))
        if other is None or other == key:
            return None
        return self._features[other].baseline

    def _note_newest(self, key: FeatureKey) -> None:
        base = self._features[key].baseline
        assert base is not None
        group = (key.pipeline, key.model, key.feature, key.kind)
        current = self._newest.get(group)
        current_base = None if current is None else self._features[current].baseline
        if current_base is None or current_base.captured_unix_ms <= base.captured_unix_ms:
            self._newest[group] = key

    def _reindex(self) -> None:
        self._newest.clear()
        for key, feat in self._features.items():
            if feat.baseline is not None:
                self._note_newest(key)


def _parse_file(doc: Mapping[str, object]) -> dict[FeatureKey, Baseline]:
    if not isinstance(doc, Mapping):
        raise ValueError("a baseline file must be a JSON object")
    if doc.get("version") != FILE_VERSION:
        raise ValueError(f"unsupported baseline file version {doc.get('version')!r}, expected {FILE_VERSION}")
    entries = doc.get("features")
    if not isinstance(entries, list):
        raise ValueError("features must be a list")
    out: dict[FeatureKey, Baseline] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise ValueError(f"features[{i}] must be an object")
        names = [entry.get(f) for f in FeatureKey._fields]
        if not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"features[{i}]: {', '.join(FeatureKey._fields)} must be non-empty strings")
        key = FeatureKey(*(str(n) for n in names))
        if key.kind not in KINDS:
            raise ValueError(f"features[{i}]: kind must be one of {KINDS}, got {key.kind!r}")
        if key in out:
            raise ValueError(f"features[{i}]: duplicate entry for {'/'.join(key)}")
        if _other_kind(key) in out:
            raise ValueError(f"features[{i}]: {'/'.join(key[:4])} is both an input and an output feature")
        try:
            out[key] = Baseline.from_dict(entry)
        except ValueError as exc:
            raise ValueError(f"features[{i}] ({'/'.join(key)}): {exc}") from None
    return out


def _other_kind(key: FeatureKey) -> FeatureKey:
    return key._replace(kind="output" if key.kind == "input" else "input")
