"""Claim check: bytes larger than the bus carries travel through the JetStream object store.

A NATS message may not exceed the server's ``max_payload`` (1 MiB by default).
An image upload or a decoded image tensor often does, so the producer parks
the bytes in the object store and the message carries only a
:class:`BlobRef`; the stage that needs the bytes fetches them and deletes
the object. The bucket's TTL removes what nobody fetched (a part dropped at
its deadline, a crashed stage).

Every stage goes through :meth:`ClaimCheck.restore` before its handler and
:meth:`ClaimCheck.offload` before it publishes, so handlers only ever see
plain bytes.
"""

from __future__ import annotations

import logging
import uuid

from nats.js.api import ObjectStoreConfig
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.object_store import ObjectStore
from prometheus_client import Counter

from services.common.bus import Bus
from services.common.errors import Unavailable
from services.common.pb.loom.v1 import envelope_pb2 as pb

log = logging.getLogger(__name__)

#: Room left in a message for the envelope, headers and the trace context.
HEADROOM = 64 * 1024

CLAIMS = Counter(
    "loom_claim_check_total",
    "Blobs parked in (put) or fetched from (get) the object store.",
    ["service", "op"],
)
CLAIM_BYTES = Counter("loom_claim_check_bytes_total", "Bytes moved through the object store.", ["service", "op"])


def store_config(bucket: str, ttl_s: float, replicas: int = 1) -> ObjectStoreConfig:
    """The object store as provisioning makes it (and a service, where NATS runs without authentication)."""
    description = "Loom claim check: large inputs and tensors in transit"
    return ObjectStoreConfig(bucket=bucket, ttl=ttl_s, description=description, replicas=replicas)


class ClaimCheck:
    def __init__(self, bus: Bus, service: str, bucket: str, *, ttl_s: float, threshold: int = 0) -> None:
        self.bus = bus
        self.service = service
        self.bucket = bucket
        self.ttl_s = ttl_s
        self._threshold = threshold
        self._store: ObjectStore | None = None

    async def start(self) -> None:
        """Open the object store, creating it if missing and allowed."""
        js = self.bus.nc.jetstream()
        try:
            self._store = await js.object_store(self.bucket)
        except BucketNotFoundError:
            try:
                self._store = await js.create_object_store(self.bucket, config=store_config(self.bucket, self.ttl_s))
            except Exception as exc:  # least privilege: provisioning makes the buckets
                raise Unavailable(
                    f"object store {self.bucket!r} is missing: {exc} (run services.common.provision)"
                ) from exc

    @property
    def threshold(self) -> int:
        """Messages above this many bytes offload their largest fields."""
        return self._threshold or max(64 * 1024, self.bus.nc.max_payload - HEADROOM)

    @property
    def store(self) -> ObjectStore:
        assert self._store is not None, "start() first"
        return self._store

    async def put(self, data: bytes, hint: str) -> pb.BlobRef:
        key = f"{hint}.{uuid.uuid4().hex[:12]}"
        try:
            await self.store.put(key, data)
        except Exception as exc:
            raise Unavailable(f"object store {self.bucket!r} refused a {len(data)}-byte blob: {exc}") from exc
        CLAIMS.labels(self.service, "put").inc()
        CLAIM_BYTES.labels(self.service, "put").inc(len(data))
        return pb.BlobRef(bucket=self.bucket, key=key, size=len(data))

    async def get(self, ref: pb.BlobRef) -> bytes:
        try:
            result = await self.store.get(ref.key)
        except NotFoundError:
            raise Unavailable(f"claim-checked blob {ref.key!r} is gone (expired after {self.ttl_s:.0f} s?)") from None
        data = result.data or b""
        CLAIMS.labels(self.service, "get").inc()
        CLAIM_BYTES.labels(self.service, "get").inc(len(data))
        try:
            await self.store.delete(ref.key)  # fetched once: nobody else needs it
        except Exception as exc:  # the TTL removes it anyway
            log.info("could not delete blob %s: %s", ref.key, exc)
        return data

    async def offload(self, part: pb.Part) -> None:
        """Park the largest byte fields until the part fits in one message."""
        if part.ByteSize() <= self.threshold:
            return
        hint = f"{part.request_id}.{part.part_id}"
        fields: list[tuple[int, str]] = [(len(t.data), name) for name, t in part.tensors.items() if t.data]
        if part.data:
            fields.append((len(part.data), ""))
        for _size, name in sorted(fields, reverse=True):
            if name == "":
                part.blob.CopyFrom(await self.put(part.data, f"{hint}.data"))
                part.ClearField("data")
            else:
                tensor = part.tensors[name]
                tensor.blob.CopyFrom(await self.put(tensor.data, f"{hint}.{name}"))
                tensor.ClearField("data")
            if part.ByteSize() <= self.threshold:
                return

    async def restore(self, part: pb.Part) -> None:
        """Fetch every parked field back into the part."""
        if part.HasField("blob"):
            part.data = await self.get(part.blob)
            part.ClearField("blob")
        for tensor in part.tensors.values():
            if tensor.HasField("blob"):
                tensor.data = await self.get(tensor.blob)
                tensor.ClearField("blob")
