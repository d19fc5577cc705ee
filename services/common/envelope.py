"""Helpers for the Part envelope: ids, deadlines and the routing slip."""

from __future__ import annotations

import re
import time
import uuid

from services.common.errors import InvalidArgument
from services.common.pb.loom.v1 import envelope_pb2 as pb

REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def now_ms() -> int:
    return int(time.time() * 1000)


def new_request_id() -> str:
    return uuid.uuid4().hex


def check_request_id(request_id: str) -> str:
    """Caller-chosen ids end up in subjects and keys: keep them plain."""
    if not REQUEST_ID.match(request_id):
        raise InvalidArgument("request_id must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'")
    return request_id


def remaining_s(part: pb.Part) -> float:
    """Seconds left before the part's deadline (negative when past it)."""
    return (part.deadline_unix_ms - now_ms()) / 1000.0


def expired(part: pb.Part) -> bool:
    return part.deadline_unix_ms > 0 and now_ms() >= part.deadline_unix_ms


def pop_step(part: pb.Part, subject: str) -> None:
    """Remove the step that routed the part here from the head of its slip."""
    if part.slip and part.slip[0] == subject:
        del part.slip[0]


def next_subject(part: pb.Part) -> str | None:
    """Where the part goes next: the slip's head, or on error its last step.

    The last step is fusion (or the caller's inbox): a failed part skips the
    remaining work but still reports, so fusion can answer without waiting
    for the deadline.
    """
    if not part.slip:
        return None
    if part.HasField("error"):
        del part.slip[:-1]
    return part.slip[0]


def add_timing(part: pb.Part, service: str, elapsed_ms: float) -> None:
    part.timings_ms[service] = part.timings_ms.get(service, 0.0) + elapsed_ms


#: ``Part.context`` keys: the factors preprocess scaled an image by, so OCR boxes map back to the pixels sent.
IMAGE_SCALE_X, IMAGE_SCALE_Y = "image.scale_x", "image.scale_y"
