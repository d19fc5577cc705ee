"""The audit log: who changed which model, when, from where, and what the rollout controller decided.

Entries go to the JetStream stream ``LOOM_AUDIT`` (file storage), created with
``deny_delete``, ``deny_purge`` and ``discard: new``: once written, an entry
cannot be removed through the NATS API, and nothing ages out. A full stream
refuses new entries instead of dropping old ones. A service refuses to start
against an existing stream that allows deletes or purges, because its entries
could then vanish without trace (one made before ``discard: new`` only gets a
warning: ``nats stream edit LOOM_AUDIT --discard new`` switches it).

Refused calls (``auth.*``, written by every service, rate-bounded per source)
share the stream with admin actions and rollout decisions, so they must never
take the room the others need: once the stream is more than ``1 - RESERVE``
full, refusals are no longer written, only counted
(``loom_audit_skipped_total{reason="full"}``), and the last tenth stays for
admin entries. ``loom_audit_stream_fill_ratio`` says how full it is.

Because entries cannot be removed, PII never goes in: the actor, target,
result, details and source of every entry are masked
(:func:`services.common.pii.mask_value`) before it is written.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError
from prometheus_client import Counter, Gauge

from services.common import auth, subjects
from services.common.bus import Bus
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.pii import mask, mask_value

log = logging.getLogger(__name__)

STREAM = "LOOM_AUDIT"
SUBJECTS = subjects.AUDIT_ALL
MAX_BYTES = 1 << 30  # 1 GiB; a full stream refuses new entries (discard new), it never drops old ones
#: What an entry's action may begin with, one subject each (subjects.audit; deploy/asyncapi.yaml lists them).
KINDS = ("auth", "model", "traffic", "rollout", "dlq", "pipeline", "monitor")
#: Refused calls, written by every service for anyone who knocks: the kind that must not fill the stream.
AUTH = "auth"
#: The share of max_bytes kept for admin actions and rollout decisions: refusals stop at 90 % full.
RESERVE = 0.10
FILL_TTL_S = 5.0  # how long one reading of the stream's fill is trusted
LIST_MAX = 1000  # most entries one list() returns
SCAN_MAX = 10_000  # most entries one filtered list() reads before it stops looking
_WINDOW = 200  # entries read per round trip batch
_ACTION = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")

FILL = Gauge("loom_audit_stream_fill_ratio", "How full LOOM_AUDIT is (bytes / max_bytes), as last read here.")
SKIPPED = Counter(
    "loom_audit_skipped_total",
    "Audit entries not written: reason=full (a refused call while the stream is in its reserve for admin "
    "entries) or error (the write failed: NATS down, the stream missing or completely full).",
    ["reason"],
)


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


def stream_config(replicas: int = 1, max_bytes: int = MAX_BYTES) -> StreamConfig:
    """The stream as provisioning makes it (and a service, where NATS runs without authentication)."""
    return StreamConfig(
        name=STREAM,
        description="Loom audit log: admin actions, rollout decisions and refused calls (append-only)",
        subjects=[SUBJECTS],
        storage=StorageType.FILE,
        deny_delete=True,
        deny_purge=True,
        max_bytes=max_bytes,
        discard=DiscardPolicy.NEW,
        num_replicas=replicas,
    )


class AuditLog:
    """Appends entries to, and reads the newest back from, the ``LOOM_AUDIT`` stream."""

    def __init__(self, bus: Bus, *, service: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.bus = bus
        self.service = service
        self.clock = clock
        self._fill: float | None = None
        self._fill_at = float("-inf")

    @property
    def js(self) -> JetStreamContext:
        return self.bus.js

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
        if cfg.discard != DiscardPolicy.NEW:  # made before discard new: it still works, but drops old entries
            log.warning(
                "audit stream %s drops its oldest entries when full (discard %s); keep them with "
                "`nats stream edit %s --discard new`",
                STREAM,
                cfg.discard,
                STREAM,
            )

    async def fill(self) -> float | None:
        """How full the stream is (0..1), read at most every FILL_TTL_S; None when it cannot be read."""
        now = self.clock()
        if now - self._fill_at < FILL_TTL_S:
            return self._fill
        self._fill_at = now
        try:
            info = await self.js.stream_info(STREAM)
        except Exception as exc:  # not there yet, NATS away: refusals are written (and fail) as before
            log.debug("audit stream %s fill unknown: %s", STREAM, exc)
            self._fill = None
            return None
        limit = info.config.max_bytes or 0
        self._fill = info.state.bytes / limit if limit > 0 else 0.0
        FILL.set(self._fill)
        return self._fill

    async def has_room(self, action: str) -> bool:
        """Whether an entry of ``action`` may go in: refusals only while the stream is below its reserve."""
        if action.split(".", 1)[0] != AUTH:
            return True  # admin entries and rollout decisions need no look at the fill
        fill = await self.fill()
        return fill is None or fill < 1.0 - RESERVE

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

        A refused call (``auth.*``) while the stream is in its reserve is not written: 0, counted.
        Everything but the action and the time is masked for PII first (keys of ``details`` too).
        """
        if not _ACTION.match(action):
            raise InvalidArgument(f"audit action {action!r} must be dotted words like rollout.start")
        if action.split(".", 1)[0] not in KINDS:
            raise InvalidArgument(f"audit action {action!r} must begin with one of {', '.join(KINDS)}")
        if not await self.has_room(action):
            SKIPPED.labels("full").inc()
            return 0
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
        try:
            ack = await self.js.publish(subjects.audit(action), payload, stream=STREAM)
        except Exception:
            SKIPPED.labels("error").inc()
            raise
        return int(ack.seq)

    async def record(
        self,
        action: str,
        *,
        actor: str,
        target: str = "",
        result: str = "ok",
        details: Mapping[str, object] | None = None,
    ) -> None:
        """Append the entry of an admin action, with the caller's tenant and address (bound by the access layer).

        A broken audit stream is logged, never raised: it must not hide the action's own outcome.
        """
        principal = auth.current()
        if principal is not None:  # the caller's tenant goes with every entry it causes
            details = {**(details or {}), "tenant": principal.tenant}
        try:
            await self.append(action, actor=actor, target=target, result=result, details=details, source=auth.source())
        except Exception:
            log.exception("audit entry %s %s by %s (%s) could not be written", action, target, actor, result)

    async def _read(self, lo: int, hi: int) -> list[dict[str, object]]:
        """Entries with sequence ``lo``..``hi`` (both included), oldest first; gaps skipped."""

        async def one(seq: int) -> dict[str, object] | None:
            try:
                msg = await self.js.get_msg(STREAM, seq=seq)
            except NotFoundError:  # gone (a stream made before discard new ages entries out)
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
