"""Fuzz counts that outlive the run: ``.artifacts/fuzz/<name>.json`` per fuzz test.

Each fuzz test (HTTP, NATS, gRPC, the unit hypothesis properties) records how many cases it sent
and what came back, ``{"cases": n, "by_outcome": {...}}``; tests/conftest.py's
``pytest_terminal_summary`` prints one line per file, so ``make test`` shows the counts. A file is
rewritten by each run of its test (the counts are derandomized, so a change means the corpus or the
answers changed).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any, ParamSpec

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / ".artifacts" / "fuzz"
#: Files written by this pytest process: the summary shows these first (others are from earlier runs).
WRITTEN: set[str] = set()

P = ParamSpec("P")


def record(name: str, by_outcome: Mapping[str, int], **extra: Any) -> Path:
    """Write ``{"cases": sum, "by_outcome": ..., **extra}`` to ``.artifacts/fuzz/<name>.json``."""
    FOLDER.mkdir(parents=True, exist_ok=True)
    outcomes = {str(k): int(v) for k, v in sorted(by_outcome.items(), key=lambda kv: str(kv[0]))}
    doc = {"cases": sum(outcomes.values()), "by_outcome": outcomes, "recorded_at": round(time.time()), **extra}
    path = FOLDER / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    WRITTEN.add(name)
    return path


@contextmanager
def recording(name: str, **extra: Any) -> Iterator[Counter[str]]:
    """A counter to tally outcomes into; written when the block ends, also when it fails."""
    seen: Counter[str] = Counter()
    try:
        yield seen
    finally:
        record(name, seen, **extra)


def counted(name: str) -> Callable[[Callable[P, str | None]], Callable[P, None]]:
    """Wrap a hypothesis test (under ``@given``): each example is one case, tallied by outcome.

    The outcome is the string the test returns ("typed error"), else "accepted", or the type of the
    exception it raised (a failing example).

    Put it *below* ``@given`` so it wraps the inner function that hypothesis calls per example. Shrinking
    examples count too: the numbers are what ran, not what was generated.
    """
    seen: Counter[str] = Counter()

    def decorate(fn: Callable[P, str | None]) -> Callable[P, None]:
        @wraps(fn)
        def inner(*args: P.args, **kwargs: P.kwargs) -> None:
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                seen[type(exc).__name__] += 1
                raise
            else:
                seen[result if isinstance(result, str) else "accepted"] += 1
                return None  # hypothesis refuses a test that returns a value
            finally:
                record(name, seen)  # a few hundred tiny writes a property: cheaper than a hook at its end

        return inner

    return decorate


def summary_lines() -> list[str]:
    """One line per recorded file: name, cases, outcomes (the ones this run wrote marked)."""
    if not FOLDER.is_dir():
        return []
    lines = []
    for path in sorted(FOLDER.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        outcomes = ", ".join(f"{k}={v}" for k, v in doc.get("by_outcome", {}).items())
        when = "" if path.stem in WRITTEN else " (earlier run)"
        lines.append(f"{path.stem}: {doc.get('cases', 0)} cases [{outcomes}]{when}")
    return lines
