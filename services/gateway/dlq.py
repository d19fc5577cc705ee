"""Dead letters: list what the durable lane gave up on, and send a letter back where it came from.

A letter keeps the original payload and, in headers, why it died, the subject
it was bound for, and its place in the original stream. Replay publishes the
payload to that subject again under a fresh ``Nats-Msg-Id`` (the old one may
still be in the duplicate window), then deletes the letter; the message
starts over with a full set of tries. Every replay is audited.
"""

from __future__ import annotations

import base64
import contextlib
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError as JsNotFound

from services.common import durable
from services.common.bus import Bus
from services.common.errors import InvalidArgument, NotFound
from services.common.telemetry import inject

MAX_LIST = 1000
#: Most sequence numbers one list looks at (deleted letters leave gaps).
SCAN_MAX = 20_000
_KEEP_HEADERS = ("traceparent", "tracestate", "Loom-Route-Key", durable.DLQ_MSG_ID)


def _letter(seq: int, headers: dict[str, str], data: bytes, subject: str) -> dict[str, Any]:
    return {
        "seq": seq,
        "stage": subject.removeprefix(durable.dlq_subject("")),
        "subject": headers.get(durable.DLQ_SUBJECT, ""),
        "reason": headers.get(durable.DLQ_REASON, ""),
        "origin_stream": headers.get(durable.DLQ_STREAM_HDR, ""),
        "origin_seq": int(headers.get(durable.DLQ_SEQ, "0") or 0),
        "deliveries": int(headers.get(durable.DLQ_DELIVERIES, "0") or 0),
        "size": len(data),
        "preview_b64": base64.b64encode(data[:96]).decode(),
    }


class DeadLetters:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    @property
    def js(self) -> JetStreamContext:
        return self.bus.js

    async def list(self, *, limit: int = 100, stage: str = "") -> list[dict[str, Any]]:
        """The newest ``limit`` letters (oldest first), of one stage (e.g. ``infer_minilm``) or all."""
        if not 1 <= limit <= MAX_LIST:
            raise InvalidArgument(f"limit must be between 1 and {MAX_LIST}, not {limit}")
        try:
            info = await self.js.stream_info(durable.DLQ_STREAM)
        except JsNotFound:
            return []
        state = info.state
        found: list[dict[str, Any]] = []
        seq, scanned = state.last_seq, 0
        while seq >= max(1, state.first_seq) and len(found) < limit and scanned < SCAN_MAX:
            scanned += 1
            with contextlib.suppress(JsNotFound):
                msg = await self.js.get_msg(durable.DLQ_STREAM, seq)
                letter = _letter(seq, dict(msg.headers or {}), msg.data or b"", msg.subject or "")
                if not stage or letter["stage"] == stage:
                    found.append(letter)
            seq -= 1
        return found[::-1]

    async def replay(self, seq: int) -> dict[str, Any]:
        """Send letter ``seq`` back to its subject; returns the letter as it was."""
        try:
            msg = await self.js.get_msg(durable.DLQ_STREAM, seq)
        except JsNotFound:
            raise NotFound(f"no dead letter {seq} (replayed already, or aged out)") from None
        headers = dict(msg.headers or {})
        letter = _letter(seq, headers, msg.data or b"", msg.subject or "")
        target = letter["subject"]
        if not target.startswith(("loom.req.", "loom.work.")):
            raise InvalidArgument(f"dead letter {seq} has no durable subject to go back to ({target!r})")
        kept = inject({k: v for k, v in headers.items() if k in _KEEP_HEADERS})
        origin = headers.get(durable.DLQ_MSG_ID) or f"{letter['origin_stream']}:{letter['origin_seq']}"
        await durable.publish_once(self.js, target, msg.data or b"", f"{origin}~replay{seq}", kept)
        await self.js.delete_msg(durable.DLQ_STREAM, seq)
        return letter
