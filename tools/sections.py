"""One BENCHMARKS.md, several writers: each tool owns a marked section and leaves the rest alone.

``make bench`` rewrites its own report and keeps every other tool's section
(``<!-- loom:<name>:begin -->`` ... ``<!-- loom:<name>:end -->``); ``make chaos``
replaces only its own.
"""

from __future__ import annotations

import re
from pathlib import Path

_SECTION = re.compile(r"<!-- loom:(?P<name>[a-z]+):begin -->.*?<!-- loom:(?P=name):end -->\n?", re.DOTALL)


def sections(text: str) -> dict[str, str]:
    """Every marked section in ``text``, by name, markers included."""
    return {m.group("name"): m.group(0) for m in _SECTION.finditer(text)}


def put(path: Path, name: str, body: str) -> None:
    """Replace (or append) section ``name`` of ``path`` with ``body``."""
    block = f"<!-- loom:{name}:begin -->\n{body.rstrip()}\n<!-- loom:{name}:end -->\n"
    text = path.read_text() if path.exists() else ""
    found = sections(text).get(name)
    text = text.replace(found, block) if found else text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def keep_others(path: Path, fresh: str, own: str = "") -> str:
    """``fresh`` (a tool's new report) with the other tools' sections of ``path`` appended."""
    kept = sections(path.read_text()) if path.exists() else {}
    extra = [block for name, block in kept.items() if name != own]
    return fresh.rstrip("\n") + "\n" + "".join("\n" + b for b in extra) if extra else fresh
