"""Embedding the label descriptions through the mesh itself at start.

Labels and requests then share one tokenizer and one model: postprocess sends
each description through ``loom.pre.text`` -> ``loom.infer.<text model>`` with
its own inbox as the last step, and is ready only once that worked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import numpy as np
from nats.aio.msg import Msg

from services.common import envelope, subjects
from services.common.bus import Bus
from services.common.errors import Unavailable, from_proto
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.tensors import to_numpy
from services.postprocess.labels import LabelIndex

log = logging.getLogger(__name__)


async def embed_labels(bus: Bus, labels: dict[str, str], *, text_model: str, timeout_s: float) -> LabelIndex:
    """Keep trying until every description is embedded or ``timeout_s`` passes."""
    names = sorted(labels)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            vectors = await asyncio.gather(*(embed_text(bus, labels[n], text_model) for n in names))
            log.info("embedded %d label descriptions", len(names))
            return LabelIndex(names, np.stack(vectors))
        except Exception as exc:
            if time.monotonic() > deadline:
                raise
            log.info("label embedding not possible yet (%s); retrying", exc)
            await asyncio.sleep(1.0)


async def embed_text(bus: Bus, text: str, text_model: str, timeout_s: float = 5.0) -> np.ndarray:
    """One text through preprocess and inference, answered to our own inbox."""
    inbox = bus.new_inbox()
    answer: asyncio.Future[pb.Part] = asyncio.get_running_loop().create_future()

    async def on_answer(msg: Msg) -> None:
        if not answer.done():
            answer.set_result(pb.Part.FromString(msg.data))

    sub = await bus.nc.subscribe(inbox, cb=on_answer, max_msgs=1)
    try:
        part = pb.Part(
            request_id=envelope.new_request_id(),
            part_id="label",
            pipeline="_labels",
            modality="text",
            slip=[subjects.pre("text"), subjects.infer(text_model), inbox],
            deadline_unix_ms=envelope.now_ms() + int(timeout_s * 1000),
            text=text,
            bypass_cache=True,  # label embeddings must come from the model as it is now
        )
        await bus.publish(part.slip[0], part.SerializeToString())
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
