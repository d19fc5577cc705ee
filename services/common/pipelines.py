"""Pipeline specs: which inputs a pipeline takes, the stages each one visits, how parts fuse.

A spec is declarative YAML (``deploy/pipelines/*.yaml``), validated here by
pydantic. Stages are short subject names (``pre.text``, ``infer.minilm``,
``post.embed``); a part visits them in order, then fusion. A stage list may
lead through several models (``infer.ocr`` -> ``post.ocr`` -> ``pre.text`` ->
``infer.minilm``): that is an inference chain, declared rather than coded.

The specs live in a JetStream KV bucket at run time (see
:mod:`services.common.pipeline_store`); this module is pure.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from services.common import subjects
from services.common.errors import InvalidArgument, NotFound

Modality = Literal["text", "image", "audio"]
NAME = r"^[a-z][a-z0-9_-]{0,62}$"
_NAME = re.compile(NAME)
_STAGE = re.compile(r"^(pre|infer|post)\.[a-z0-9][a-z0-9_-]{0,62}$")


class InputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    modality: Modality
    #: Stages the part visits before fusion, in order, e.g. ``[pre.text, infer.minilm, post.embed]``.
    stages: list[str] = Field(min_length=1)
    #: A request must carry every required input.
    required: bool = True
    #: This input's weight in weighted late fusion.
    weight: float = Field(1.0, ge=0.0)

    @field_validator("stages")
    @classmethod
    def _stage_names(cls, stages: list[str]) -> list[str]:
        for stage in stages:
            if not _STAGE.match(stage):
                raise ValueError(f"stage {stage!r} is not of the form pre.<name>, infer.<model> or post.<task>")
        return stages

    def subjects(self) -> list[str]:
        """The stages as NATS subjects (``pre.text`` -> ``loom.pre.text``)."""
        return [f"{subjects.PREFIX}.{stage}" for stage in self.stages]


class FusionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: ``attach``: each part's output as is. ``weighted``: also fuse the parts' label
    #: scores into ``topics`` (a weighted mean, weights from the inputs).
    strategy: Literal["attach", "weighted"] = "attach"
    #: How many fused topics the answer lists.
    top_k: int = Field(3, ge=1, le=100)


class SloSpec(BaseModel):
    """The pipeline's service-level objectives, as the monitor checks them."""

    model_config = ConfigDict(extra="forbid")

    #: 95 % of answers within this many milliseconds (end to end at the gateway).
    latency_p95_ms: float = Field(500.0, gt=0)
    #: Share of requests answered without a server-side error (degraded answers count as errors).
    success: float = Field(0.999, gt=0.0, lt=1.0)


class PipelineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME)
    description: str = ""
    inputs: dict[str, InputSpec] = Field(min_length=1)
    #: Default deadline of this pipeline; None means the gateway's default.
    deadline_ms: int | None = Field(None, gt=0, le=600_000)
    fusion: FusionSpec = FusionSpec()
    slo: SloSpec = SloSpec()
    #: Mask PII (phone numbers, e-mail addresses, resident IDs, card numbers) in the text the
    #: answer returns: OCR lines and an image's text (:mod:`services.common.pii`). Logs, spans,
    #: telemetry and the audit log are masked whatever this says.
    mask_pii: bool = False

    @field_validator("inputs")
    @classmethod
    def _input_names(cls, inputs: dict[str, InputSpec]) -> dict[str, InputSpec]:
        for name in inputs:
            if not _NAME.match(name):
                raise ValueError(f"input name {name!r} must match {NAME}")
        return inputs

    @model_validator(mode="after")
    def _weights(self) -> PipelineSpec:
        if self.fusion.strategy == "weighted" and not any(i.weight > 0 for i in self.inputs.values()):
            raise ValueError("weighted fusion needs at least one input with a weight above 0")
        return self


def parse_spec(text: str | bytes, *, name: str | None = None) -> PipelineSpec:
    """Parse and validate one YAML (or JSON) spec; raise InvalidArgument saying what is wrong."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"pipeline spec is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidArgument("pipeline spec must be a mapping with name, inputs, ...")
    if name is not None:
        data.setdefault("name", name)
        if data["name"] != name:
            raise InvalidArgument(f"pipeline spec names {data['name']!r} but is stored as {name!r}")
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg']}" for e in exc.errors())
        raise InvalidArgument(f"invalid pipeline spec: {problems}") from None


def to_yaml(spec: PipelineSpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json", exclude_defaults=False), sort_keys=False)


def load_dir(directory: str | Path) -> list[PipelineSpec]:
    """Every ``*.yaml`` spec in ``directory`` (the file name is the pipeline name)."""
    specs = []
    for path in sorted(Path(directory).glob("*.yaml")):
        try:
            specs.append(parse_spec(path.read_text(), name=path.stem))
        except InvalidArgument as exc:
            raise InvalidArgument(f"{path}: {exc.message}") from None
    return specs


def default_dir() -> Path:
    """``deploy/pipelines`` of this checkout."""
    return Path(__file__).resolve().parents[2] / "deploy" / "pipelines"


class PipelineRegistry:
    """The specs a service knows now, by name (the store keeps it current)."""

    def __init__(self, specs: list[PipelineSpec] | None = None) -> None:
        self._specs = {s.name: s for s in (specs if specs is not None else load_dir(default_dir()))}

    def get(self, name: str) -> PipelineSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise NotFound(f"unknown pipeline {name!r}; known: {', '.join(sorted(self._specs))}") from None

    def find(self, name: str) -> PipelineSpec | None:
        return self._specs.get(name)

    def set(self, spec: PipelineSpec) -> None:
        self._specs[spec.name] = spec

    def remove(self, name: str) -> None:
        self._specs.pop(name, None)

    def metric_label(self, name: str) -> str:
        """``name`` if it is a pipeline, else ``_unknown``: callers can't grow label sets."""
        return name if name in self._specs else "_unknown"

    def names(self) -> list[str]:
        return sorted(self._specs)
