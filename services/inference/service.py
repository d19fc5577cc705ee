"""The inference service: ``loom.infer.<model>`` -> Triton -> output tensors."""

from __future__ import annotations

from typing import ClassVar

from services.common import envelope, subjects
from services.common.lifecycle import Runtime, Service
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.stage import Handler, StageRunner, Stats
from services.common.tensors import from_numpy, to_numpy
from services.inference.settings import InferenceSettings
from services.inference.triton import TritonModels


class Inference(Service):
    name: ClassVar[str] = "inference"

    def __init__(self, settings: InferenceSettings) -> None:
        super().__init__(settings)
        self.inf = settings
        self.triton: TritonModels | None = None

    async def start(self, rt: Runtime) -> None:
        self.triton = TritonModels(self.inf.triton_url, reconnect_backoff_ms=self.inf.reconnect_backoff_ms)
        for model in self.inf.models:
            await StageRunner(rt.bus, self.name, subjects.infer(model), self._handler(model)).start()

    def _handler(self, model: str) -> Handler:
        async def handle(part: pb.Part) -> Stats:
            assert self.triton is not None
            inputs = {name: to_numpy(t) for name, t in part.tensors.items()}
            outputs, version = await self.triton.infer(model, inputs, timeout_s=envelope.remaining_s(part))
            part.ClearField("tensors")  # pass only the small result downstream
            for name, array in outputs.items():
                part.tensors[name].CopyFrom(from_numpy(array))
            part.model, part.model_version = model, version
            return {}

        return handle

    async def stop(self) -> None:
        if self.triton is not None:
            await self.triton.close()
