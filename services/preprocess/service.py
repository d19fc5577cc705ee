"""The preprocess service: ``loom.pre.text`` -> token tensors."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

from services.common import subjects
from services.common.lifecycle import Runtime, Service
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.stage import StageRunner, Stats
from services.common.tensors import from_numpy
from services.preprocess.settings import PreprocessSettings
from services.preprocess.text import TextTokenizer


class Preprocess(Service):
    name: ClassVar[str] = "preprocess"

    def __init__(self, settings: PreprocessSettings) -> None:
        super().__init__(settings)
        self.pre = settings
        self.executor = ThreadPoolExecutor(settings.workers, thread_name_prefix="pre")
        self.tokenizer: TextTokenizer | None = None

    async def start(self, rt: Runtime) -> None:
        loop = asyncio.get_running_loop()
        self.tokenizer = await loop.run_in_executor(
            self.executor, lambda: TextTokenizer(self.pre.tokenizer_path or None, self.pre.max_tokens)
        )
        await StageRunner(rt.bus, self.name, subjects.pre("text"), self.handle_text).start()

    async def handle_text(self, part: pb.Part) -> Stats:
        assert self.tokenizer is not None
        # Tokenization is CPU work: keep it off the event loop.
        tensors, stats = await asyncio.get_running_loop().run_in_executor(
            self.executor, self.tokenizer.encode, part.text
        )
        for name, array in tensors.items():
            part.tensors[name].CopyFrom(from_numpy(array))
        return stats

    async def stop(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
