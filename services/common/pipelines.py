"""Pipeline specs: which inputs a pipeline takes and the stages each one visits.

The skeleton ships the ``embed`` pipeline built in; declarative YAML specs in
JetStream KV replace this registry in the multimodal work.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from services.common import subjects
from services.common.errors import NotFound

Modality = Literal["text"]


class InputSpec(BaseModel):
    modality: Modality
    #: Subjects the part visits before fusion, in order.
    stages: list[str]
    required: bool = True


class PipelineSpec(BaseModel):
    name: str
    inputs: dict[str, InputSpec]
    #: Default deadline of this pipeline; None means the gateway's default.
    deadline_ms: int | None = Field(None, gt=0)
    fusion: Literal["attach"] = "attach"


EMBED = PipelineSpec(
    name="embed",
    inputs={
        "text": InputSpec(
            modality="text",
            stages=[subjects.pre("text"), subjects.infer("minilm"), subjects.post("embed")],
        )
    },
)


class PipelineRegistry:
    def __init__(self, specs: list[PipelineSpec] | None = None) -> None:
        self._specs = {s.name: s for s in (specs if specs is not None else [EMBED])}

    def get(self, name: str) -> PipelineSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise NotFound(f"unknown pipeline {name!r}; known: {', '.join(sorted(self._specs))}") from None

    def metric_label(self, name: str) -> str:
        """``name`` if it is a pipeline, else ``_unknown``: callers can't grow label sets."""
        return name if name in self._specs else "_unknown"

    def names(self) -> list[str]:
        return sorted(self._specs)
