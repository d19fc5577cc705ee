"""Following and listing a KV bucket on a real nats-server: nothing the bucket holds is missed at start."""

from __future__ import annotations

import asyncio

import pytest
from nats.js.api import KeyValueConfig
from nats.js.kv import KV_DEL, KV_PURGE

from services.common.bus import Bus
from services.common.kv_follow import BucketFollower, bucket_keys, open_bucket
from services.common.registry import ops
from services.common.registry.schema import VersionMeta
from services.common.registry.store import RegistryStore
from tests.support import NatsHandle

pytestmark = pytest.mark.integration


async def connected(url: str) -> Bus:
    bus = Bus("kv-follow")
    await bus.connect(url, timeout=10)
    return bus


class View:
    """What a follower has handed over: the live value of every key."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}

    def on_entry(self, key: str, value: bytes | None, operation: str | None, revision: int | None) -> None:
        if operation in (KV_DEL, KV_PURGE):
            self.values.pop(key, None)
        else:
            self.values[key] = value or b""


async def test_a_follower_returns_only_after_everything_the_bucket_held(nats_server: NatsHandle) -> None:
    bus = await connected(nats_server.url)
    try:
        js = bus.nc.jetstream()
        kv = await open_bucket(js, KeyValueConfig(bucket="follow", history=3))

        empty = View()
        follower = BucketFollower(js, kv, "follow", empty.on_entry, name="empty")
        await follower.start(timeout=5)  # an empty bucket: loaded at once
        assert follower.loaded.is_set() and empty.values == {}
        await follower.stop()

        expected: dict[str, bytes] = {}
        for i in range(150):
            await kv.put(f"k{i}", b"first")
            expected[f"k{i}"] = b"first"
        for i in range(0, 150, 3):
            await kv.put(f"k{i}", f"second {i}".encode())
            expected[f"k{i}"] = f"second {i}".encode()
        for i in range(1, 150, 5):
            await kv.delete(f"k{i}")
            expected.pop(f"k{i}")
        await kv.put("last", b"deleted last")
        await kv.delete("last")  # the stream's last message is a delete marker: still the end of the load

        # Many starts, each checked the moment start() returns: the view is the bucket, not part of it.
        for attempt in range(25):
            view = View()
            follower = BucketFollower(js, kv, "follow", view.on_entry, name=f"follow-{attempt}")
            await follower.start(timeout=10)
            assert view.values == expected, f"start {attempt}: {len(view.values)} of {len(expected)} keys"
            await follower.stop()

        # After the load, changes keep coming.
        view = View()
        follower = BucketFollower(js, kv, "follow", view.on_entry, name="follow-live")
        await follower.start(timeout=10)
        await kv.put("new", b"after start")
        async with asyncio.timeout(10):
            while view.values.get("new") != b"after start":
                await asyncio.sleep(0.01)
        await follower.stop()
        await follower.stop()  # twice is fine
    finally:
        await bus.close()


async def test_keys_include_deleted_ones_and_the_registry_lists_only_live_records(nats_server: NatsHandle) -> None:
    bus = await connected(nats_server.url)
    try:
        js = bus.nc.jetstream()
        store = RegistryStore(bus, "models_follow", service="kv-follow")
        await store.start(watch=False)
        assert await bucket_keys(js, "models_follow") == []
        first = VersionMeta(version="1", semver="1.0.0")
        for name in ("alpha", "beta", "gamma"):
            await store.update(name, lambda rec, n=name: ops.register(rec, n, first, 1))
        await store.kv.delete("beta")
        assert await bucket_keys(js, "models_follow") == ["alpha", "beta", "gamma"]  # beta's delete marker
        assert [r.name for r in await store.list()] == ["alpha", "gamma"]
        with pytest.raises(Exception, match="registered models: alpha, gamma"):
            await store.get("beta")

        watching = RegistryStore(bus, "models_follow", service="kv-follow-watch")
        await watching.start(watch=True)
        assert sorted(watching.records) == ["alpha", "gamma"]  # complete when start() returns
        await watching.stop()
    finally:
        await bus.close()
