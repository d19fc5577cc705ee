"""NATS subject names, in one place.

Every subject Loom uses is built here, so no module spells ``loom.`` by hand.
"""

from __future__ import annotations

import zlib

PREFIX = "loom"
TELEMETRY_ALL = f"{PREFIX}.tel.>"


def pre(modality: str) -> str:
    """Preprocessing for one input modality, e.g. ``loom.pre.text``."""
    return f"{PREFIX}.pre.{modality}"


def infer(model: str) -> str:
    """Inference on one model, e.g. ``loom.infer.minilm``."""
    return f"{PREFIX}.infer.{model}"


def post(task: str) -> str:
    """Postprocessing for one task, e.g. ``loom.post.embed``."""
    return f"{PREFIX}.post.{task}"


def fuse(partition: int) -> str:
    """One fusion partition: every part of a request meets on the same one."""
    return f"{PREFIX}.fuse.{partition}"


def fuse_partition(request_id: str, partitions: int) -> int:
    """The partition that owns ``request_id`` (stable across processes)."""
    return zlib.crc32(request_id.encode()) % max(1, partitions)


def telemetry(service: str) -> str:
    """Where ``service`` publishes its per-message telemetry events."""
    return f"{PREFIX}.tel.{service}"


def feedback(pipeline: str) -> str:
    """Ground truth for a pipeline's answers (``loom.v1.Feedback``), e.g. ``loom.fb.content``."""
    return f"{PREFIX}.fb.{pipeline}"


FEEDBACK_ALL = f"{PREFIX}.fb.*"


def alert(severity: str) -> str:
    """Where the monitor announces alerts of one severity, e.g. ``loom.alert.p1``."""
    return f"{PREFIX}.alert.{severity.lower()}"


def audit(action: str) -> str:
    """Where an audit entry of ``action`` goes: its first word, e.g. ``model.register`` -> ``loom.audit.model``."""
    return f"{PREFIX}.audit.{action.split('.', 1)[0]}"


AUDIT_ALL = f"{PREFIX}.audit.>"


def last_token(subject: str) -> str:
    """``loom.infer.minilm`` -> ``minilm``."""
    return subject.rsplit(".", 1)[-1]


def model_query(op: str) -> str:
    """Questions about a Triton model answered by the inference service, e.g. ``loom.models.metadata``.

    Request/reply: the payload is the model name; the reply is Triton's own
    protobuf answer (``inference.ModelMetadataResponse``, ...) or NATS error headers.
    """
    return f"{PREFIX}.models.{op}"
