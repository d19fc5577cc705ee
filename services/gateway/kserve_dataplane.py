"""The KServe v2 / Triton front door's logic, shared by its gRPC and REST adapters.

Every pipeline is a KServe model (version "1"); so is every Triton model the
inference service serves, by its own name. A name is looked up among the
pipelines first, then among the models (the inference service's list, asked
over NATS and kept for ``kserve_models_ttl_s``). Transport-free: the adapters
decode the wire into :class:`InferRequest`, call this, and encode the result.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2

from services.common.errors import (
    Code,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    LoomError,
    NotFound,
    Unavailable,
)
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.pipelines import PipelineSpec
from services.gateway.core import GatewayCore
from services.gateway.kserve_convert import (
    PIPELINE_VERSION,
    ModelEntry,
    call_from_request,
    model_result,
    model_rows,
    models_from_list,
    options,
    pipeline_metadata,
    pipeline_result,
)
from services.gateway.kserve_wire import InferRequest, InferResult

SERVER_NAME = "loom"
#: Most rows one request may carry to a model whose max_batch_size the inference service does not say.
MAX_ROWS = 64
#: Only what is true: REST takes and gives binary tensor data (Inference-Header-Content-Length).
EXTENSIONS = ("binary_tensor_data",)


def server_version() -> str:
    """Loom's version: the installed distribution's, else this checkout's pyproject.toml."""
    try:
        return importlib.metadata.version("loom")
    except importlib.metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        try:
            return str(tomllib.loads(pyproject.read_text())["project"]["version"])
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


class KServeDataPlane:
    def __init__(self, core: GatewayCore, is_ready: Callable[[], bool]) -> None:
        self.core = core
        self.is_ready = is_ready
        self.version = server_version()
        self._models: dict[str, ModelEntry] = {}
        self._models_at = float("-inf")

    async def models(self, *, fresh: bool = False) -> dict[str, ModelEntry]:
        """The served Triton models (cached briefly; ``fresh`` asks again)."""
        if fresh or time.monotonic() - self._models_at > self.core.settings.kserve_models_ttl_s:
            self._models = models_from_list(await self.core.model_query("list", ""))
            self._models_at = time.monotonic()
            self.core.served_models = frozenset(self._models)
        return self._models

    async def resolve(self, name: str) -> PipelineSpec | ModelEntry:
        """The pipeline or model called ``name``; NOT_FOUND naming the known ones."""
        spec = self.core.pipelines.find(name)
        if spec is not None:
            return spec
        models = await self.models()
        if name not in models:  # maybe just added: ask once more before saying no
            models = await self.models(fresh=True)
        if name in models:
            return models[name]
        raise NotFound(
            f"unknown model {name!r}; pipelines: {', '.join(self.core.pipelines.names())}; "
            f"models: {', '.join(sorted(models))}"
        )

    async def model_ready(self, name: str, version: str = "") -> bool:
        """A pipeline is ready when the gateway is and every model on its stages has a ready version.

        As Triton, an unknown model is simply not ready; so is one nobody can be asked about.
        """
        if not self.is_ready():
            return False
        try:
            return await self._ready(await self.resolve(name), version)
        except (LoomError, DecodeError):
            return False

    async def _ready(self, target: PipelineSpec | ModelEntry, version: str) -> bool:
        if isinstance(target, ModelEntry):
            if version:
                return version in target.versions
            reply = service_pb2.ModelReadyResponse.FromString(await self.core.model_query("ready", target.name))
            return bool(reply.ready)
        if version not in ("", PIPELINE_VERSION):
            return False
        models = await self.models()
        needed = {
            stage.split(".", 1)[1] for i in target.inputs.values() for stage in i.stages if stage.startswith("infer.")
        }
        return all(m in models and models[m].versions for m in needed)

    async def model_metadata(self, name: str, version: str = "") -> Any:
        """An ``inference.ModelMetadataResponse``: built for a pipeline, Triton's own for a model."""
        target = await self.resolve(name)
        if isinstance(target, PipelineSpec):
            if version not in ("", PIPELINE_VERSION):
                raise NotFound(f"pipeline {name!r} has only version {PIPELINE_VERSION}")
            return pipeline_metadata(target)
        try:
            meta = service_pb2.ModelMetadataResponse.FromString(await self.core.model_query("metadata", name))
        except DecodeError:
            raise Internal("the inference service sent unreadable model metadata") from None
        if version and version not in meta.versions:
            raise NotFound(f"model {name!r} has no version {version!r}; versions: {', '.join(meta.versions)}")
        return meta

    async def infer(self, req: InferRequest, remaining_s: float | None = None) -> InferResult:
        if not self.is_ready():  # starting or draining: say so now rather than time out
            raise Unavailable("the gateway is not ready")
        target = await self.resolve(req.model)
        if isinstance(target, PipelineSpec):
            response = await self.core.predict(call_from_request(target, req, remaining_s))
            return pipeline_result(req, response)
        started, version = time.perf_counter(), ""
        try:
            result = await self._infer_model(target, req, remaining_s)
            version = result.version
            return result
        finally:  # a direct model call is timed as the gateway stage of pipeline "model:<name>"
            elapsed_ms = (time.perf_counter() - started) * 1000.0
            model = target.name if version else ""  # as for a pipeline: empty when the call failed
            self.core.observe_stage("gateway", f"model:{target.name}", model, version, elapsed_ms)

    async def _infer_model(self, model: ModelEntry, req: InferRequest, remaining_s: float | None) -> InferResult:
        if req.version and req.version not in model.versions:
            raise NotFound(f"model {model.name!r} has no ready version {req.version!r}; ready: {list(model.versions)}")
        opts = options(req)
        settings = self.core.settings
        if opts.timeout_ms > settings.max_timeout_ms:
            raise InvalidArgument(f"timeout_ms must be at most {settings.max_timeout_ms}")
        timeout_ms = opts.timeout_ms or settings.default_timeout_ms
        if remaining_s is not None:
            timeout_ms = min(timeout_ms, int(remaining_s * 1000))
        if timeout_ms <= 0:
            raise DeadlineExceeded("the caller's deadline has already passed")
        rows = model_rows(req, batched=model.batched)
        most = model.max_batch_size or MAX_ROWS
        if len(rows) > most:
            raise InvalidArgument(f"a batch of {len(rows)} rows for model {model.name!r}; at most {most}")
        # One part per row: the inference service batches parts itself. Only a single row
        # can keep the caller's id (ids are unique while in flight).
        request_id = opts.request_id if len(rows) == 1 else ""
        answers: list[pb.Part] = await asyncio.gather(
            *(
                self.core.infer_model(
                    model.name, row, timeout_ms=timeout_ms, request_id=request_id, bypass_cache=opts.bypass_cache
                )
                for row in rows
            )
        )
        result = model_result(req, answers, batched=model.batched, request_id=answers[0].request_id)
        if req.version and result.version != req.version:
            raise LoomError(
                f"the mesh routes {model.name!r} by its traffic policy and ran version {result.version!r}, "
                f"not {req.version!r}; leave the version empty",
                code=Code.FAILED_PRECONDITION,
            )
        return result

    async def repository_index(self) -> list[tuple[str, str, str, str]]:
        """(name, version, state, reason) of every pipeline and model."""
        index = [
            (name, PIPELINE_VERSION, "READY" if await self.model_ready(name) else "UNAVAILABLE", "")
            for name in self.core.pipelines.names()
        ]
        for name, entry in sorted((await self.models()).items()):
            if name in self.core.pipelines.names():
                continue  # a pipeline of the same name hides the model
            index += [(name, v, "READY", "") for v in entry.versions] or [(name, "", "UNAVAILABLE", "no ready version")]
        return index
