"""HTTP adapter: the KServe v2 REST protocol under ``/v2``, with Triton's binary tensor data extension.

An unmodified ``tritonclient.http`` client can call the gateway as if it were
Triton. Errors are KServe's shape, ``{"error": "<message>"}``, with the HTTP
status of Loom's error table; readiness answers 200 for true and 400 for false.
"""

from __future__ import annotations

import json

from aiohttp import web

from services.common.errors import InvalidArgument, LoomError, http_status
from services.gateway.edges import HttpHandler, http_traced, read_body
from services.gateway.kserve_dataplane import EXTENSIONS, SERVER_NAME, KServeDataPlane
from services.gateway.kserve_rest import metadata_to_json, request_from_rest, to_rest_response
from services.gateway.settings import GatewaySettings

PROTOCOL = "kserve-http"
HEADER_LENGTH = "Inference-Header-Content-Length"


def error_response(err: LoomError) -> web.Response:
    return web.json_response({"error": err.message}, status=http_status(err))


def _ready(ok: bool) -> web.Response:
    return web.json_response({"ready": ok}, status=200 if ok else 400)


@web.middleware
async def _kserve_not_found(request: web.Request, handler: HttpHandler) -> web.StreamResponse:
    """Unrouted paths and methods under /v2 (model config, statistics, ...) get KServe's error shape.

    tritonclient.http reads every error body as JSON; aiohttp's plain-text 404 would break it.
    """
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or not (request.path == "/v2" or request.path.startswith("/v2/")):
            raise
        message = (
            f"Loom's KServe v2 REST does not offer {request.method} {request.path}; it offers GET /v2, "
            "/v2/health/live, /v2/health/ready, /v2/models/{m}[/versions/{v}][/ready], POST .../infer "
            "and POST /v2/repository/index"
        )
        return web.json_response({"error": message}, status=exc.status)


class KServeHttp:
    def __init__(self, plane: KServeDataPlane, settings: GatewaySettings) -> None:
        self.plane = plane
        self.settings = settings

    def add_routes(self, app: web.Application) -> None:
        get = app.router.add_get
        get("/v2", self._traced(self.server_metadata))
        get("/v2/health/live", self._traced(self.live))
        get("/v2/health/ready", self._traced(self.ready))
        for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            get(base, self._traced(self.model_metadata))
            get(f"{base}/ready", self._traced(self.model_ready))
            app.router.add_post(f"{base}/infer", self._traced(self.infer, record=True))
        app.router.add_post("/v2/repository/index", self._traced(self.repository_index))
        app.middlewares.append(_kserve_not_found)

    def _traced(self, handler: HttpHandler, *, record: bool = False) -> HttpHandler:
        """A SERVER span around ``handler``; any error becomes ``{"error": ...}`` with its status.

        ``record``: count the call in the request metrics (inference calls only).
        """
        return http_traced(handler, render_error=error_response, done=self._record if record else None)

    def _record(self, request: web.Request, code: str, seconds: float) -> None:
        self.plane.core.record(request.match_info.get("model", ""), code, PROTOCOL, seconds)

    async def server_metadata(self, _: web.Request) -> web.Response:
        return web.json_response({"name": SERVER_NAME, "version": self.plane.version, "extensions": list(EXTENSIONS)})

    async def live(self, _: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, _: web.Request) -> web.Response:
        return _ready(self.plane.is_ready())

    async def model_ready(self, request: web.Request) -> web.Response:
        info = request.match_info
        return _ready(await self.plane.model_ready(info["model"], info.get("version", "")))

    async def model_metadata(self, request: web.Request) -> web.Response:
        info = request.match_info
        return web.json_response(
            metadata_to_json(await self.plane.model_metadata(info["model"], info.get("version", "")))
        )

    async def repository_index(self, request: web.Request) -> web.Response:
        """Every pipeline and model; ``{"ready": true}`` in the body lists only the ready ones."""
        raw = await self._read(request)
        try:
            ready_only = bool(raw.strip()) and json.loads(raw).get("ready") is True
        except (ValueError, AttributeError):
            raise InvalidArgument('the body must be empty or a JSON object like {"ready": true}') from None
        index = await self.plane.repository_index()
        body = [
            {"name": n, "version": v, "state": s, **({"reason": r} if r else {})}
            for n, v, s, r in index
            if not ready_only or s == "READY"
        ]
        return web.json_response(body)

    async def _read(self, request: web.Request) -> bytes:
        return await read_body(request, self.settings.max_body_bytes, self.settings.max_input_bytes)

    async def infer(self, request: web.Request) -> web.Response:
        info, body = request.match_info, await self._read(request)
        req = request_from_rest(info["model"], info.get("version", ""), body, request.headers.get(HEADER_LENGTH))
        body, json_size = to_rest_response(req, await self.plane.infer(req))
        if json_size is None:
            return web.Response(body=body, content_type="application/json")
        return web.Response(body=body, content_type="application/octet-stream", headers={HEADER_LENGTH: str(json_size)})
