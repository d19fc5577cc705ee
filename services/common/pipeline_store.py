"""Pipeline specs in a JetStream KV bucket, watched by every service.

The bucket (``loom_pipelines`` by default) maps a pipeline name to its YAML
spec. Each service loads the bucket at start and then follows a watch, so a
spec changed in KV takes effect on the next request without a restart. A
value that fails validation is refused where it is written
(:meth:`PipelineStore.apply`) and, if it reaches the bucket some other way
(``nats kv put``), every watcher logs it, counts it and keeps serving the
last good spec.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from nats.js.api import KeyValueConfig
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from prometheus_client import Counter

from services.common.bus import Bus
from services.common.errors import InvalidArgument
from services.common.kv_follow import BucketFollower, open_bucket
from services.common.pipelines import PipelineRegistry, PipelineSpec, load_dir, parse_spec, to_yaml

log = logging.getLogger(__name__)

SPEC_UPDATES = Counter(
    "loom_pipeline_spec_updates_total",
    "Pipeline spec changes seen in KV, by result (applied, rejected, deleted).",
    ["service", "result"],
)


def bucket_config(bucket: str, replicas: int = 1) -> KeyValueConfig:
    """The bucket as provisioning makes it (and a service, where NATS runs without authentication)."""
    # History 5: the last few versions of a spec stay readable for a rollback by hand.
    return KeyValueConfig(bucket=bucket, history=5, description="Loom pipeline specs", replicas=replicas)


class PipelineStore:
    """Keeps a :class:`PipelineRegistry` equal to the bucket's valid specs."""

    def __init__(self, bus: Bus, service: str, bucket: str, registry: PipelineRegistry) -> None:
        self.bus = bus
        self.service = service
        self.bucket = bucket
        self.registry = registry
        self._kv: KeyValue | None = None
        self._follower: BucketFollower | None = None

    async def start(self) -> None:
        """Open the bucket (creating it if missing and allowed), load what it holds and follow changes."""
        js = self.bus.nc.jetstream()
        self._kv = await open_bucket(js, bucket_config(self.bucket))
        self._follower = BucketFollower(js, self._kv, self.bucket, self._on_entry, name=f"{self.service}-pipelines")
        await self._follower.start()

    def _on_entry(self, key: str, value: bytes | None, operation: str | None, revision: int | None) -> None:
        if operation in (KV_DEL, KV_PURGE):
            self.registry.remove(key)
            SPEC_UPDATES.labels(self.service, "deleted").inc()
            log.info("pipeline %r removed (revision %s)", key, revision)
            return
        try:
            spec = parse_spec(value or b"", name=key)
        except InvalidArgument as exc:
            SPEC_UPDATES.labels(self.service, "rejected").inc()
            kept = "keeping the previous spec" if self.registry.find(key) else "pipeline stays unknown"
            log.error("pipeline %r revision %s rejected (%s): %s", key, revision, kept, exc.message)
            return
        self.registry.set(spec)
        SPEC_UPDATES.labels(self.service, "applied").inc()
        log.info("pipeline %r now at revision %s", key, revision)

    @property
    def kv(self) -> KeyValue:
        assert self._kv is not None, "start() first"
        return self._kv

    async def apply(self, text: str | bytes, *, name: str | None = None) -> tuple[PipelineSpec, int]:
        """Validate ``text`` and store it; raises InvalidArgument, leaving the stored spec alone."""
        spec = parse_spec(text, name=name)
        revision = await self.kv.put(spec.name, to_yaml(spec).encode())
        # This service serves the new spec before the caller hears "stored" (the watch is asynchronous);
        # the other services follow within the watch's delay.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                while self.registry.find(spec.name) != spec:
                    await asyncio.sleep(0.005)
        return spec, revision

    async def read(self, name: str) -> tuple[str, int]:
        """The stored YAML of ``name`` and its revision."""
        try:
            entry = await self.kv.get(name)
        except KeyNotFoundError:
            self.registry.get(name)  # raises NotFound naming the known pipelines
            raise
        return (entry.value or b"").decode(), entry.revision or 0

    async def seed(self, directory: str | Path) -> list[str]:
        """Store the specs of ``directory`` that the bucket does not hold yet; returns their names.

        The bucket is the running truth: a spec changed there (``loomctl``,
        ``PUT /v1/pipelines/<name>``) is not overwritten by a restart.
        """
        added = []
        for spec in load_dir(directory):
            try:
                await self.kv.create(spec.name, to_yaml(spec).encode())
                added.append(spec.name)
            except KeyWrongLastSequenceError:
                pass  # already stored (by an earlier start or an operator): keep it
        return added

    async def wait_for(self, names: list[str], timeout: float = 5.0) -> None:
        """Wait until the watch has delivered ``names`` (after a seed)."""
        async with asyncio.timeout(timeout):
            while any(self.registry.find(n) is None for n in names):
                await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._follower is not None:
            await self._follower.stop()
