"""The model registry's documents: one :class:`ModelRecord` per model in JetStream KV.

Field names match ``protos/loom/v1/admin.proto`` one for one, so a record
converts to and from its protobuf with ``json_format`` and nothing else
(:func:`services.common.registry.convert`). Validation that needs only one
document lives here; rules that span documents (a version must exist before it
takes traffic, one rollout at a time) live in :mod:`services.common.registry.ops`.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

#: Semantic version 2.0.0 (no leading "v").
SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?$"
)
#: Model names are KV keys and NATS subject tokens.
MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
VERSION = re.compile(r"^[1-9]\d{0,8}$")  # Triton version folders are positive integers

VersionState = Literal["active", "retired"]
RolloutState = Literal["running", "paused", "succeeded", "rolled_back", "aborted"]
Verdict = Literal["pass", "fail", "wait"]


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def check_version(value: str) -> str:
    if not VERSION.match(value):
        raise ValueError(f"version {value!r} is not a Triton version number (a positive integer)")
    return value


VersionStr = Annotated[str, AfterValidator(check_version)]


class VersionMeta(_Doc):
    """One registered version: where it came from and what it is."""

    version: VersionStr  # the Triton version folder, e.g. "2"
    semver: str  # e.g. "2.0.0"
    artifacts: dict[str, str] = Field(default_factory=dict)  # artifact name -> sha256 hex
    training_data: str = ""
    metrics: dict[str, float] = Field(default_factory=dict)  # evaluation metrics
    created_by: str = ""
    created_at: str = ""  # RFC 3339, UTC
    notes: str = ""
    source: str = ""  # the directory it was registered from
    state: VersionState = "active"
    retired_at: str = ""

    @field_validator("semver")
    @classmethod
    def _semver(cls, value: str) -> str:
        if not SEMVER.match(value):
            raise ValueError(f"semver {value!r} is not a semantic version like 1.2.3")
        return value

    @field_validator("artifacts")
    @classmethod
    def _sha256(cls, value: dict[str, str]) -> dict[str, str]:
        for name, digest in value.items():
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"artifact {name!r}: {digest!r} is not a sha256 hex digest")
        return value


class Canary(_Doc):
    version: VersionStr
    weight: float = Field(ge=0, le=100)  # percent of requests


class Shadow(_Doc):
    """A version that receives a copy of requests; its answers go to telemetry only."""

    version: VersionStr
    percent: float = Field(default=100.0, ge=0, le=100)  # share of requests mirrored


class Experiment(_Doc):
    """An explicit A/B test: each arm (a version) takes its weight in percent; weights sum to 100."""

    name: str = Field(min_length=1, max_length=64)
    arms: dict[str, float]

    @field_validator("arms")
    @classmethod
    def _arms(cls, arms: dict[str, float]) -> dict[str, float]:
        if len(arms) < 2:
            raise ValueError("an experiment needs at least two arms")
        for version, weight in arms.items():
            check_version(version)
            if not 0 <= weight <= 100:
                raise ValueError(f"arm {version}: weight {weight} is outside 0-100")
        if abs(sum(arms.values()) - 100.0) > 1e-6:
            raise ValueError(f"arm weights must sum to 100, not {sum(arms.values())}")
        return arms


class RouteRule(_Doc):
    """Model complexity adaptation: send matching requests to a (lighter) version.

    A rule matches when its every given condition holds: the input has at most
    ``max_tokens`` tokens (real tokens: the attention mask's sum), and/or the
    inference replica has at least ``min_inflight`` parts of this model in
    flight (overload). Rules are tried in order before canary and experiment.
    """

    name: str = Field(min_length=1, max_length=64)
    version: VersionStr
    max_tokens: int | None = Field(default=None, ge=1)
    min_inflight: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _some_condition(self) -> RouteRule:
        if self.max_tokens is None and self.min_inflight is None:
            raise ValueError(f"rule {self.name!r} needs max_tokens or min_inflight")
        return self


class TrafficPolicy(_Doc):
    stable: VersionStr
    canary: Canary | None = None
    shadow: Shadow | None = None
    experiment: Experiment | None = None
    rules: list[RouteRule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> TrafficPolicy:
        if self.canary is not None and self.experiment is not None:
            raise ValueError("a policy has either a canary or an experiment, not both")
        if self.canary is not None and self.canary.version == self.stable:
            raise ValueError(f"the canary version {self.stable} is already the stable version")
        if self.shadow is not None and self.shadow.version == self.stable:
            raise ValueError(f"the shadow version {self.stable} is the stable version; shadow another one")
        return self

    def served(self) -> set[str]:
        """Versions that answer callers (or may): stable, canary, arms, rule targets."""
        out = {self.stable}
        if self.canary is not None:
            out.add(self.canary.version)
        if self.experiment is not None:
            out.update(self.experiment.arms)
        out.update(rule.version for rule in self.rules)
        return out

    def referenced(self) -> set[str]:
        """Every version the policy names, the shadow included."""
        return self.served() | ({self.shadow.version} if self.shadow is not None else set())


class RolloutStep(_Doc):
    weight: float = Field(gt=0, le=100)  # canary percent during this step
    min_requests: int = Field(default=200, ge=1)  # canary requests before the step may pass
    window_s: float = Field(default=300.0, ge=0)  # observation time before the step may pass


class Thresholds(_Doc):
    """When a canary fails its analysis (canary compared with stable)."""

    max_error_rate_diff: float = Field(default=0.01, ge=0, le=1)  # canary error rate - stable's
    max_p95_ratio: float = Field(default=1.5, gt=0)  # canary p95 / stable p95 ...
    min_p95_diff_ms: float = Field(default=20.0, ge=0)  # ... counts only when p95s differ by more than this
    max_output_psi: float = Field(default=0.2, ge=0)  # PSI of the canary's output scores vs stable's
    max_accuracy_drop: float = Field(default=0.05, ge=0, le=1)  # stable accuracy - canary accuracy
    min_feedback: int = Field(default=20, ge=1)  # judged answers per version before accuracy counts
    min_requests_to_fail: int = Field(default=20, ge=1)  # canary requests before a breach can fail a step


class Check(_Doc):
    name: str  # error_rate | latency_p95 | output_psi | accuracy | requests | window
    ok: bool
    value: float | None = None
    threshold: float | None = None
    detail: str = ""


class Analysis(_Doc):
    at_unix_ms: int
    step: int
    verdict: Verdict
    canary_requests: int = 0
    stable_requests: int = 0
    checks: list[Check] = Field(default_factory=list)


class Rollout(_Doc):
    id: str
    model: str
    version: str  # the canary being rolled out
    baseline: str  # the stable version when the rollout started
    steps: list[RolloutStep]
    thresholds: Thresholds = Field(default_factory=Thresholds)
    step: int = 0  # index into steps
    state: RolloutState = "running"
    started_by: str = ""
    started_at_unix_ms: int = 0
    step_started_at_unix_ms: int = 0
    finished_at_unix_ms: int = 0
    reason: str = ""  # why it ended or paused
    analysis: list[Analysis] = Field(default_factory=list)  # latest last, bounded

    @property
    def active(self) -> bool:
        return self.state in ("running", "paused")


class ModelRecord(_Doc):
    """Everything Loom knows about one model: the KV value under the model's name."""

    name: str
    versions: dict[str, VersionMeta] = Field(default_factory=dict)
    policy: TrafficPolicy
    rollout: Rollout | None = None  # the current (or last finished) rollout
    history: list[Rollout] = Field(default_factory=list)  # finished rollouts, latest last, bounded
    updated_at_unix_ms: int = 0

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not MODEL_NAME.match(value):
            raise ValueError(f"model name {value!r} must match {MODEL_NAME.pattern}")
        return value

    @property
    def stable(self) -> str:
        return self.policy.stable

    def active_versions(self) -> list[str]:
        """Versions Triton should serve, in numeric order."""
        return sorted((v for v, m in self.versions.items() if m.state == "active"), key=int)
