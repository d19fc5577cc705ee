"""Provisioning (services/common/provision.py) against a real nats-server: what it makes and how.

Under deploy/nats/loom.conf the services may not create streams, so provisioning
makes them; without authentication the services still make what they miss. Both
paths must give the same objects, or a mesh would behave differently with and
without least privilege.
"""

from __future__ import annotations

from pathlib import Path

import nats
import pytest

from services.common import durable
from services.common.audit import AuditLog
from services.common.bus import Bus
from services.common.claims import ClaimCheck
from services.common.launch.nats_server import NatsServer
from services.common.nats_options import NatsOptions
from services.common.pipeline_store import PipelineStore
from services.common.pipelines import PipelineRegistry
from services.common.provision import CACHE_BUCKET, CACHE_TTL_S, lane_plan, plan, provision
from services.common.registry.store import RegistryStore
from services.common.settings import CommonSettings
from services.inference.cache import ResultCache
from tests.support import start_nats

pytestmark = pytest.mark.integration


async def test_provisioning_makes_what_the_services_would_make_themselves(tmp_path: Path) -> None:
    """Against a NATS without authentication the services make what they miss: provisioning makes the same."""
    settings = CommonSettings()
    bare = NatsServer(store_dir=tmp_path / "bare").start()  # no passwords: no authentication
    provisioned = start_nats()
    bus = Bus("gateway")
    try:
        provisioned.provision(tmp_path)
        await bus.connect(bare.url, timeout=10)
        store = PipelineStore(bus, "gateway", settings.pipelines_bucket, PipelineRegistry([]))
        await store.start()
        await store.stop()
        await RegistryStore(bus, settings.models_bucket).start(watch=False)
        await ClaimCheck(bus, "gateway", settings.blob_bucket, ttl_s=settings.blob_ttl_s).start()
        await AuditLog(bus, service="gateway").start()
        await ResultCache(enabled=True, bucket=CACHE_BUCKET, ttl_s=CACHE_TTL_S, max_value_bytes=1024).start(bus.nc)
        # As every service does at start (services.common.lifecycle): the lane, where it is missing.
        await provision(bus.js, lane_plan(durable.LaneSettings.from_settings(settings)))
        admin = await nats.connect(provisioned.url)
        try:
            for name in plan(settings).names():
                made_by_service = (await bus.nc.jetstream().stream_info(name)).config
                provisioned_config = (await admin.jetstream().stream_info(name)).config
                assert made_by_service == provisioned_config, name
        finally:
            await admin.close()
    finally:
        await bus.close()
        provisioned.stop()
        bare.stop()


async def test_provisioning_twice_changes_nothing_and_a_service_binds_what_it_made(tmp_path: Path) -> None:
    provisioned = start_nats()
    try:
        provisioned.provision(tmp_path, LOOM_JS_REPLICAS="1", LOOM_BLOB_TTL_S="60")
        admin = await nats.connect(provisioned.url)
        js = admin.jetstream()
        before = {name: (await js.stream_info(name)).config for name in plan(CommonSettings()).names()}
        provisioned.provision(tmp_path, LOOM_BLOB_TTL_S="999")  # a second run: nothing made, nothing changed
        assert {name: (await js.stream_info(name)).config for name in before} == before
        assert before["OBJ_loom_blobs"].max_age == 60
        await admin.close()
        log = (tmp_path / "provision.log").read_text()
        assert "made nothing; already there: LOOM_AUDIT" in log
        # The gateway's user binds the registry that provisioning made (it may not make one).
        assert provisioned.server is not None
        gateway = NatsOptions("gateway", provisioned.server.passwords["gateway"])
        bus = Bus("gateway")
        await bus.connect(provisioned.server.url, timeout=10, options=gateway)
        await RegistryStore(bus, "loom_models").start(watch=False)
        await bus.close()
    finally:
        provisioned.stop()
