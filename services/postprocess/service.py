"""The postprocess service: ``loom.post.embed`` -> normalised embedding + labels.

At start it embeds the label descriptions through the mesh itself
(preprocess -> inference), so labels and requests share one tokenizer and
one model; it is ready only once that worked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import ClassVar

import numpy as np
from nats.aio.msg import Msg

from services.common import envelope, subjects
from services.common.errors import InvalidArgument, Unavailable, from_proto
from services.common.lifecycle import Runtime, Service
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.stage import StageRunner, Stats
from services.common.tensors import to_numpy
from services.postprocess.labels import LabelIndex, l2_normalise
from services.postprocess.settings import PostprocessSettings

log = logging.getLogger(__name__)


class Postprocess(Service):
    name: ClassVar[str] = "postprocess"

    def __init__(self, settings: PostprocessSettings) -> None:
        super().__init__(settings)
        self.post = settings
        self.index: LabelIndex | None = None

    async def start(self, rt: Runtime) -> None:
        self.index = await self._embed_labels(rt)
        await StageRunner(rt.bus, self.name, subjects.post("embed"), self.handle_embed).start()

    async def handle_embed(self, part: pb.Part) -> Stats:
        assert self.index is not None
        if "embedding" not in part.tensors:
            raise InvalidArgument("part has no 'embedding' tensor")
        embedding = l2_normalise(to_numpy(part.tensors["embedding"]))
        labels = self.index.top(embedding, self.post.top_k)
        out = part.output.text
        out.model, out.model_version = part.model, part.model_version
        out.embedding[:] = embedding.tolist()
        for label, score in labels:
            out.labels.add(label=label, score=score)
        part.ClearField("tensors")
        return {"top_score": labels[0][1] if labels else 0.0}

    async def _embed_labels(self, rt: Runtime) -> LabelIndex:
        names = sorted(self.post.labels)
        deadline = time.monotonic() + self.post.startup_timeout_s
        while True:
            try:
                vectors = await asyncio.gather(*(self._embed(rt, self.post.labels[n]) for n in names))
                log.info("embedded %d label descriptions", len(names))
                return LabelIndex(names, np.stack(vectors))
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise
                log.info("label embedding not possible yet (%s); retrying", exc)
                await asyncio.sleep(1.0)

    async def _embed(self, rt: Runtime, text: str, timeout_s: float = 5.0) -> np.ndarray:
        """One text through preprocess and inference, answered to our own inbox."""
        inbox = rt.bus.new_inbox()
        answer: asyncio.Future[pb.Part] = asyncio.get_running_loop().create_future()

        async def on_answer(msg: Msg) -> None:
            if not answer.done():
                answer.set_result(pb.Part.FromString(msg.data))

        sub = await rt.bus.nc.subscribe(inbox, cb=on_answer, max_msgs=1)
        try:
            part = pb.Part(
                request_id=envelope.new_request_id(),
                part_id="label",
                pipeline="_labels",
                modality="text",
                slip=[subjects.pre("text"), subjects.infer(self.post.text_model), inbox],
                deadline_unix_ms=envelope.now_ms() + int(timeout_s * 1000),
                text=text,
            )
            await rt.bus.publish(part.slip[0], part.SerializeToString())
            try:
                result = await asyncio.wait_for(answer, timeout_s)
            except TimeoutError:
                raise Unavailable("no answer from preprocess/inference") from None
        finally:
            with contextlib.suppress(Exception):  # max_msgs may have removed it already
                await sub.unsubscribe()
        if result.HasField("error"):
            raise from_proto(result.error)
        return to_numpy(result.tensors["embedding"]).astype(np.float32)
