"""The inference service: ``loom.infer.<model>`` -> result cache or Triton -> output tensors.

Per model: a part is routed to a version by the model's traffic policy in the
registry (:mod:`services.inference.router`; a model with no record goes to
Triton's default version), its inputs are looked up in the result cache under
that version; on a miss the part joins a micro-batch
(:mod:`services.inference.batcher`) of its version that goes to Triton as one
request. A policy's shadow version gets a copy (:mod:`services.inference.shadow`),
and :mod:`services.inference.control` makes Triton serve the registry's active
versions. What each model allows — Triton's max_batch_size and its default
version — is read from Triton at start and refreshed in the background, so the
service may start before Triton.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext

from services.common import envelope, subjects
from services.common.errors import DeadlineExceeded, InvalidArgument, LoomError
from services.common.events import TelemetryPublisher
from services.common.lifecycle import Runtime, Service
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.registry.store import RegistryStore
from services.common.retry import Backoff, retry
from services.common.stage import Handler, StageRunner, Stats
from services.inference import routing
from services.inference.batcher import MicroBatcher, compat_key, stack
from services.inference.breaker import TritonBreakers, deadline_error
from services.inference.cache import NOTE, ResultCache
from services.inference.control import ModelControl
from services.inference.models_api import ModelsApi
from services.inference.settings import InferenceSettings
from services.inference.shadow import ShadowMirror
from services.inference.triton import Outputs, TritonModels, TritonUnreachable, from_tensor, to_tensor

log = logging.getLogger(__name__)

Result = tuple[Outputs, str]  # one part's outputs and the model version that made them


@dataclass
class _Row:
    """One part waiting for its batch."""

    tensors: dict[str, np.ndarray]
    deadline: float  # time.monotonic()
    span: SpanContext
    version: str = ""  # asked of Triton; "" = its default; a batch holds one version only


@dataclass
class _Model:
    """What the service knows about one model, and its batcher."""

    name: str
    batcher: MicroBatcher[_Row, Result]
    batched: bool = True  # Triton takes a batch dimension (its max_batch_size > 0)
    version: str = ""  # the version Triton serves by default; "" = unknown: no cache
    known: bool = False  # max_batch_size read from Triton
    inflight: int = 0  # parts of this model being handled by this replica (routing rules)


class Inference(Service):
    name: ClassVar[str] = "inference"

    def __init__(self, settings: InferenceSettings) -> None:
        super().__init__(settings)
        self.inf = settings
        self.triton: TritonModels | None = None
        self.cache = ResultCache(
            enabled=settings.cache_enabled,
            bucket=settings.cache_bucket,
            ttl_s=settings.cache_ttl_s,
            max_value_bytes=settings.cache_max_value_bytes,
            timeout_s=settings.cache_timeout_ms / 1000.0,
        )
        self.models: dict[str, _Model] = {}
        self._refresher: asyncio.Task[None] | None = None
        self.registry: RegistryStore | None = None
        self.control: ModelControl | None = None
        self.shadow: ShadowMirror | None = None
        self.breakers = TritonBreakers(
            failures=settings.breaker_failures, reset_s=settings.breaker_reset_s, enabled=settings.breaker_enabled
        )
        self.retry_policy = Backoff(
            attempts=settings.retry_attempts,
            base_s=settings.retry_base_ms / 1000.0,
            cap_s=settings.retry_max_ms / 1000.0,
        )

    async def start(self, rt: Runtime) -> None:
        self.triton = TritonModels(self.inf.triton_url, reconnect_backoff_ms=self.inf.reconnect_backoff_ms)
        await self.cache.start(rt.bus.nc)
        self.registry = RegistryStore(rt.bus, self.inf.models_bucket, service=self.name)
        await self.registry.start(watch=True)
        self.shadow = ShadowMirror(
            self._run_shadow,
            TelemetryPublisher(rt.bus, self.name),
            max_inflight=self.inf.shadow_max_inflight,
            timeout_s=self.inf.shadow_timeout_s,
        )
        for model in self.inf.models:
            self.models[model] = self._new_model(model)
        # Learn what Triton allows now if it is up; otherwise batch nothing until the refresher learns it.
        await asyncio.gather(*(self._refresh(m) for m in self.models.values()))
        self._refresher = asyncio.create_task(self._keep_refreshing())
        for model in self.inf.models:
            # Input statistics from preprocess are reported with the version that served them (input drift).
            runner = StageRunner(
                rt.bus,
                self.name,
                subjects.infer(model),
                self._handler(model),
                claims=rt.claims,
                report_features=True,
                lane=rt.lane,
                pending_limit=rt.settings.stage_queue,
            )
            await runner.start()
        await ModelsApi(rt.bus, self.triton, self.inf.models, queue=self.name).start()
        self.control = ModelControl(
            rt.bus,
            self.triton,
            self.inf.models,
            self.registry,
            queue=self.name,
            timeout_s=self.inf.control_timeout_s,
            refresh_s=self.inf.model_refresh_s,
            hold_s=self.inf.control_hold_s,
        )
        await self.control.start()
        if self.inf.model_repository:
            log.info("Triton's model repository: %s", self.inf.model_repository)

    def _new_model(self, model: str) -> _Model:
        pad = model in self.inf.pad_models

        async def run(rows: list[_Row]) -> list[Result | BaseException]:
            return await self._run_batch(self.models[model], rows)

        batcher: MicroBatcher[_Row, Result] = MicroBatcher(
            run,
            max_batch_size=1,  # until Triton's config says more
            max_delay_s=self.inf.max_batch_delay_ms / 1000.0,
            key=lambda row: (row.version, compat_key(row.tensors, pad=pad)),
            name=model,
            dispatch_when_idle=self.inf.batch_when_busy_only,
        )
        return _Model(model, batcher)

    def _handler(self, model: str) -> Handler:
        async def handle(part: pb.Part) -> Stats:
            state = self.models[model]
            inputs = {name: from_tensor(t) for name, t in part.tensors.items()}  # bad input fails before the cache
            part.model = model
            state.inflight += 1
            try:
                route, stable = routing.route_part(self.registry, model, part, inputs, inflight=state.inflight)
                value, reason = await routing.with_fallback(
                    route, stable, lambda version: self._outputs(state, part, inputs, version)
                )
            finally:
                state.inflight -= 1
            part.ClearField("tensors")  # pass only the small result downstream
            for name, tensor in value.tensors.items():
                part.tensors[name].CopyFrom(tensor)
            part.model_version = value.model_version
            routing.record(part, reason)
            if route.shadow is not None and self.shadow is not None:
                self.shadow.mirror(model, route.shadow, inputs, value, part)
            return {}

        return handle

    async def _outputs(
        self, state: _Model, part: pb.Part, inputs: dict[str, np.ndarray], version: str
    ) -> pb.CachedOutputs:
        """One part's outputs from ``version`` ("" = Triton's default), from the cache when it has them."""
        part.model_version = version or state.version  # a failure is the routed version's
        lookup = await self.cache.lookup(state.name, version or state.version, part)
        if lookup.note:
            part.notes[NOTE] = lookup.note
        if lookup.value is None:
            remaining = envelope.remaining_s(part)
            span = trace.get_current_span().get_span_context()
            row = _Row(inputs, time.monotonic() + remaining, span, version)
            outputs, answered = await state.batcher.submit(row, timeout_s=remaining)
            if answered and not version:
                state.version = answered
            lookup.value = pb.CachedOutputs(
                model_version=answered, tensors={name: to_tensor(a) for name, a in outputs.items()}
            )
            self.cache.store(lookup, lookup.value)
        return lookup.value

    async def _run_shadow(
        self, model: str, version: str, inputs: Mapping[str, np.ndarray], timeout_s: float
    ) -> Outputs:
        """A shadow copy joins the micro-batches of its version (never a caller's batch: the key holds the version)."""
        state = self.models[model]
        span = trace.get_current_span().get_span_context()
        row = _Row(dict(inputs), time.monotonic() + timeout_s, span, version)
        outputs, _ = await state.batcher.submit(row, timeout_s=timeout_s)
        return outputs

    async def _run_batch(self, state: _Model, rows: list[_Row]) -> list[Result | BaseException]:
        assert self.triton is not None
        triton, version = self.triton, rows[0].version
        deadline = max(row.deadline for row in rows)  # the longest-waiting caller's
        links = [Link(row.span) for row in rows if row.span.is_valid]
        inputs = stack([row.tensors for row in rows]) if state.batched else rows[0].tensors

        async def infer() -> tuple[list[Outputs], str]:
            budget = deadline - time.monotonic()
            try:
                return await triton.infer(
                    state.name, inputs, batched=state.batched, timeout_s=budget, version=version, links=links
                )
            except DeadlineExceeded as exc:  # too little time left to blame Triton does not count
                raise deadline_error(exc, budget) from None

        try:
            # The breaker of the version asked for ("default": Triton's choice) fails fast while it is
            # open; before it opens, an unreachable Triton is retried (inference is idempotent), but
            # never past the earliest caller's deadline: each caller gets the real error in time.
            outputs, answered = await retry(
                lambda: self.breakers.call(state.name, version or "default", infer),
                policy=self.retry_policy,
                retryable=lambda exc: isinstance(exc, TritonUnreachable),
                deadline=min(row.deadline for row in rows),
                service=self.name,
                step="triton_infer",
            )
        except InvalidArgument:
            if len(rows) == 1:
                raise
            # The model rejected the request for one part's data (e.g. too many tokens):
            # that part must not fail its neighbours, so ask again one by one. Other
            # errors are not retried: they are outages or model failures, not one part's.
            singles = await asyncio.gather(*(self._run_batch(state, [row]) for row in rows), return_exceptions=True)
            return [s if isinstance(s, BaseException) else s[0] for s in singles]
        return [(out, answered) for out in outputs]

    async def _refresh(self, state: _Model) -> None:
        assert self.triton is not None
        try:
            info = await self.triton.model_info(state.name, timeout_s=1.0)
        except LoomError as exc:
            # Debug only: during a Triton outage this repeats every refresh, and parts report it anyway.
            log.debug("model %s: Triton did not say what it allows: %s", state.name, exc.message)
            return
        state.batched = info.max_batch_size > 0
        largest = 1 if state.name in self.inf.unbatched_models else self.inf.max_batch_size
        state.batcher.max_batch_size = max(1, min(largest, info.max_batch_size))
        if info.version:
            state.version = info.version
        if not state.known:
            log.info(
                "model %s: batches of up to %d, version %r", state.name, state.batcher.max_batch_size, state.version
            )
        state.known = True

    async def _keep_refreshing(self) -> None:
        while True:
            unknown = any(not m.known or not m.version for m in self.models.values())
            await asyncio.sleep(1.0 if unknown else self.inf.model_refresh_s)
            await asyncio.gather(*(self._refresh(m) for m in self.models.values()))

    async def stop(self) -> None:
        if self.control is not None:
            await self.control.stop()
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        for state in self.models.values():
            await state.batcher.close()
        if self.shadow is not None:
            await self.shadow.close()
        if self.registry is not None:
            await self.registry.stop()
        await self.cache.close()
        if self.triton is not None:
            await self.triton.close()
