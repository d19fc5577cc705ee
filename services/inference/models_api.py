"""Questions about the served models, answered over NATS request/reply.

``loom.models.metadata`` and ``loom.models.ready``: the payload is a model
name (UTF-8), the optional header ``Loom-Model-Version`` picks a version; the
reply is Triton's own serialized ``inference.ModelMetadataResponse`` /
``inference.ModelReadyResponse``, so the gateway can hand it on as KServe v2.
``loom.models.list``: a JSON list ``[{"name": ..., "versions": [...], "max_batch_size": n}]`` of
the served models and their ready versions. Only models in the ``models``
setting are answered; others get NOT_FOUND in NATS error headers.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence

from nats.aio.msg import Msg

from services.common import subjects
from services.common.bus import Bus
from services.common.errors import InvalidArgument, NotFound, as_loom_error, nats_headers
from services.inference.triton import ModelInfo, TritonModels

log = logging.getLogger(__name__)

#: Request header naming the model version asked about ("" or absent: Triton's choice).
MODEL_VERSION_HEADER = "Loom-Model-Version"

Answer = Callable[[Msg], Awaitable[bytes]]


class ModelsApi:
    """The NATS adapter for model questions; Triton answers, this only checks and relays."""

    def __init__(self, bus: Bus, triton: TritonModels, models: Sequence[str], *, queue: str) -> None:
        self.bus = bus
        self.triton = triton
        self.models = list(models)
        self.queue = queue

    async def start(self) -> None:
        for op, answer in (("metadata", self._metadata), ("ready", self._ready), ("list", self._list)):
            await self.bus.subscribe(subjects.model_query(op), self._replying(answer), queue=self.queue)

    def _replying(self, answer: Answer) -> Callable[[Msg], Awaitable[None]]:
        async def handle(msg: Msg) -> None:
            try:
                payload = await answer(msg)
            except Exception as exc:  # every failure becomes error headers, never silence
                err = as_loom_error(exc)
                if err is not exc:
                    log.exception("model question on %s failed", msg.subject)
                await self.bus.respond(msg, b"", nats_headers(err))
                return
            await self.bus.respond(msg, payload)

        return handle

    def _model(self, msg: Msg) -> tuple[str, str]:
        try:
            name = msg.data.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise InvalidArgument("the model name must be UTF-8") from None
        if name not in self.models:
            served = ", ".join(self.models)
            raise NotFound(f"model {name!r} is not served; served: {served}")
        return name, (msg.headers or {}).get(MODEL_VERSION_HEADER, "")

    async def _metadata(self, msg: Msg) -> bytes:
        name, version = self._model(msg)
        response = await self.triton.metadata(name, version)
        return bytes(response.SerializeToString())

    async def _ready(self, msg: Msg) -> bytes:
        name, version = self._model(msg)
        return await self.triton.ready_response(name, version)

    async def _list(self, _: Msg) -> bytes:
        versions = await asyncio.gather(*(self.triton.ready_versions(m) for m in self.models))
        infos = await asyncio.gather(*(self.triton.model_info(m) for m in self.models), return_exceptions=True)
        listing = [
            # max_batch_size tells the KServe front door whether a model's first dimension is a batch.
            {"name": m, "versions": v, **({"max_batch_size": i.max_batch_size} if isinstance(i, ModelInfo) else {})}
            for m, v, i in zip(self.models, versions, infos, strict=True)
        ]
        return json.dumps(listing).encode()
