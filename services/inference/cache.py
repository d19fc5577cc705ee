"""The inference result cache: a JetStream KV bucket of model outputs.

Key: sha256 of the model, the model version Triton serves and every input
tensor (name, datatype, shape, bytes; sorted by name). Value: a serialized
``CachedOutputs``. The bucket's max age is the TTL and it keeps one revision
per key. The cache only ever saves work: a KV failure is counted as
``error``, logged now and then, and the part goes to Triton as if there were
no cache.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue
from prometheus_client import Counter

from services.common.kv_follow import open_bucket
from services.common.pb.loom.v1 import envelope_pb2 as pb

log = logging.getLogger(__name__)

HIT, MISS, BYPASS, ERROR = "hit", "miss", "bypass", "error"
#: The Part note that tells the caller where its answer came from.
NOTE = "inference.cache"

CACHE_REQUESTS = Counter(
    "loom_inference_cache_requests_total",
    "Result cache lookups by outcome (hit, miss, bypass, error).",
    ["model", "result"],
)

#: What the key hashes, per input: (name, datatype, shape, bytes), sorted by name.
Material = tuple[tuple[str, str, tuple[int, ...], bytes], ...]


def key_material(tensors: Mapping[str, pb.Tensor]) -> Material:
    return tuple((name, t.datatype, tuple(t.shape), t.data) for name, t in sorted(tensors.items()))


def cache_key(model: str, version: str, material: Material) -> str:
    """sha256 hex; every field is length-prefixed so no two inputs hash alike by concatenation."""
    digest = hashlib.sha256()

    def add(value: bytes) -> None:
        digest.update(len(value).to_bytes(8, "little"))
        digest.update(value)

    add(model.encode())
    add(version.encode())
    for name, datatype, shape, data in material:
        add(name.encode())
        add(datatype.encode())
        add(",".join(map(str, shape)).encode())
        add(data)
    return digest.hexdigest()


@dataclass
class Lookup:
    """One part's cache lookup; :meth:`ResultCache.store` finishes it after Triton answered."""

    model: str
    result: str = ""  # hit | miss | bypass | error; "" when the cache is off
    value: pb.CachedOutputs | None = None  # set on a hit
    version: str = ""  # the version the lookup used
    material: Material = field(default_factory=tuple)

    @property
    def note(self) -> str:
        """For ``part.notes``: a failed lookup is answered by Triton, like a miss."""
        return MISS if self.result == ERROR else self.result


class ResultCache:
    """Looks up and stores model outputs in a JetStream KV bucket."""

    def __init__(
        self, *, enabled: bool, bucket: str, ttl_s: float, max_value_bytes: int, timeout_s: float = 0.1
    ) -> None:
        self.enabled = enabled
        self.bucket = bucket
        self.ttl_s = ttl_s
        self.max_value_bytes = max_value_bytes
        self.timeout_s = timeout_s
        self._kv: KeyValue | None = None
        self._stores: set[asyncio.Task[None]] = set()
        self._last_log = float("-inf")
        self._unlogged = 0

    async def start(self, nc: NATS) -> None:
        """Bind the bucket, creating it if missing; without JetStream the cache stays off (counted as errors)."""
        if not self.enabled:
            return
        js = nc.jetstream()
        try:
            config = KeyValueConfig(bucket=self.bucket, history=1, ttl=self.ttl_s, direct=True)
            self._kv = await open_bucket(js, config)
        except Exception as exc:  # no JetStream, no permission, ...: serve without a cache
            log.warning("result cache bucket %r unavailable, serving without it: %s", self.bucket, exc)

    async def lookup(self, model: str, version: str, part: pb.Part) -> Lookup:
        """Look the part's inputs up; never raises."""
        found = Lookup(model)
        if not self.enabled:
            return found
        if part.bypass_cache:
            found.result = BYPASS
        elif not version:  # without the served version a hit could be another version's answer
            found.result = MISS
        else:
            found.version, found.material = version, key_material(part.tensors)
            found.value, found.result = await self._get(cache_key(model, version, found.material))
        CACHE_REQUESTS.labels(model, found.result).inc()
        return found

    def store(self, lookup: Lookup, value: pb.CachedOutputs) -> None:
        """Store Triton's answer in the background (the part does not wait for the KV)."""
        if lookup.result not in (MISS, ERROR) or not lookup.material or not value.model_version:
            return
        # Triton may have answered with another version than the lookup used.
        key = cache_key(lookup.model, value.model_version, lookup.material)
        data = value.SerializeToString()
        if len(data) > self.max_value_bytes:
            log.debug("result of %s not cached: %d bytes", lookup.model, len(data))
            return
        task = asyncio.create_task(self._put(key, data))
        self._stores.add(task)
        task.add_done_callback(self._stores.discard)

    async def _get(self, key: str) -> tuple[pb.CachedOutputs | None, str]:
        if self._kv is None:
            return None, ERROR
        try:
            entry = await asyncio.wait_for(self._kv.get(key), self.timeout_s)
            if entry.value is None:
                return None, MISS
            return pb.CachedOutputs.FromString(entry.value), HIT
        except nats.js.errors.KeyNotFoundError:
            return None, MISS
        except Exception as exc:  # a slow or broken KV (or a bad value) costs a lookup, never the request
            self._log_error("lookup", exc)
            return None, ERROR

    async def _put(self, key: str, data: bytes) -> None:
        if self._kv is None:
            return
        try:
            await asyncio.wait_for(self._kv.put(key, data), max(self.timeout_s, 1.0))
        except Exception as exc:
            self._log_error("store", exc)

    def _log_error(self, what: str, exc: BaseException) -> None:
        # A KV outage would fail every part: one line per half minute says enough.
        now = time.monotonic()
        if now - self._last_log < 30.0:
            self._unlogged += 1
            return
        log.warning("result cache %s failed (%d more since last report): %r", what, self._unlogged, exc)
        self._last_log, self._unlogged = now, 0

    async def close(self, grace_s: float = 2.0) -> None:
        """Let pending stores finish (up to ``grace_s``)."""
        if self._stores:
            await asyncio.wait(set(self._stores), timeout=grace_s)
