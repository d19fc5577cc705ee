"""Every LOOM_* variable a service reads is documented in README.md's configuration tables."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
from pydantic import AliasChoices

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("gateway", "preprocess", "inference", "postprocess", "fusion", "monitor")


def settings_variables() -> set[str]:
    """The environment names of every field of every service's settings class."""
    names: set[str] = set()
    for service in SERVICES:
        module = importlib.import_module(f"services.{service}.settings")
        for cls in vars(module).values():
            if not (isinstance(cls, type) and hasattr(cls, "model_fields") and cls.__module__ == module.__name__):
                continue
            prefix = str(cls.model_config.get("env_prefix", ""))
            for name, field in cls.model_fields.items():
                alias = field.validation_alias
                if isinstance(alias, AliasChoices):
                    names.update(choice for choice in alias.choices if isinstance(choice, str))
                elif isinstance(alias, str):
                    names.add(alias)
                else:
                    names.add((prefix + name).upper())
    return names


def undocumented(readme: str) -> list[str]:
    documented = set(re.findall(r"`(LOOM_[A-Z0-9_]+)`", readme))
    return sorted(settings_variables() - documented)


def test_every_setting_is_in_the_readme() -> None:
    assert len(settings_variables()) > 100  # the walk found the settings classes at all
    assert undocumented((ROOT / "README.md").read_text()) == []


def test_a_missing_row_is_caught() -> None:
    readme = (ROOT / "README.md").read_text().replace("`LOOM_MONITOR_CAPACITY_WINDOW_S`", "`LOOM_SOMETHING`")
    assert undocumented(readme) == ["LOOM_MONITOR_CAPACITY_WINDOW_S"]
