"""Provisioning: every JetStream stream, KV bucket and object store Loom uses, made once, as admin.

Under ``deploy/nats/loom.conf`` no service may create, change or delete a
stream: each one binds what exists. This step makes what is missing, with
``LOOM_JS_REPLICAS`` replicas, and leaves what exists alone (it never changes
or deletes anything), so running it again is harmless. ``make run`` and the
tests' mesh run it before the services start; in production run it once per
deploy (or as an init job) with the admin user::

    LOOM_NATS_URL=nats://nats:4222 LOOM_NATS_USER=admin LOOM_NATS_PASSWORD=... \\
        python -m services.common.provision

It reads the services' own settings (bucket names, TTLs) from the same
``LOOM_*`` variables. Against a NATS without authentication the services
still make what they miss themselves, with the same configs: each config
below comes from the module that uses the object.

Everything that exists is listed by :func:`plan`: add a new stream or bucket
there (the durable lane's come from :func:`services.common.durable.stream_configs`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, ObjectStoreConfig, StreamConfig
from nats.js.errors import NotFoundError

from services.common import audit, claims, durable, pipeline_store
from services.common.registry import store as registry_store
from services.common.settings import CommonSettings

log = logging.getLogger(__name__)

#: The inference service's result cache, as ``services.inference.cache.ResultCache`` makes it.
CACHE_BUCKET, CACHE_TTL_S = "loom_cache", 600.0


@dataclass
class Plan:
    """What Loom's JetStream holds: streams, KV buckets and object stores, with their configs."""

    streams: list[StreamConfig] = field(default_factory=list)
    buckets: list[KeyValueConfig] = field(default_factory=list)
    objects: list[ObjectStoreConfig] = field(default_factory=list)

    def names(self) -> list[str]:
        """The JetStream streams behind them (``KV_<bucket>``, ``OBJ_<bucket>``)."""
        return (
            [s.name or "" for s in self.streams]
            + [f"KV_{b.bucket}" for b in self.buckets]
            + [f"OBJ_{o.bucket}" for o in self.objects]
        )


def plan(
    settings: CommonSettings,
    *,
    cache_bucket: str = CACHE_BUCKET,
    cache_ttl_s: float = CACHE_TTL_S,
    cache: bool = True,
) -> Plan:
    """Everything Loom uses under ``settings`` (bucket names, TTLs, LOOM_JS_REPLICAS)."""
    r = settings.js_replicas
    lane = durable.LaneSettings.from_settings(settings)
    buckets = [
        pipeline_store.bucket_config(settings.pipelines_bucket, r),
        registry_store.bucket_config(settings.models_bucket, r),
        # As ResultCache.start makes it: one revision, TTL = max age, direct gets for speed.
        KeyValueConfig(bucket=cache_bucket, history=1, ttl=cache_ttl_s, direct=True, replicas=r),
        *durable.bucket_configs(lane),
    ]
    return Plan(
        streams=[audit.stream_config(r), *durable.stream_configs(lane)],
        buckets=[b for b in buckets if cache or b.bucket != cache_bucket],
        objects=[claims.store_config(settings.blob_bucket, settings.blob_ttl_s, r)],
    )


def lane_plan(lane: durable.LaneSettings) -> Plan:
    """The durable lane's streams and buckets alone: what a service makes at start where they are missing."""
    return Plan(streams=durable.stream_configs(lane), buckets=durable.bucket_configs(lane))


async def _exists(js: JetStreamContext, stream: str) -> bool:
    try:
        info = await js.stream_info(stream)
    except NotFoundError:
        return False
    log.debug("%s exists (%d replicas)", stream, info.config.num_replicas or 1)
    return True


async def provision(js: JetStreamContext, what: Plan) -> list[str]:
    """Make what ``what`` lists and JetStream lacks; returns the streams made. Never changes what exists."""
    jobs: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        *((c.name or "", functools.partial(js.add_stream, c)) for c in what.streams),
        *((f"KV_{c.bucket}", functools.partial(js.create_key_value, dataclasses.replace(c))) for c in what.buckets),
        *(
            (
                f"OBJ_{c.bucket}",
                functools.partial(js.create_object_store, c.bucket or "", config=dataclasses.replace(c)),
            )
            for c in what.objects
        ),
    ]
    made: list[str] = []
    for stream, create in jobs:
        if await _exists(js, stream):
            continue
        try:
            await create()
        except Exception:
            if not await _exists(js, stream):  # not another provisioner at the same moment: a real failure
                raise
            continue
        made.append(stream)
        log.info("made %s", stream)
    return made


async def _main() -> int:
    # The cache bucket's name and TTL are the inference service's settings; its class holds
    # every common setting too, so one environment describes both.
    from services.common.bus import Bus
    from services.common.nats_options import NatsOptions
    from services.inference.settings import InferenceSettings

    settings = InferenceSettings()
    bus = Bus("provision")
    await bus.connect(settings.nats_url, timeout=30.0, options=NatsOptions.from_settings(settings))
    try:
        what = plan(
            settings,
            cache_bucket=settings.cache_bucket,
            cache_ttl_s=settings.cache_ttl_s,
            cache=settings.cache_enabled,
        )
        made = await provision(bus.nc.jetstream(), what)
    finally:
        await bus.close()
    kept = [name for name in what.names() if name not in made]
    print(f"provisioned: made {', '.join(made) or 'nothing'}; already there: {', '.join(kept) or 'nothing'}")
    return 0


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return asyncio.run(_main())


if __name__ == "__main__":
    sys.exit(main())
