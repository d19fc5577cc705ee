"""Which versions Triton serves: ``loom.models.control`` requests and reconciliation with the registry.

Desired state lives in the model registry (a record's active versions);
Triton, in explicit model-control mode, serves what it was last told. This
module makes the two agree:

* ``loom.models.control`` (request/reply, queue group ``inference``): payload
  ``{"model": "minilm", "versions": ["1", "2"]}`` = serve exactly these;
  reply ``{"model": "minilm", "ready": ["1", "2"]}`` once all are ready, or
  NATS error headers with Triton's reason. The admin API asks before it
  registers a version, so the requested versions stand for ``hold_s`` (or
  until the registry agrees) before the registry is enforced again.
* Reconciliation: at start, when a record's active versions change, and
  every ``refresh_s`` when Triton's ready versions differ (a restarted Triton
  serves only what its config.pbtxt names). Failures back off and are logged
  once per distinct reason; Triton keeps serving the old versions meanwhile.

Only models this service serves are touched; a model with no record is left
as Triton has it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from nats.aio.msg import Msg

from services.common import subjects
from services.common.bus import Bus
from services.common.errors import InvalidArgument, LoomError, NotFound, as_loom_error, nats_headers
from services.common.registry.schema import VERSION, ModelRecord
from services.common.registry.store import RegistryStore
from services.inference.triton import TritonModels

log = logging.getLogger(__name__)

#: Longest pause between reconcile attempts of a model that keeps failing.
MAX_BACKOFF_S = 60.0


def parse_request(data: bytes) -> tuple[str, list[str]]:
    """``{"model": ..., "versions": [...]}`` -> (model, versions in numeric order); InvalidArgument otherwise."""
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidArgument('the control request must be JSON {"model": "...", "versions": ["1", ...]}') from None
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        raise InvalidArgument('the control request needs "model" (a string) and "versions" (a list)')
    versions = body.get("versions")
    if not isinstance(versions, list) or not versions:
        raise InvalidArgument(f'the control request for {body["model"]!r} needs "versions": a non-empty list')
    names = [str(v) for v in versions if isinstance(v, str | int) and not isinstance(v, bool)]
    bad = [v for v in versions if str(v) not in names or not VERSION.match(str(v))]
    if bad:
        raise InvalidArgument(f'versions must be positive integers like "1"; not {bad}')
    return body["model"], sorted(set(names), key=int)


@dataclass
class _Model:
    """Reconcile state of one model."""

    active: tuple[str, ...] | None = None  # the registry's active versions, as last seen
    hold: tuple[str, ...] | None = None  # versions a control request asked for ...
    hold_until: float = 0.0  # ... standing until then (time.monotonic())
    failures: int = 0
    retry_at: float = 0.0  # no periodic attempt before this (time.monotonic())
    last_error: str = ""
    due: bool = True  # reconcile at the next wake-up whatever the backoff


class ModelControl:
    """The control request handler and the reconcile loop of one inference replica."""

    def __init__(
        self,
        bus: Bus,
        triton: TritonModels,
        models: Sequence[str],
        registry: RegistryStore | None,
        *,
        queue: str,
        timeout_s: float,
        refresh_s: float,
        hold_s: float,
    ) -> None:
        self.bus = bus
        self.triton = triton
        self.models = list(models)
        self.registry = registry
        self.queue = queue
        self.timeout_s = timeout_s
        self.refresh_s = refresh_s
        self.hold_s = hold_s
        self._state = {m: _Model() for m in self.models}
        self._locks = {m: asyncio.Lock() for m in self.models}
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.registry is not None:
            for model, rec in self.registry.records.items():
                self._on_registry(model, rec)
            self.registry.on_change(self._on_registry)
        await self.bus.subscribe(subjects.model_query("control"), self._on_request, queue=self.queue)
        self._task = asyncio.create_task(self._loop(), name="inference-model-control")

    async def serve(self, model: str, versions: Sequence[str], *, hold: bool = False) -> list[str]:
        """Make Triton serve exactly ``versions`` of ``model``; nothing to do when it already does.

        ``hold``: once served, these versions stand for ``hold_s`` against the registry.
        """
        async with self._locks[model]:  # one load of a model at a time
            ready = await self._serve(model, versions)
            state = self._state[model]
            if hold:  # a request for what the registry says needs no hold, and ends an older one
                state.hold = tuple(ready) if tuple(ready) != state.active else None
                state.hold_until = time.monotonic() + self.hold_s
            return ready

    async def _serve(self, model: str, versions: Sequence[str]) -> list[str]:
        wanted = sorted(set(versions), key=int)
        before = await self.triton.ready_versions(model, timeout_s=5.0)
        if before == wanted:
            return before
        # Debug: a failing reconcile retries this; the outcome is logged once below or by the caller.
        log.debug("model %s: loading versions [%s] (Triton serves [%s])", model, ", ".join(wanted), ", ".join(before))
        ready = await self.triton.load_versions(model, wanted, timeout_s=self.timeout_s)
        log.info("model %s: Triton now serves versions [%s] (was [%s])", model, ", ".join(ready), ", ".join(before))
        return ready

    # ------------------------------------------------------------------ requests
    async def _on_request(self, msg: Msg) -> None:
        try:
            model, versions = parse_request(msg.data)
            if model not in self._state:
                raise NotFound(f"model {model!r} is not served; served: {', '.join(self.models)}")
            ready = await self.serve(model, versions, hold=True)
        except Exception as exc:  # every failure becomes error headers, never silence
            err = as_loom_error(exc)
            if err is not exc:
                log.exception("model control request failed")
            else:
                log.warning("model control request refused: %s", err.message)
            await self.bus.respond(msg, b"", nats_headers(err))
            return
        await self.bus.respond(msg, json.dumps({"model": model, "ready": ready}).encode())

    # ------------------------------------------------------------------ reconciliation
    def _on_registry(self, model: str, rec: ModelRecord | None) -> None:
        state = self._state.get(model)
        if state is None:
            return
        active = tuple(rec.active_versions()) if rec is not None else None
        if active == state.active:
            return  # traffic or rollout changes: Triton has nothing to do
        state.active = active
        if state.hold == active:
            state.hold = None  # the registry caught up with the control request
        state.due, state.failures = True, 0  # new desired state: try now, whatever failed before
        self._kick.set()

    def desired(self, model: str) -> tuple[str, ...] | None:
        """The versions ``model`` should have: a standing control request's, else the registry's."""
        state = self._state[model]
        if state.hold is not None and time.monotonic() < state.hold_until:
            return state.hold
        state.hold = None
        return state.active or None  # a record with no active version: leave Triton alone

    async def _loop(self) -> None:
        next_check = 0.0
        while True:
            timeout = max(0.0, min(next_check, *self._retry_times()) - time.monotonic())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._kick.wait()
            self._kick.clear()
            now = time.monotonic()
            periodic = now >= next_check
            if periodic:
                next_check = now + self.refresh_s
            for model, state in self._state.items():
                if state.due or (now >= state.retry_at and (periodic or state.failures > 0)):
                    state.due = False
                    await self._reconcile(model)

    def _retry_times(self) -> list[float]:
        return [s.retry_at for s in self._state.values() if s.failures] or [float("inf")]

    async def _reconcile(self, model: str) -> None:
        state = self._state[model]
        async with self._locks[model]:  # the target is read under the lock: a control request may just have won
            target = self.desired(model)
            if target is None:
                return
            try:
                await self._serve(model, target)
            except LoomError as exc:
                state.failures += 1
                state.retry_at = time.monotonic() + min(MAX_BACKOFF_S, 2.0 ** (state.failures - 1))
                if exc.message != state.last_error:  # one line per distinct reason, not per retry
                    log.warning("model %s: cannot serve versions [%s]: %s", model, ", ".join(target), exc.message)
                    state.last_error = exc.message
                return
            except Exception:
                state.failures += 1
                state.retry_at = time.monotonic() + MAX_BACKOFF_S
                log.exception("model %s: reconcile failed", model)
                return
        if state.failures:
            log.info("model %s: versions [%s] served again after %d failures", model, ", ".join(target), state.failures)
        state.failures, state.last_error = 0, ""

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
