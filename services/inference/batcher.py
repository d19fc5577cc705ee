"""Micro-batching: concurrent parts for one model go to Triton as one request.

:class:`MicroBatcher` is the pure core. Callers ``await submit(item)``; items
that may share a batch (same :func:`compat_key`) are gathered until the batch
holds ``max_batch_size`` items or ``max_delay_s`` has passed since its first
one, whichever comes first; then ``run_batch(items)`` runs once for all of
them. This sits on top of Triton's own dynamic batcher: one request with a
batch dimension costs one gRPC call and one python-backend round trip instead
of one per part.

:func:`compat_key` and :func:`stack` say which tensors may travel together and
build the batch tensors (right-padding 1-D tensors where that is harmless).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np
from prometheus_client import Histogram

from services.common import metrics, subjects
from services.common.errors import DeadlineExceeded, Internal, Unavailable

log = logging.getLogger(__name__)

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

BATCH_SIZE = Histogram(
    "loom_inference_batch_size", "Parts per request sent to Triton.", ["model"], buckets=(1, 2, 4, 8, 16, 32, 64)
)
BATCH_DELAY = Histogram(
    "loom_inference_batch_delay_seconds",
    "Time from a batch's first part to its dispatch to Triton.",
    ["model"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05),
)


def compat_key(tensors: Mapping[str, np.ndarray], *, pad: bool) -> Hashable:
    """Items with equal keys may share a batch: same names, dtypes and shapes.

    With ``pad``, 1-D tensors of any length are compatible (:func:`stack` pads
    them) — but only when all of an item's 1-D tensors have one length, as the
    token tensors of one text do. An item whose own tensors disagree keeps its
    exact shapes, so it travels alone, unpadded, and Triton judges it.
    """
    lengths = {a.shape[0] for a in tensors.values() if a.ndim == 1}
    ragged = pad and len(lengths) == 1
    return tuple(
        sorted((name, a.dtype.str, (-1,) if ragged and a.ndim == 1 else a.shape) for name, a in tensors.items())
    )


def stack(rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One tensor per name with the rows on a new first axis.

    1-D tensors are right-padded with zeros (BYTES: empty) to the longest row; rows of equal
    :func:`compat_key` differ in nothing else.
    """
    out: dict[str, np.ndarray] = {}
    for name, first in rows[0].items():
        arrays = [row[name] for row in rows]
        if first.ndim == 1:
            shape = (len(arrays), max(a.shape[0] for a in arrays))
            batch = np.full(shape, b"", dtype=object) if first.dtype == np.object_ else np.zeros(shape, first.dtype)
            for i, a in enumerate(arrays):
                batch[i, : a.shape[0]] = a
            out[name] = batch
        else:
            out[name] = np.stack(arrays)
    return out


@dataclass
class _Pending(Generic[ItemT, ResultT]):
    started: float
    items: list[tuple[ItemT, asyncio.Future[ResultT]]] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


RunBatch = Callable[[list[ItemT]], Awaitable[Sequence[ResultT | BaseException]]]


class MicroBatcher(Generic[ItemT, ResultT]):
    """Gathers concurrent items into batches for ``run_batch``.

    ``run_batch`` gets the items of one batch and returns one result per item,
    in order; a result that is an exception is raised to that item's caller
    only. If ``run_batch`` itself raises, every caller of the batch gets it.
    """

    def __init__(
        self,
        run_batch: RunBatch[ItemT, ResultT],
        *,
        max_batch_size: int = 16,
        max_delay_s: float = 0.002,
        key: Callable[[ItemT], Hashable] = lambda _: None,
        name: str = "",
        dispatch_when_idle: bool = False,
        service: str = "inference",
        stage: str = "",
    ) -> None:
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        #: Send at once when no batch of this batcher is running: a lone request pays no
        #: batching delay, and under load the parts that arrive while a batch runs form the next.
        self.dispatch_when_idle = dispatch_when_idle
        self.key = key
        self.name = name
        #: Items whose caller gave up (its deadline passed) before their batch went count in
        #: ``loom_deadline_drops_total{service, stage}``; the stage is the model's subject by default.
        self.drops = metrics.DEADLINE_DROPS.labels(service, stage or (subjects.infer(name) if name else "batcher"))
        self._pending: dict[Hashable, _Pending[ItemT, ResultT]] = {}
        self._running: set[asyncio.Task[None]] = set()
        self._closed = False

    async def submit(self, item: ItemT, *, timeout_s: float | None = None) -> ResultT:
        """The item's result, or its exception; DeadlineExceeded after ``timeout_s``.

        A caller that gives up (deadline or cancellation) leaves its batch:
        before dispatch it is dropped from it, after dispatch its result is
        discarded; the other callers are not affected.
        """
        if self._closed:
            raise Unavailable("inference is shutting down")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[ResultT] = loop.create_future()
        key = self.key(item)
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = _Pending(loop.time())
            # call_later keeps this caller's context: the dispatch (and its
            # Triton span) runs in the trace of the batch's first part.
            pending.timer = loop.call_later(self.max_delay_s, self._dispatch, key)
        pending.items.append((item, fut))
        if len(pending.items) >= self.max_batch_size or (self.dispatch_when_idle and not self._running):
            self._dispatch(key)
        try:
            async with asyncio.timeout(timeout_s) as scope:
                return await fut  # cancelling this wait cancels fut: the batch skips it
        except TimeoutError:
            if scope.expired():
                raise DeadlineExceeded(f"inference {self.name}: deadline passed waiting for the batch") from None
            raise

    def _dispatch(self, key: Hashable) -> None:
        pending = self._pending.pop(key, None)
        if pending is None:
            return
        if pending.timer is not None:
            pending.timer.cancel()
        live = [(item, fut) for item, fut in pending.items if not fut.done()]
        if len(live) < len(pending.items):  # never sent: their callers' deadlines passed while they waited
            self.drops.inc(len(pending.items) - len(live))
        if not live:
            return
        BATCH_SIZE.labels(self.name).observe(len(live))
        BATCH_DELAY.labels(self.name).observe(asyncio.get_running_loop().time() - pending.started)
        task = asyncio.create_task(self._run(live))
        self._running.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if self.dispatch_when_idle and not self._running and not self._closed:
            for key in list(self._pending):  # what gathered while the model was busy goes now
                self._dispatch(key)

    async def _run(self, batch: list[tuple[ItemT, asyncio.Future[ResultT]]]) -> None:
        try:
            results = await self.run_batch([item for item, _ in batch])
            if len(results) != len(batch):
                raise Internal(f"inference {self.name}: {len(results)} results for a batch of {len(batch)}")
        except asyncio.CancelledError:
            # Only close() cancels a batch; its callers must still get an answer.
            _fail(batch, Unavailable("inference is shutting down"))
            raise
        except Exception as exc:  # every caller of the batch gets it
            _fail(batch, exc)
            return
        for (_, fut), result in zip(batch, results, strict=True):
            if fut.done():
                continue
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)

    async def close(self, grace_s: float = 5.0) -> None:
        """Dispatch what is pending, then wait up to ``grace_s`` for running batches."""
        self._closed = True
        for key in list(self._pending):
            self._dispatch(key)
        if self._running:
            _, late = await asyncio.wait(set(self._running), timeout=grace_s)
            for task in late:
                task.cancel()


def _fail(batch: Sequence[tuple[object, asyncio.Future[ResultT]]], exc: BaseException) -> None:
    for _, fut in batch:
        if not fut.done():
            fut.set_exception(exc)
