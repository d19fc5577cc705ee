"""The audit log: who changed which model, when, and what the rollout controller decided.

Entries go to the JetStream stream ``LOOM_AUDIT`` (file storage), created with
``deny_delete`` and ``deny_purge``: once written, an entry cannot be removed
through the NATS API, only aged out by the size limit (oldest first). A service
refuses to start against an existing stream that allows either, because its
entries could then vanish without trace. Because they cannot be removed, PII
never goes in: the actor, target, result, details and source of every entry
are masked (:func:`services.common.pii.mask_value`) before it is written.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Mapping
from datetime import UTC, datetime

from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError

from services.common.bus import Bus
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.pii import mask, mask_value

log = logging.getLogger(__name__)

STREAM = "LOOM_AUDIT"
SUBJECTS = "loom.audit.>"
SUBJECT_PREFIX = "loom.audit."
MAX_BYTES = 1 << 30  # 1 GiB; beyond it the oldest entries go
LIST_MAX = 1000  # most entries one list() returns
SCAN_MAX = 10_000  # most entries one filtered list() reads before it stops looking
_WINDOW = 200  # entries read per round trip batch
_ACTION = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _masked_str(value: object) -> str:
    """What JSON cannot hold (a datetime, a model) goes in as its masked ``str``."""
    return mask(str(value))


def matches(target: str, prefix: str) -> bool:
    """Whether an entry's target belongs to ``prefix``: a model matches itself and ``model/<version>``.

    ``minilm`` matches ``minilm`` and ``minilm/2`` but not ``minilm_faulty``;
    a prefix ending in ``/`` matches by plain prefix.
    """
    if not prefix:
        return True
    return target == prefix or target.startswith(prefix if prefix.endswith("/") else prefix + "/")


def stream_config(replicas: int = 1) -> StreamConfig:
    """The stream as provisioning makes it (and a service, where NATS runs without authentication)."""
    return StreamConfig(
        name=STREAM,
        description="Loom audit log: admin actions and rollout decisions (append-only)",
        subjects=[SUBJECTS],
        storage=StorageType.FILE,
        deny_delete=True,
        deny_purge=True,
        max_bytes=MAX_BYTES,
        discard=DiscardPolicy.OLD,
        num_replicas=replicas,
    )


class AuditLog:
    """Appends entries to, and reads the newest back from, the ``LOOM_AUDIT`` stream."""

    def __init__(self, bus: Bus, *, service: str) -> None:
        self.bus = bus
        self.service = service

    @property
    def js(self) -> JetStreamContext:
        return self.bus.nc.jetstream()

    def _config(self) -> StreamConfig:
        return stream_config()

    async def start(self) -> None:
        """Create the stream, or check that the existing one refuses deletes and purges."""
        try:
            info = await self.js.stream_info(STREAM)
        except NotFoundError:
            try:
                await self.js.add_stream(self._config())
                log.info("audit stream %s created", STREAM)
                return
            except BadRequestError:  # another service created it first, maybe differently: check it
                info = await self.js.stream_info(STREAM)
        cfg = info.config
        if not (cfg.deny_delete and cfg.deny_purge):
            raise FailedPrecondition(
                f"audit stream {STREAM} exists but allows message deletes or purges; recreate it with "
                "deny_delete and deny_purge (nats stream edit cannot switch them off again, only on)"
            )
        if SUBJECTS not in (cfg.subjects or []):
            raise FailedPrecondition(f"audit stream {STREAM} does not take {SUBJECTS} (it has {cfg.subjects})")

    async def append(
        self,
        action: str,
        *,
        actor: str,
        target: str = "",
        result: str = "ok",
        details: Mapping[str, object] | None = None,
        source: str = "",
    ) -> int:
        """Append one entry on ``loom.audit.<first token of action>``; returns its stream sequence.

        Everything but the action and the time is masked for PII first (keys of ``details`` too).
        """
        if not _ACTION.match(action):
            raise InvalidArgument(f"audit action {action!r} must be dotted words like rollout.start")
        entry = {
            "time": _now(),
            "actor": mask(actor),
            "action": action,
            "target": mask(target),
            "result": mask(result),
            "details": mask_value(dict(details or {})),
            "source": mask(source),
            "service": self.service,
        }
        payload = json.dumps(entry, default=_masked_str, separators=(",", ":")).encode()
        ack = await self.js.publish(SUBJECT_PREFIX + action.split(".", 1)[0], payload, stream=STREAM)
        return int(ack.seq)

    async def _read(self, lo: int, hi: int) -> list[dict[str, object]]:
        """Entries with sequence ``lo``..``hi`` (both included), oldest first; gaps skipped."""

        async def one(seq: int) -> dict[str, object] | None:
            try:
                msg = await self.js.get_msg(STREAM, seq=seq)
            except NotFoundError:  # aged out (discard old) between the stream info and this read
                return None
            try:
                entry = json.loads(msg.data or b"")
            except ValueError:
                log.warning("audit entry %d is not JSON; skipped", seq)
                return None
            return {**entry, "seq": seq} if isinstance(entry, dict) else None

        entries = await asyncio.gather(*(one(seq) for seq in range(lo, hi + 1)))
        return [e for e in entries if e is not None]

    async def list(self, *, limit: int = 100, target_prefix: str = "") -> list[dict[str, object]]:
        """The newest ``limit`` entries (of ``target_prefix`` when given), oldest first, each with ``seq``.

        Reads backwards from the end of the stream in windows, so it costs what
        it returns; a filter reads at most SCAN_MAX entries looking for matches.
        """
        limit = max(0, min(limit, LIST_MAX))
        state = (await self.js.stream_info(STREAM)).state
        if limit == 0 or state.messages == 0:
            return []
        found: list[dict[str, object]] = []
        hi, scanned = state.last_seq, 0
        while hi >= state.first_seq and len(found) < limit and scanned < SCAN_MAX:
            lo = max(state.first_seq, hi - _WINDOW + 1, hi - (limit - len(found)) + 1 if not target_prefix else 0)
            window = await self._read(lo, hi)
            found = [e for e in window if matches(str(e.get("target", "")), target_prefix)] + found
            scanned += hi - lo + 1
            hi = lo - 1
        return found[-limit:]
