"""The admin API's domain core: the model registry, traffic policy, rollouts and the audit log.

Transport-free like :class:`services.gateway.core.GatewayCore`: the gRPC
(``loom.v1.Admin``) and HTTP (``/v1/admin``) adapters decode, call a method
here and encode. The registry (JetStream KV) says what should be; the
inference service makes Triton match it (``loom.models.control``). Every
action appends one audit entry, whatever became of it: ``ok``, ``refused``
(nothing changed: the request was wrong or not allowed now) or ``failed``
(the work started and broke; what was started is undone where it can be).
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from services.common import auth, envelope, subjects
from services.common.audit import AuditLog
from services.common.bus import Bus
from services.common.errors import (
    Code,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    LoomError,
    NotFound,
    Unavailable,
)
from services.common.registry import ops
from services.common.registry.metadata import METADATA_FILE, copy_into_repository, load_version_dir
from services.common.registry.schema import (
    MODEL_NAME,
    VERSION,
    ModelRecord,
    Rollout,
    RolloutStep,
    Thresholds,
    TrafficPolicy,
)
from services.common.registry.store import RegistryStore, validation_message
from services.gateway.dlq import DeadLetters
from services.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

ANONYMOUS = "anonymous"
MAX_ACTOR = 128
#: The actor of entries the gateway writes on its own (seeding the registry at start).
SELF = "gateway"
MAX_AUDIT = 1000
#: Errors that mean "not allowed as asked": nothing was changed.
REFUSALS = frozenset({Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION, Code.ALREADY_EXISTS})


@dataclass(frozen=True)
class RolloutStatus:
    current: Rollout | None
    history: list[Rollout]


@dataclass
class _Entry:
    """The audit entry of one action, filled in while it runs."""

    details: dict[str, object] = field(default_factory=dict)
    #: Side effects began: an error from here on is "failed", not "refused".
    committed: bool = False


class _AlreadyRegistered(Exception):
    """Seeding found a record written meanwhile (another gateway replica): leave it."""


def parse(cls: type[M], data: object, what: str) -> M:
    """A request document validated into ``cls``; InvalidArgument saying what is wrong."""
    if isinstance(data, cls):
        return data
    if data is None:
        raise InvalidArgument(f"{what} is missing")
    if not isinstance(data, Mapping):
        raise InvalidArgument(f"{what} must be a JSON object")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise InvalidArgument(f"{what}: {validation_message(exc)}") from None


def actor_of(value: str) -> str:
    """The caller's name as given (trimmed, bounded), else ``anonymous``."""
    return value.strip()[:MAX_ACTOR] or ANONYMOUS


def caller() -> str:
    """Who acts: the authenticated principal of this call (an API key's id, a JWT's subject)."""
    principal = auth.current()
    return actor_of(principal.name if principal is not None else "")


def check_model(model: str) -> str:
    if not MODEL_NAME.match(model):
        raise InvalidArgument(f"model name {model!r} must match {MODEL_NAME.pattern}")
    return model


class AdminCore:
    def __init__(self, bus: Bus, registry: RegistryStore, audit: AuditLog, settings: GatewaySettings) -> None:
        self.bus = bus
        self.registry = registry
        self.audit = audit
        self.settings = settings
        # One admin change of a model at a time in this gateway (the registry's compare-and-set
        # covers other writers); a register waits for Triton, and a retire must not slip in between.
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.dead_letters = DeadLetters(bus)

    @property
    def repository(self) -> Path:
        return Path(self.settings.model_repository)

    # --- reads --------------------------------------------------------------------------------

    async def list_models(self) -> list[ModelRecord]:
        return await self.registry.list()

    async def get_model(self, model: str) -> ModelRecord:
        return await self.registry.get(model)

    async def rollout_status(self, model: str) -> RolloutStatus:
        rec = await self.registry.get(model)
        return RolloutStatus(rec.rollout, list(rec.history))

    async def audit_entries(self, *, limit: int = 100, model: str = "") -> list[dict[str, object]]:
        """The newest ``limit`` entries (oldest first); ``model``: only those about it or its versions."""
        if not 1 <= limit <= MAX_AUDIT:
            raise InvalidArgument(f"limit must be between 1 and {MAX_AUDIT}, not {limit}")
        if model:
            check_model(model)
        return await self.audit.list(limit=limit, target_prefix=model)  # "minilm" matches minilm/2, not minilm_x

    # --- dead letters -------------------------------------------------------------------------

    async def list_dead_letters(self, *, limit: int = 100, stage: str = "") -> list[dict[str, object]]:
        return await self.dead_letters.list(limit=limit, stage=stage)

    async def replay_dead_letter(self, seq: int, *, actor: str = ANONYMOUS) -> dict[str, object]:
        """Send a dead letter back to its subject for a fresh set of tries; audited as ``dlq.replay``."""

        async def work(entry: _Entry) -> dict[str, object]:
            letter = await self.dead_letters.replay(seq)
            entry.committed = True
            entry.details.update({"subject": letter["subject"], "reason": letter["reason"]})
            return letter

        return await self._act("dlq.replay", actor, f"dlq/{seq}", work)

    # --- the audit trail ----------------------------------------------------------------------

    async def record(
        self, action: str, actor: str, target: str, result: str, details: Mapping[str, object] | None = None
    ) -> None:
        """Append one audit entry; a broken audit stream is logged, never hides the action's own outcome."""
        await self.audit.record(action, actor=actor, target=target, result=result, details=details)

    async def refused(self, action: str, actor: str, target: str, err: LoomError) -> None:
        """An attempt an adapter refused before reaching the core (a malformed body)."""
        await self.record(action, actor, target, "refused", {"error": err.message})

    async def _act(self, action: str, actor: str, target: str, work: Callable[[_Entry], Awaitable[T]]) -> T:
        entry = _Entry()
        try:
            out = await work(entry)
        except BaseException as exc:
            if isinstance(exc, LoomError):
                result = "refused" if exc.code in REFUSALS and not entry.committed else "failed"
                message = exc.message
            elif isinstance(exc, Exception):
                result, message = "failed", f"internal error ({type(exc).__name__})"
            else:  # cancelled: the caller went away; what ran is still worth an entry
                result, message = "failed", "cancelled"
            await self.record(action, actor, target, result, {**entry.details, "error": message})
            raise
        await self.record(action, actor, target, "ok", entry.details)
        return out

    # --- Triton, through the inference service --------------------------------------------------

    async def _control(self, model: str, versions: Sequence[str]) -> list[str]:
        """Make Triton serve exactly ``versions`` of ``model``; the versions ready afterwards."""
        payload = json.dumps({"model": model, "versions": list(versions)}).encode()
        reply = await self.bus.request(
            subjects.model_query("control"), payload, timeout=self.settings.control_timeout_s
        )
        try:
            ready = [str(v) for v in json.loads(reply.data)["ready"]]
        except (ValueError, KeyError, TypeError):
            raise Internal(f"the inference service's answer to loading {model!r} is unreadable") from None
        missing = sorted(set(versions) - set(ready), key=int)
        if missing:
            raise Unavailable(f"Triton did not make version(s) {', '.join(missing)} of {model!r} ready")
        return ready

    async def _restore(self, model: str, versions: list[str], cause: BaseException) -> None:
        """After a failed load, ask for the versions served before (best effort; the reconcile loop also does)."""
        if not versions or isinstance(cause, DeadlineExceeded):
            return  # nothing served before, or the inference service is not answering in time anyway
        try:
            await self._control(model, versions)
        except Exception as exc:
            log.warning("restoring versions %s of %r after a failed load failed too: %s", versions, model, exc)

    # --- actions ------------------------------------------------------------------------------

    async def _current(self, model: str) -> ModelRecord | None:
        try:
            return await self.registry.get(model)
        except NotFound:
            return None

    def _require(self, model: str, rec: ModelRecord | None) -> ModelRecord:
        if rec is None:
            raise NotFound(f"model {model!r} is not registered; register a version first")
        return rec

    async def register(
        self, model: str, source: str, *, version: str = "", notes: str = "", actor: str = ANONYMOUS
    ) -> ModelRecord:
        """Register the version folder ``source``: copy it into the repository, load it, record it.

        It takes no traffic until a traffic policy or a rollout sends some. On any failure
        what was copied is removed and the registry is left as it was.
        """
        target = f"{model}/{version or Path(source).name}"

        async def work(entry: _Entry) -> ModelRecord:
            check_model(model)
            src = Path(source)
            if not src.is_absolute():
                raise InvalidArgument(f"source {source!r} must be an absolute path the gateway can read")
            if not src.is_dir():
                raise InvalidArgument(f"source {source!r} is not a directory the gateway can read")
            if version and not VERSION.match(version):
                raise InvalidArgument(f"version {version!r} is not a Triton version number (a positive integer)")
            if not (self.repository / model / "config.pbtxt").is_file():
                raise NotFound(
                    f"model {model!r} is not in the model repository {self.repository} (no {model}/config.pbtxt); "
                    "add the model's folder and config first"
                )
            meta = await asyncio.to_thread(load_version_dir, src, version=version or None)
            if notes:
                meta = meta.model_copy(update={"notes": notes})
            entry.details.update(semver=meta.semver, source=str(src), artifacts=dict(meta.artifacts))
            async with self._locks[model]:
                current = await self._current(model)
                now = envelope.now_ms()
                ops.register(current, model, meta, now)  # refused here, before anything is copied
                dest, copied = await asyncio.to_thread(copy_into_repository, src, self.repository, model, meta.version)
                entry.committed = True
                previous = current.active_versions() if current is not None else []
                try:
                    await self._control(model, sorted({*previous, meta.version}, key=int))
                    return await self.registry.update(model, lambda rec: ops.register(rec, model, meta, now))
                except BaseException as exc:
                    if copied:
                        await asyncio.to_thread(shutil.rmtree, dest, True)
                    if isinstance(exc, Exception):
                        await self._restore(model, previous, exc)
                    raise

        return await self._act("model.register", actor, target, work)

    async def retire(self, model: str, version: str, *, actor: str = ANONYMOUS) -> ModelRecord:
        """Retire ``version`` in the registry, then have Triton unload it (its files stay)."""

        async def work(entry: _Entry) -> ModelRecord:
            check_model(model)
            async with self._locks[model]:
                now = envelope.now_ms()
                rec = await self.registry.update(model, lambda r: ops.retire(self._require(model, r), version, now))
                entry.committed = True
                try:
                    await self._control(model, rec.active_versions())
                except LoomError as exc:
                    raise type(exc)(
                        f"version {version} of {model!r} is retired in the registry, but Triton did not confirm "
                        f"unloading it ({exc.message}); the inference service keeps reconciling",
                        code=exc.code,
                    ) from None
                return rec

        return await self._act("model.retire", actor, f"{model}/{version}", work)

    async def _change(
        self,
        action: str,
        actor: str,
        target: str,
        model: str,
        change: Callable[[ModelRecord, int], ModelRecord],
        *,
        reason: str = "",
    ) -> ModelRecord:
        """One registry write through an :mod:`ops` transition, audited."""

        async def work(entry: _Entry) -> ModelRecord:
            if reason:
                entry.details["reason"] = reason
            check_model(model)
            async with self._locks[model]:
                now = envelope.now_ms()
                rec = await self.registry.update(model, lambda r: change(self._require(model, r), now))
            entry.details["stable"] = rec.stable
            if rec.rollout is not None and action.startswith("rollout."):
                entry.details["rollout"] = rec.rollout.id
            return rec

        return await self._act(action, actor, target, work)

    async def set_traffic(self, model: str, policy: object, *, actor: str = ANONYMOUS) -> ModelRecord:
        async def work(entry: _Entry) -> ModelRecord:
            entry.details["policy"] = policy.model_dump(mode="json") if isinstance(policy, BaseModel) else policy
            check_model(model)
            parsed = parse(TrafficPolicy, policy, "traffic policy")
            async with self._locks[model]:
                now = envelope.now_ms()
                return await self.registry.update(
                    model, lambda rec: ops.set_traffic(self._require(model, rec), parsed, now)
                )

        return await self._act("traffic.set", actor, model, work)

    def default_steps(self) -> list[RolloutStep]:
        s = self.settings
        return [
            RolloutStep(weight=w, min_requests=s.rollout_min_requests, window_s=s.rollout_window_s)
            for w in s.rollout_steps
        ]

    def _steps(self, steps: Sequence[object] | None) -> list[RolloutStep]:
        """The plan asked for (a step's missing fields from the gateway's defaults), else the default plan."""
        if not steps:
            return self.default_steps()
        plan = []
        for i, step in enumerate(steps):
            if not isinstance(step, Mapping):
                raise InvalidArgument(f'steps[{i}] must be an object like {{"weight": 10}}')
            filled = {"min_requests": self.settings.rollout_min_requests, "window_s": self.settings.rollout_window_s}
            plan.append(parse(RolloutStep, {**filled, **step}, f"steps[{i}]"))
        return plan

    async def start_rollout(
        self,
        model: str,
        version: str,
        *,
        steps: Sequence[object] | None = None,
        thresholds: object = None,
        actor: str = ANONYMOUS,
    ) -> Rollout:
        async def work(entry: _Entry) -> Rollout:
            check_model(model)
            plan = self._steps(steps)
            entry.details["steps"] = [s.weight for s in plan]
            limits = parse(Thresholds, thresholds, "thresholds") if thresholds else None
            async with self._locks[model]:
                now = envelope.now_ms()
                rec = await self.registry.update(
                    model,
                    lambda r: ops.start_rollout(
                        self._require(model, r), version, now, steps=plan, thresholds=limits, actor=actor
                    ),
                )
            rollout = _rollout(rec)
            entry.details["rollout"] = rollout.id
            return rollout

        return await self._act("rollout.start", actor, f"{model}/{version}", work)

    async def pause_rollout(self, model: str, reason: str = "", *, actor: str = ANONYMOUS) -> Rollout:
        why = reason or f"paused by {actor}"
        rec = await self._change(
            "rollout.pause", actor, model, model, lambda r, now: ops.pause(r, why, now), reason=reason
        )
        return _rollout(rec)

    async def resume_rollout(self, model: str, *, actor: str = ANONYMOUS) -> Rollout:
        return _rollout(await self._change("rollout.resume", actor, model, model, ops.resume))

    async def abort_rollout(self, model: str, reason: str = "", *, actor: str = ANONYMOUS) -> Rollout:
        rec = await self._change(
            "rollout.abort", actor, model, model, lambda r, now: ops.abort(r, reason, now, actor=actor), reason=reason
        )
        return _rollout(rec)

    async def promote(self, model: str, version: str = "", *, actor: str = ANONYMOUS) -> ModelRecord:
        """Make ``version`` stable now (default: the active rollout's canary)."""
        target = f"{model}/{version}" if version else model
        return await self._change(
            "model.promote",
            actor,
            target,
            model,
            lambda r, now: ops.promote(r, version or None, now, reason=f"promoted by {actor}"),
        )

    async def rollback(self, model: str, reason: str = "", *, actor: str = ANONYMOUS) -> ModelRecord:
        """All traffic back to stable now; an active rollout ends as rolled back."""
        return await self._change(
            "model.rollback",
            actor,
            model,
            model,
            lambda r, now: ops.rollback(r, reason, now, actor=actor),
            reason=reason,
        )

    # --- start --------------------------------------------------------------------------------

    async def seed(self) -> list[str]:
        """Register every repository model with versioned metadata that the registry lacks.

        Its lowest such version becomes its stable version, in KV only: Triton already
        loads that version from the model's config. A model whose metadata is broken is
        logged and skipped, so one bad folder does not keep the gateway down.
        """
        seeded: list[str] = []
        if not self.repository.is_dir():
            log.warning("model repository %s does not exist: no model registered at start", self.repository)
            return seeded
        for folder in sorted(p for p in self.repository.iterdir() if p.is_dir() and MODEL_NAME.match(p.name)):
            versions = sorted(
                (d for d in folder.iterdir() if d.is_dir() and VERSION.match(d.name) and (d / METADATA_FILE).is_file()),
                key=lambda d: int(d.name),
            )
            if versions and await self._current(folder.name) is None and await self._seed_one(folder.name, versions[0]):
                seeded.append(folder.name)
        return seeded

    async def _seed_one(self, model: str, folder: Path) -> bool:
        try:
            meta = await asyncio.to_thread(load_version_dir, folder)
            now = envelope.now_ms()

            def change(rec: ModelRecord | None) -> ModelRecord:
                if rec is not None:
                    raise _AlreadyRegistered
                return ops.register(None, model, meta, now)

            await self.registry.update(model, change)
        except _AlreadyRegistered:
            return False
        except LoomError as exc:
            log.error("model %r not registered at start: %s", model, exc.message)
            return False
        details = {"seeded": True, "semver": meta.semver, "source": str(folder), "stable": meta.version}
        await self.record("model.register", SELF, f"{model}/{meta.version}", "ok", details)
        log.info("registered %s version %s (%s) as stable from %s", model, meta.version, meta.semver, folder)
        return True


def _rollout(rec: ModelRecord) -> Rollout:
    if rec.rollout is None:  # every rollout transition leaves one
        raise Internal(f"model {rec.name!r} has no rollout after a rollout change")
    return rec.rollout
