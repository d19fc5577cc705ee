"""HTTP adapter: the ``/v1`` JSON API (predict, pipeline specs) and the OpenAPI and AsyncAPI documents.

``POST /v1/pipelines/{pipeline}:predict`` takes JSON (files base64-encoded)
or ``multipart/form-data`` (files as file parts: ``curl -F image=@photo.png``).
"""

from __future__ import annotations

import json
from pathlib import Path

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import BadHttpMessage

from services.common.audit import AuditLog
from services.common.errors import (
    Code,
    InvalidArgument,
    LoomError,
    ResourceExhausted,
    as_loom_error,
    http_body,
    http_status,
)
from services.common.pipeline_store import PipelineStore
from services.common.pipelines import to_yaml
from services.gateway import convert
from services.gateway.admin import REFUSALS, caller
from services.gateway.core import ROUTE_KEY, GatewayCore, PredictCall
from services.gateway.durable import DurableFront
from services.gateway.edges import body_too_large, http_traced, read_body
from services.gateway.settings import GatewaySettings

OPENAPI = Path(__file__).with_name("openapi.yaml")
#: The NATS interface (AsyncAPI 3), kept beside the deployment files of this checkout.
ASYNCAPI = Path(__file__).resolve().parents[2] / "deploy" / "asyncapi.yaml"
#: The standard retry-safety header (IETF draft "The Idempotency-Key HTTP Header Field").
IDEMPOTENCY_KEY = "Idempotency-Key"


def error_response(exc: Exception) -> web.Response:
    err = as_loom_error(exc)
    return web.json_response(http_body(err), status=http_status(err))


class GatewayHttp:
    def __init__(
        self,
        core: GatewayCore,
        store: PipelineStore,
        settings: GatewaySettings,
        audit: AuditLog,
        lane: DurableFront | None = None,
    ) -> None:
        self.core = core
        self.lane = lane
        self.store = store
        self.max_body_bytes = settings.max_body_bytes
        self.max_input_bytes = settings.max_input_bytes
        #: PUT /v1/pipelines is an admin action: audited like those of the admin API.
        self.audit = audit

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(
            "/v1/pipelines/{pipeline}:predict", http_traced(self.predict, render_error=error_response, done=self._done)
        )
        if self.lane is not None:
            app.router.add_post(
                "/v1/pipelines/{pipeline}:submit",
                http_traced(self.submit, render_error=error_response, done=self._done),
            )
            app.router.add_get("/v1/results/{request_id}", http_traced(self.result, render_error=error_response))
        app.router.add_get("/v1/pipelines", self.list_pipelines)
        app.router.add_get("/v1/pipelines/{pipeline}", self.get_pipeline)
        app.router.add_put("/v1/pipelines/{pipeline}", self.put_pipeline)
        app.router.add_post("/v1/feedback", self.feedback)
        app.router.add_get("/openapi.yaml", self.openapi)
        app.router.add_get("/asyncapi.yaml", self.asyncapi)

    def _too_large(self, size: int | None = None) -> ResourceExhausted:
        return body_too_large(self.max_body_bytes, self.max_input_bytes, size)

    async def _read(self, request: web.Request) -> bytes:
        return await read_body(request, self.max_body_bytes, self.max_input_bytes)

    async def _read_call(self, request: web.Request, pipeline: str) -> PredictCall:
        if request.content_type == "multipart/form-data":
            return convert.call_from_form(pipeline, await self._read_form(request))
        raw = await self._read(request)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise InvalidArgument("the body is not valid JSON") from None
        return convert.call_from_json(pipeline, body)

    async def _read_form(self, request: web.Request) -> dict[str, tuple[bytes, str, bool]]:
        try:
            return await self._read_parts(request)
        except (BadHttpMessage, ValueError) as exc:
            # aiohttp's multipart reader raises these for a body that breaks the format (a part header
            # that is not a valid HTTP header, a wrong boundary): the client's mistake, not INTERNAL.
            raise InvalidArgument(f"the multipart/form-data body is malformed ({type(exc).__name__})") from None

    async def _read_parts(self, request: web.Request) -> dict[str, tuple[bytes, str, bool]]:
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            raise self._too_large(request.content_length)
        fields: dict[str, tuple[bytes, str, bool]] = {}
        total = 0
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader) or not part.name:
                raise InvalidArgument("every form part needs a name (the input it carries)")
            chunks = []
            while chunk := await part.read_chunk(256 * 1024):
                total += len(chunk)
                if total > self.max_body_bytes:
                    raise self._too_large()
                chunks.append(chunk)
            fields[part.name] = (b"".join(chunks), part.headers.get("Content-Type", ""), part.filename is not None)
        return fields

    async def predict(self, request: web.Request) -> web.Response:
        call = await self._read_call(request, request.match_info["pipeline"])
        call.route_key = request.headers.get(ROUTE_KEY, "")
        return web.json_response(convert.response_to_json(await self.core.predict(call)))

    async def submit(self, request: web.Request) -> web.Response:
        """Accept into the durable lane: 202 with the id to fetch the result by (``Idempotency-Key`` honoured)."""
        assert self.lane is not None
        call = await self._read_call(request, request.match_info["pipeline"])
        call.route_key = request.headers.get(ROUTE_KEY, "")
        accepted = await self.lane.submit(call, request.headers.get(IDEMPOTENCY_KEY, ""))
        location = f"/v1/results/{accepted.request_id}"
        return web.json_response(
            {"request_id": accepted.request_id, "duplicate": accepted.duplicate, "result": location},
            status=202,
            headers={"Location": location},
        )

    async def result(self, request: web.Request) -> web.Response:
        assert self.lane is not None
        return web.json_response(convert.result_to_json(await self.lane.get_result(request.match_info["request_id"])))

    def _done(self, request: web.Request, code: str, seconds: float) -> None:
        self.core.record(request.match_info["pipeline"], code, "http", seconds)

    async def list_pipelines(self, _: web.Request) -> web.Response:
        specs = [self.core.pipelines.get(n) for n in self.core.pipelines.names()]
        return web.json_response(
            {
                "pipelines": [s.name for s in specs],
                "specs": {s.name: s.model_dump(mode="json") for s in specs},
            }
        )

    async def get_pipeline(self, request: web.Request) -> web.Response:
        try:
            spec = self.core.pipelines.get(request.match_info["pipeline"])
        except LoomError as exc:
            return error_response(exc)
        if "yaml" in request.headers.get("Accept", ""):
            return web.Response(text=to_yaml(spec), content_type="application/yaml")
        return web.json_response(spec.model_dump(mode="json"))

    async def put_pipeline(self, request: web.Request) -> web.Response:
        """Validate a spec (YAML or JSON) and store it in KV; every service picks it up from there."""
        name = request.match_info["pipeline"]
        try:
            spec, revision = await self.store.apply(await self._read(request), name=name)
        except Exception as exc:
            err = as_loom_error(exc)
            result = "refused" if err.code in REFUSALS or err.code == Code.RESOURCE_EXHAUSTED else "failed"
            details = {"error": err.message}
            await self.audit.record("pipeline.put", actor=caller(), target=name, result=result, details=details)
            return error_response(err)
        await self.audit.record("pipeline.put", actor=caller(), target=name, details={"revision": revision})
        return web.json_response({"pipeline": spec.name, "revision": revision, "spec": spec.model_dump(mode="json")})

    async def feedback(self, request: web.Request) -> web.Response:
        """Ground truth for an answer (``request_id``); the monitor joins it for accuracy."""
        try:
            raw = await self._read(request)
            try:
                doc = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                raise InvalidArgument("the body is not valid JSON") from None
            fb = await self.core.feedback(doc)
        except Exception as exc:
            return error_response(exc)
        return web.json_response({"accepted": True, "pipeline": fb.pipeline, "request_id": fb.request_id}, status=202)

    async def openapi(self, _: web.Request) -> web.Response:
        return web.Response(text=OPENAPI.read_text(), content_type="application/yaml")

    async def asyncapi(self, _: web.Request) -> web.Response:
        return web.Response(text=ASYNCAPI.read_text(), content_type="application/yaml")
