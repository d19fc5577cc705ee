"""HTTP adapter: ``POST /v1/pipelines/{pipeline}:predict`` and the OpenAPI document."""

from __future__ import annotations

import json
import time
from pathlib import Path

from aiohttp import web
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from services.common.errors import InvalidArgument, LoomError, ResourceExhausted, as_loom_error, http_body, http_status
from services.common.telemetry import extract
from services.gateway import convert
from services.gateway.core import GatewayCore

OPENAPI = Path(__file__).with_name("openapi.yaml")
_tracer = trace.get_tracer("loom.gateway")


class GatewayHttp:
    def __init__(self, core: GatewayCore, max_body_bytes: int) -> None:
        self.core = core
        self.max_body_bytes = max_body_bytes

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/pipelines/{pipeline}:predict", self.predict)
        app.router.add_get("/v1/pipelines", self.list_pipelines)
        app.router.add_get("/openapi.yaml", self.openapi)

    async def _read_json(self, request: web.Request) -> object:
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            raise ResourceExhausted(f"request body exceeds the limit of {self.max_body_bytes} bytes")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ResourceExhausted(f"request body exceeds the limit of {self.max_body_bytes} bytes") from None
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise InvalidArgument("the body is not valid JSON") from None

    async def predict(self, request: web.Request) -> web.Response:
        pipeline = request.match_info["pipeline"]
        started = time.perf_counter()
        code = "OK"
        with _tracer.start_as_current_span(
            "POST /v1/pipelines/{pipeline}:predict",
            context=extract(dict(request.headers)),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": "POST", "url.path": request.path},
        ) as span:
            try:
                call = convert.call_from_json(pipeline, await self._read_json(request))
                resp = await self.core.predict(call)
                return web.json_response(convert.response_to_json(resp))
            except Exception as exc:
                err = as_loom_error(exc)
                code = str(err.code)
                if not isinstance(exc, LoomError):
                    span.record_exception(exc)
                span.set_attribute("http.response.status_code", http_status(err))
                return web.json_response(http_body(err), status=http_status(err))
            finally:
                self.core.record(pipeline, code, "http", time.perf_counter() - started)

    async def list_pipelines(self, _: web.Request) -> web.Response:
        return web.json_response({"pipelines": self.core.pipelines.names()})

    async def openapi(self, _: web.Request) -> web.Response:
        return web.Response(text=OPENAPI.read_text(), content_type="application/yaml")
