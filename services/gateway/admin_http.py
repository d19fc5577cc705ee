"""HTTP adapter: the ``/v1/admin`` JSON API over :class:`AdminCore`.

Records are ``ModelRecord.model_dump(mode="json")``; errors are the gateway's
``{"error": {"code", "message"}}`` with the status of Loom's error table (a
malformed body is 400 and says what is wrong). The actor of every audit entry
is the authenticated caller (``services.gateway.access``). A body refused here,
before the core sees it, is audited as a refused attempt all the same.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from services.common.errors import InvalidArgument, LoomError
from services.gateway.admin import AdminCore, caller, parse
from services.gateway.edges import HttpHandler, http_traced, read_body
from services.gateway.http_api import error_response

PREFIX = "/v1/admin"
#: Admin bodies are small documents; anything bigger is a mistake.
MAX_BODY = 1024 * 1024

B = TypeVar("B", bound=BaseModel)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RegisterBody(_Body):
    source: str  # a version folder the gateway can read
    version: str = ""  # default: the folder's name
    notes: str = ""


class RolloutBody(_Body):
    version: str
    steps: list[Any] | None = None  # default: the gateway's plan
    thresholds: dict[str, Any] | None = None


class ReasonBody(_Body):
    reason: str = ""


class PromoteBody(_Body):
    version: str = ""  # default: the rollout's canary


class AdminHttp:
    def __init__(self, admin: AdminCore) -> None:
        self.admin = admin

    def add_routes(self, app: web.Application) -> None:
        def route(method: str, path: str, handler: HttpHandler) -> None:
            app.router.add_route(method, PREFIX + path, http_traced(handler, render_error=error_response))

        route("GET", "/models", self.list_models)
        route("GET", "/models/{model}", self.get_model)
        route("POST", "/models/{model}/versions", self.register)
        route("DELETE", "/models/{model}/versions/{version}", self.retire)
        route("PUT", "/models/{model}/traffic", self.set_traffic)
        route("POST", "/models/{model}/rollout", self.start_rollout)
        route("GET", "/models/{model}/rollout", self.rollout_status)
        route("POST", "/models/{model}/rollout:pause", self.pause_rollout)
        route("POST", "/models/{model}/rollout:resume", self.resume_rollout)
        route("POST", "/models/{model}/rollout:abort", self.abort_rollout)
        route("POST", "/models/{model}:promote", self.promote)
        route("POST", "/models/{model}:rollback", self.rollback)
        route("GET", "/audit", self.audit)
        route("GET", "/dlq", self.list_dead_letters)
        route("POST", "/dlq/{seq}:replay", self.replay_dead_letter)

    async def _json(self, request: web.Request) -> Any:
        """The body as JSON; an empty body is ``{}`` (every field optional)."""
        raw = await read_body(request, MAX_BODY, MAX_BODY)
        if not raw.strip():
            return {}
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise InvalidArgument("the body is not valid JSON") from None

    async def _body(self, request: web.Request, cls: type[B], action: str, target: str) -> B:
        """The body as ``cls``; a refusal is audited under ``action`` before it is answered."""
        try:
            return parse(cls, await self._json(request), "the body")
        except LoomError as exc:
            await self.admin.refused(action, caller(), target, exc)
            raise

    async def list_models(self, _: web.Request) -> web.Response:
        return web.json_response({"models": [r.model_dump(mode="json") for r in await self.admin.list_models()]})

    async def get_model(self, request: web.Request) -> web.Response:
        rec = await self.admin.get_model(request.match_info["model"])
        return web.json_response(rec.model_dump(mode="json"))

    async def register(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        body = await self._body(request, RegisterBody, "model.register", model)
        rec = await self.admin.register(model, body.source, version=body.version, notes=body.notes, actor=caller())
        return web.json_response(rec.model_dump(mode="json"), status=201)

    async def retire(self, request: web.Request) -> web.Response:
        info = request.match_info
        rec = await self.admin.retire(info["model"], info["version"], actor=caller())
        return web.json_response(rec.model_dump(mode="json"))

    async def set_traffic(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        try:
            policy = await self._json(request)
        except LoomError as exc:
            await self.admin.refused("traffic.set", caller(), model, exc)
            raise
        rec = await self.admin.set_traffic(model, policy, actor=caller())
        return web.json_response(rec.model_dump(mode="json"))

    async def start_rollout(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        body = await self._body(request, RolloutBody, "rollout.start", model)
        rollout = await self.admin.start_rollout(
            model, body.version, steps=body.steps, thresholds=body.thresholds, actor=caller()
        )
        return web.json_response(rollout.model_dump(mode="json"), status=201)

    async def rollout_status(self, request: web.Request) -> web.Response:
        status = await self.admin.rollout_status(request.match_info["model"])
        current = status.current.model_dump(mode="json") if status.current is not None else None
        return web.json_response({"current": current, "history": [r.model_dump(mode="json") for r in status.history]})

    async def pause_rollout(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        body = await self._body(request, ReasonBody, "rollout.pause", model)
        rollout = await self.admin.pause_rollout(model, body.reason, actor=caller())
        return web.json_response(rollout.model_dump(mode="json"))

    async def resume_rollout(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        await self._body(request, ReasonBody, "rollout.resume", model)
        rollout = await self.admin.resume_rollout(model, actor=caller())
        return web.json_response(rollout.model_dump(mode="json"))

    async def abort_rollout(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        body = await self._body(request, ReasonBody, "rollout.abort", model)
        rollout = await self.admin.abort_rollout(model, body.reason, actor=caller())
        return web.json_response(rollout.model_dump(mode="json"))

    async def promote(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        body = await self._body(request, PromoteBody, "model.promote", model)
        rec = await self.admin.promote(model, body.version, actor=caller())
        return web.json_response(rec.model_dump(mode="json"))

    async def rollback(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        body = await self._body(request, ReasonBody, "model.rollback", model)
        rec = await self.admin.rollback(model, body.reason, actor=caller())
        return web.json_response(rec.model_dump(mode="json"))

    async def audit(self, request: web.Request) -> web.Response:
        raw = request.query.get("limit", "100")
        if not raw.isdigit():
            raise InvalidArgument(f"limit must be a whole number, not {raw!r}")
        entries = await self.admin.audit_entries(limit=int(raw), model=request.query.get("model", ""))
        return web.json_response({"entries": entries})

    async def list_dead_letters(self, request: web.Request) -> web.Response:
        raw = request.query.get("limit", "100")
        if not raw.isdigit():
            raise InvalidArgument(f"limit must be a whole number, not {raw!r}")
        letters = await self.admin.list_dead_letters(limit=int(raw), stage=request.query.get("stage", ""))
        return web.json_response({"dead_letters": letters})

    async def replay_dead_letter(self, request: web.Request) -> web.Response:
        raw = request.match_info["seq"]
        if not raw.isdigit():
            raise InvalidArgument(f"a dead letter is named by its sequence number, not {raw!r}")
        return web.json_response(await self.admin.replay_dead_letter(int(raw), actor=caller()))
