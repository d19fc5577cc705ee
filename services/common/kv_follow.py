"""Opening, following and listing JetStream KV buckets; following and listing without nats-py's race.

nats-py (2.16) marks "the bucket's current contents are delivered" by comparing the
watch consumer's ``num_pending`` with the messages its subscription has read so far.
When the consumer info reply overtakes the first deliveries on the connection, both
are 0 and the marker comes *before* the entries: a ``keys()`` call then returns an
empty list and a watcher's initial load looks complete while it is empty (seen in CI
as a registry listing without the seeded model). Here the end of the initial load is
the stream's last sequence, read before the watch starts: the watch delivers the last
message of every key, so it reaches that sequence exactly when it has delivered
everything the bucket held.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KeyValue

from services.common.errors import Unavailable

log = logging.getLogger(__name__)

#: Called with (key, value, operation, revision) for every entry the watch delivers, in order.
EntryFn = Callable[[str, bytes | None, str | None, int | None], None]


async def open_bucket(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    """The bucket ``config.bucket``, made from ``config`` if missing (where this user may make it).

    Unavailable, naming the fix, when it is missing and this user may not make it (least
    privilege: provisioning makes the buckets).
    """
    name = config.bucket or ""
    try:
        return await js.key_value(name)
    except BucketNotFoundError:
        pass
    try:
        return await js.create_key_value(config)
    except Exception as exc:
        try:  # a replica starting at the same moment may have made it
            return await js.key_value(name)
        except BucketNotFoundError:
            raise Unavailable(f"KV bucket {name!r} is missing: {exc} (run services.common.provision)") from exc


async def bucket_keys(js: JetStreamContext, bucket: str) -> list[str]:
    """Every key with a message in ``bucket``, deleted keys included (their delete marker is a message).

    Callers read each key and skip the deleted ones; this never misses a live key.
    """
    prefix = f"$KV.{bucket}."
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"{prefix}>")
    return sorted(subject[len(prefix) :] for subject in (info.state.subjects or {}))


class BucketFollower:
    """Hands every entry of a bucket to ``on_entry``: first its current contents, then each change."""

    def __init__(self, js: JetStreamContext, kv: KeyValue, bucket: str, on_entry: EntryFn, *, name: str) -> None:
        self.js = js
        self.kv = kv
        self.bucket = bucket
        self.on_entry = on_entry
        self.name = name
        self.loaded = asyncio.Event()
        self._end_of_initial = 0
        self._watcher: KeyValue.KeyWatcher | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 10.0) -> None:
        """Start following; returns once everything the bucket held at the call has been handed over."""
        state = (await self.js.stream_info(f"KV_{self.bucket}")).state
        self._end_of_initial = state.last_seq if state.messages else 0
        if self._end_of_initial == 0:
            self.loaded.set()
        self._watcher = await self.kv.watchall()
        self._task = asyncio.create_task(self._follow(self._watcher), name=self.name)
        await asyncio.wait_for(self.loaded.wait(), timeout=timeout)

    async def _follow(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is None:  # nats-py's own end marker, which can come early (see the module's text)
                continue
            self.on_entry(entry.key, entry.value, entry.operation, entry.revision)
            if (entry.revision or 0) >= self._end_of_initial:
                self.loaded.set()

    async def stop(self) -> None:
        """Stop following; safe to call twice."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()  # type: ignore[no-untyped-call]
            self._watcher = None
