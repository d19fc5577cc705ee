"""Pure fusion state: which parts of which request have arrived.

No NATS and no clock of its own (callers pass ``now``), so it is unit-tested
directly. Every strategy attaches each part's output under its input name;
``weighted`` also fuses the parts' label scores into the answer's ``topics``
(late fusion: a weighted mean over the parts that produced scores, weights
from the pipeline spec).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.pb.loom.v1 import fusion_pb2
from services.common.pipelines import PipelineSpec


@dataclass
class Pending:
    request_id: str
    pipeline: str
    reply_to: str
    part_ids: list[str]
    deadline_unix_ms: int
    parts: dict[str, pb.Part] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return all(p in self.parts for p in self.part_ids)


class Collector:
    def __init__(self, remember_ms: int = 30_000) -> None:
        self.pending: dict[str, Pending] = {}
        self._done: OrderedDict[str, int] = OrderedDict()
        self._remember_ms = remember_ms

    def add(self, part: pb.Part, now_ms: int) -> tuple[Pending | None, bool]:
        """Record a part. Returns (state, complete); state is None for a late or duplicate part."""
        self._forget(now_ms)
        if part.request_id in self._done:
            return None, False
        state = self.pending.get(part.request_id)
        if state is None:
            state = Pending(
                part.request_id,
                part.pipeline,
                part.reply_to,
                list(part.part_ids) or [part.part_id],
                part.deadline_unix_ms,
            )
            self.pending[part.request_id] = state
        state.parts.setdefault(part.part_id, part)
        return state, state.complete

    def answered(self, request_id: str) -> bool:
        """Whether the request was answered lately (its later parts are ignored)."""
        return request_id in self._done

    def finish(self, request_id: str, now_ms: int) -> Pending | None:
        """Take the request out (once); later parts of it are ignored."""
        state = self.pending.pop(request_id, None)
        if state is not None:
            self._done[request_id] = now_ms
        return state

    def _forget(self, now_ms: int) -> None:
        while self._done:
            _rid, at = next(iter(self._done.items()))
            if now_ms - at < self._remember_ms:
                break
            self._done.popitem(last=False)


def weighted_topics(parts: list[pb.Part], weights: dict[str, float], top_k: int) -> list[tuple[str, float]]:
    """Weighted mean of the parts' label scores; a label absent from a part counts 0 there."""
    totals: dict[str, float] = {}
    weight_sum = 0.0
    for part in parts:
        weight = weights.get(part.part_id, 1.0)
        if weight <= 0 or not part.label_scores:
            continue
        weight_sum += weight
        for label, score in part.label_scores.items():
            totals[label] = totals.get(label, 0.0) + weight * score
    if weight_sum == 0:
        return []
    fused = sorted(((label, total / weight_sum) for label, total in totals.items()), key=lambda x: (-x[1], x[0]))
    return fused[:top_k]


def fuse(state: Pending, spec: PipelineSpec | None = None) -> fusion_pb2.FusedResult:
    """Attach each part's output; fuse topics if the spec says so; name what is missing; fail if nothing came."""
    result = fusion_pb2.FusedResult()
    resp = result.response
    resp.request_id, resp.pipeline = state.request_id, state.pipeline
    for part_id in state.part_ids:
        part = state.parts.get(part_id)
        if part is None:
            resp.missing.append(part_id)
            continue
        for stage, ms in part.timings_ms.items():
            resp.timings_ms[stage] = max(resp.timings_ms.get(stage, 0.0), ms)
        for key, note in part.notes.items():
            resp.notes[f"{part_id}/{key}"] = note
        if part.HasField("error"):
            resp.missing.append(part_id)
            resp.errors[part_id].CopyFrom(part.error)
        else:
            resp.outputs[part_id].CopyFrom(part.output)
    if spec is not None and spec.fusion.strategy == "weighted":
        answered = [p for p in state.parts.values() if not p.HasField("error")]
        weights = {name: i.weight for name, i in spec.inputs.items()}
        for label, score in weighted_topics(answered, weights, spec.fusion.top_k):
            resp.topics.add(label=label, score=score)
    if not resp.outputs:
        errors = [state.parts[p].error for p in state.part_ids if p in state.parts and state.parts[p].HasField("error")]
        if errors:
            result.error.CopyFrom(errors[0])
        else:
            result.error.code, result.error.message = "DEADLINE_EXCEEDED", "no part finished before the deadline"
            result.error.service = "fusion"
    resp.degraded = bool(resp.missing) and bool(resp.outputs)
    return result
