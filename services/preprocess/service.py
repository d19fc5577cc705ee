"""The preprocess service: one stage per modality, CPU work off the event loop.

* ``loom.pre.text``  -> token tensors (``input_ids``, ``attention_mask``, ``token_type_ids``)
* ``loom.pre.image`` -> ``image``: BGR uint8 [H, W, 3], longest side at most ``image_max_side``
* ``loom.pre.audio`` -> ``audio``: mono float32 samples at 16 kHz

Each handler returns the input's statistics; the stage runner publishes them
as telemetry (the raw material for drift monitoring).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar, TypeVar

from services.common import envelope, subjects
from services.common.errors import InvalidArgument
from services.common.lifecycle import Runtime, Service
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.stage import StageRunner, Stats
from services.common.tensors import from_numpy
from services.preprocess.audio import AudioPreprocessor
from services.preprocess.image import ImagePreprocessor
from services.preprocess.settings import PreprocessSettings
from services.preprocess.text import TextTokenizer

T = TypeVar("T")


class Preprocess(Service):
    name: ClassVar[str] = "preprocess"

    def __init__(self, settings: PreprocessSettings) -> None:
        super().__init__(settings)
        self.pre = settings
        self.executor = ThreadPoolExecutor(settings.workers, thread_name_prefix="pre")
        self.tokenizer: TextTokenizer | None = None
        self.image = ImagePreprocessor(
            max_pixels=settings.image_max_pixels, max_side=settings.image_max_side, min_side=settings.image_min_side
        )
        self.audio = AudioPreprocessor(rate=settings.audio_rate, max_seconds=settings.audio_max_seconds)

    async def _off_loop(self, fn: Callable[..., T], *args: object) -> T:
        # Decoding, resizing and tokenizing are CPU work: keep them off the event loop.
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def start(self, rt: Runtime) -> None:
        self.tokenizer = await self._off_loop(TextTokenizer, self.pre.tokenizer_path or None, self.pre.max_tokens)
        for modality, handler in (
            ("text", self.handle_text),
            ("image", self.handle_image),
            ("audio", self.handle_audio),
        ):
            runner = StageRunner(
                rt.bus,
                self.name,
                subjects.pre(modality),
                handler,
                claims=rt.claims,
                carry_stats=True,
                lane=rt.lane,
                pending_limit=rt.settings.stage_queue,
            )
            await runner.start()

    async def handle_text(self, part: pb.Part) -> Stats:
        assert self.tokenizer is not None
        tensors, stats = await self._off_loop(self.tokenizer.encode, part.text)
        for name, array in tensors.items():
            part.tensors[name].CopyFrom(from_numpy(array))
        return stats

    async def handle_image(self, part: pb.Part) -> Stats:
        if not part.data:
            raise InvalidArgument(f"input {part.part_id!r} carries no image bytes")
        bgr, stats, (sx, sy) = await self._off_loop(self.image.prepare, part.data)
        part.ClearField("data")
        part.tensors["image"].CopyFrom(from_numpy(bgr))
        part.context[envelope.IMAGE_SCALE_X], part.context[envelope.IMAGE_SCALE_Y] = sx, sy
        image = part.output.image
        image.width, image.height = int(stats["image_width"]), int(stats["image_height"])
        return stats

    async def handle_audio(self, part: pb.Part) -> Stats:
        if not part.data:
            raise InvalidArgument(f"input {part.part_id!r} carries no audio bytes")
        samples, stats = await self._off_loop(self.audio.prepare, part.data)
        part.ClearField("data")
        part.tensors["audio"].CopyFrom(from_numpy(samples))
        part.output.audio.duration_s = stats["audio_duration_s"]
        return stats

    async def stop(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
