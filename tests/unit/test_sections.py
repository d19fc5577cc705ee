"""BENCHMARKS.md has two writers; each keeps the other's section."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.sections import keep_others, put, sections

pytestmark = pytest.mark.unit


def test_a_section_is_replaced_in_place_and_others_survive_a_rewrite(tmp_path: Path) -> None:
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# bench\n\nnumbers v1\n")
    put(doc, "chaos", "## Chaos\nlost 0")
    put(doc, "chaos", "## Chaos\nlost 0, second run")
    text = doc.read_text()
    assert text.count("loom:chaos:begin") == 1 and "second run" in text and "numbers v1" in text
    rewritten = keep_others(doc, "# bench\n\nnumbers v2\n")
    assert "numbers v2" in rewritten and "numbers v1" not in rewritten
    assert sections(rewritten)["chaos"].count("second run") == 1
    assert keep_others(tmp_path / "missing.md", "fresh\n") == "fresh\n"
