"""The model registry in a JetStream KV bucket: one JSON :class:`ModelRecord` per model.

The gateway (admin API) and the monitor (rollout controller) both write the
same documents, so every write is compare-and-set on the key's revision: read,
apply a pure change (:mod:`services.common.registry.ops`), write with the
revision read, and on a conflict read again and retry. Readers that need the
current view at request speed (the inference router) start with ``watch`` and
follow the bucket into :attr:`RegistryStore.records`. A value that is not a
valid record (``nats kv put`` by hand) is logged, counted and ignored: the last
good record stays in force.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

from nats.js.api import KeyValueConfig
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from prometheus_client import Counter
from pydantic import ValidationError

from services.common.bus import Bus
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.common.kv_follow import BucketFollower, bucket_keys, open_bucket
from services.common.registry.schema import MODEL_NAME, ModelRecord

log = logging.getLogger(__name__)

BUCKET = "loom_models"
#: Earlier revisions of a record stay readable (``nats kv history``) for a repair by hand.
HISTORY = 10
#: Compare-and-set attempts before a write gives up; conflicts need a second writer at the same instant.
MAX_ATTEMPTS = 10

REGISTRY_UPDATES = Counter(
    "loom_registry_updates_total",
    "Model registry changes seen in KV by a watching service, by result (applied, rejected, deleted).",
    ["service", "result"],
)
REGISTRY_CONFLICTS = Counter(
    "loom_registry_write_conflicts_total",
    "Registry writes that lost a compare-and-set race and were retried.",
    ["service"],
)

ChangeFn = Callable[[ModelRecord | None], ModelRecord]
ChangeCallback = Callable[[str, ModelRecord | None], None]


def bucket_config(bucket: str = BUCKET, replicas: int = 1) -> KeyValueConfig:
    """The bucket as provisioning makes it (and a service, where NATS runs without authentication)."""
    return KeyValueConfig(bucket=bucket, history=HISTORY, description="Loom model registry", replicas=replicas)


def validation_message(exc: ValidationError) -> str:
    """A pydantic error as one line an operator can act on: ``policy.canary.weight: ...``."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        parts.append(f"{where}: {err['msg']}" if where else str(err["msg"]))
    return "; ".join(parts)


def decode(model: str, value: bytes | None) -> ModelRecord:
    """Parse a stored value; InvalidArgument when it is not a valid record of ``model``."""
    try:
        rec = ModelRecord.model_validate_json(value or b"")
    except ValidationError as exc:
        raise InvalidArgument(f"registry value of {model!r} is not a valid record: {validation_message(exc)}") from None
    if rec.name != model:
        raise InvalidArgument(f"registry value under key {model!r} names model {rec.name!r}")
    return rec


class RegistryStore:
    """Reads and compare-and-set writes of model records; optionally a live view of all of them."""

    def __init__(self, bus: Bus, bucket: str = BUCKET, *, service: str = "") -> None:
        self.bus = bus
        self.bucket = bucket
        self.service = service or bus.service
        #: The current valid record of every model (filled only with ``start(watch=True)``).
        self.records: dict[str, ModelRecord] = {}
        self._callbacks: list[ChangeCallback] = []
        self._kv: KeyValue | None = None
        self._follower: BucketFollower | None = None

    async def start(self, *, watch: bool = True) -> None:
        """Open the bucket (made if missing, where allowed); with ``watch``, load every record and follow changes."""
        js = self.bus.nc.jetstream()
        self._kv = await open_bucket(js, bucket_config(self.bucket))
        if not watch:
            return
        self._follower = BucketFollower(js, self._kv, self.bucket, self._on_entry, name=f"{self.service}-registry")
        await self._follower.start()

    def on_change(self, callback: ChangeCallback) -> None:
        """Call ``callback(model, record)`` on every accepted change (``None``: the model was deleted).

        Runs in the watch task: keep it quick and non-blocking.
        """
        self._callbacks.append(callback)

    @property
    def kv(self) -> KeyValue:
        if self._kv is None:
            raise Unavailable("the model registry is not open yet (RegistryStore.start() first)")
        return self._kv

    def _on_entry(self, key: str, value: bytes | None, operation: str | None, revision: int | None) -> None:
        if operation in (KV_DEL, KV_PURGE):
            self.records.pop(key, None)
            REGISTRY_UPDATES.labels(self.service, "deleted").inc()
            log.info("model %r removed from the registry (revision %s)", key, revision)
            self._notify(key, None)
            return
        try:
            rec = decode(key, value)
        except InvalidArgument as exc:
            REGISTRY_UPDATES.labels(self.service, "rejected").inc()
            kept = "keeping the previous record" if key in self.records else "model stays unregistered"
            log.error("registry revision %s of %r ignored (%s): %s", revision, key, kept, exc.message)
            return
        self.records[key] = rec
        REGISTRY_UPDATES.labels(self.service, "applied").inc()
        log.info("model %r registry record now at revision %s", key, revision)
        self._notify(key, rec)

    def _notify(self, key: str, rec: ModelRecord | None) -> None:
        for callback in self._callbacks:
            try:
                callback(key, rec)
            except Exception:  # one bad listener must not stop the watch
                log.exception("registry change callback failed for %r", key)

    async def _read(self, model: str) -> tuple[ModelRecord | None, int]:
        """The stored record (None when absent) and its revision (0 when absent).

        A stored value that is not a valid record falls back to the last good
        one this store has seen (watch mode), so a write repairs the key; with
        none known the operator has to repair or delete it by hand.
        """
        try:
            entry = await self.kv.get(model)
        except KeyNotFoundError:
            return None, 0
        try:
            return decode(model, entry.value), entry.revision or 0
        except InvalidArgument as exc:
            last_good = self.records.get(model)
            if last_good is None:
                raise FailedPrecondition(
                    f"{exc.message}; put a valid record or delete it (nats kv del {self.bucket} {model})"
                ) from None
            log.warning("%s; using the last good record", exc.message)
            return last_good.model_copy(deep=True), entry.revision or 0

    def _registered(self, names: list[str]) -> str:
        return ", ".join(sorted(names)) or "none"

    async def get(self, model: str) -> ModelRecord:
        """The stored record of ``model``; NotFound naming the registered models."""
        rec = None
        if MODEL_NAME.match(model):
            rec, _ = await self._read(model)
        if rec is None:
            names = [r.name for r in await self.list()]
            raise NotFound(f"model {model!r} is not registered; registered models: {self._registered(names)}")
        return rec

    async def _keys(self) -> list[str]:
        return await bucket_keys(self.bus.nc.jetstream(), self.bucket)

    async def list(self) -> list[ModelRecord]:
        """Every valid stored record, by name (invalid values are skipped with a log line)."""
        out = []
        for name in sorted(await self._keys()):
            try:
                rec, _ = await self._read(name)
            except FailedPrecondition as exc:
                log.error("%s", exc.message)
                continue
            if rec is not None:
                out.append(rec)
        return out

    async def update(self, model: str, change: ChangeFn) -> ModelRecord:
        """Read ``model``, apply ``change`` and write the result if nobody wrote in between.

        ``change`` gets the current record (None when absent) and returns the
        new one; when it raises, nothing is written and the error propagates
        (a pydantic ValidationError becomes InvalidArgument). On a revision
        conflict the read and the change are repeated, so ``change`` must be
        pure.
        """
        if not MODEL_NAME.match(model):
            raise InvalidArgument(f"model name {model!r} must match {MODEL_NAME.pattern}")
        for attempt in range(MAX_ATTEMPTS):
            current, revision = await self._read(model)
            try:
                new = change(current)
                new = new.model_copy(update={"updated_at_unix_ms": int(time.time() * 1000)})
                new = ModelRecord.model_validate(new.model_dump())  # model_copy skips validation
            except ValidationError as exc:
                raise InvalidArgument(f"model {model!r}: {validation_message(exc)}") from None
            if new.name != model:
                raise InvalidArgument(f"a change of model {model!r} returned a record of {new.name!r}")
            data = new.model_dump_json().encode()
            try:
                if revision == 0:
                    await self.kv.create(model, data)
                else:
                    await self.kv.update(model, data, last=revision)
            except KeyWrongLastSequenceError:
                REGISTRY_CONFLICTS.labels(self.service).inc()
                log.debug("registry write of %r lost a race at revision %s; retrying", model, revision)
                # A random pause, growing per attempt, so racing writers stop colliding in lockstep.
                await asyncio.sleep(random.uniform(0, 0.005 * (attempt + 1)))
                continue
            return new
        raise Unavailable(
            f"model {model!r} changed under {MAX_ATTEMPTS} attempts to write it (other writers are busy); try again"
        )

    async def wait_for(self, model: str, check: Callable[[ModelRecord | None], bool], timeout: float = 5.0) -> None:
        """Wait until the watched view of ``model`` satisfies ``check`` (after a write elsewhere)."""
        async with asyncio.timeout(timeout):
            while not check(self.records.get(model)):
                await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop following the bucket; safe to call twice."""
        if self._follower is not None:
            await self._follower.stop()
