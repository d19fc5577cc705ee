"""The checked-in generated code must equal what ``make proto`` produces now."""

from pathlib import Path

import pytest

from tools.gen_protos import ROOT, generate

pytestmark = pytest.mark.unit


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    checked_in = ROOT / "services" / "common" / "pb"
    fresh = tmp_path / "pb"
    generate(fresh)
    fresh_files = {p.relative_to(fresh): p.read_text() for p in fresh.rglob("*.py*")}
    current = {p.relative_to(checked_in): p.read_text() for p in checked_in.rglob("*.py*")}
    assert sorted(fresh_files) == sorted(current), "run `make proto`"
    stale = [str(name) for name, text in fresh_files.items() if current[name] != text]
    assert not stale, f"generated code out of date, run `make proto`: {stale}"
