"""The monitor's HTTP side: the dashboard page, its JSON API and the OTLP/HTTP receiver, and who may call them.

Reads need the role viewer and whatever changes the monitor's state needs admin
(:data:`ACCESS`; ``openapi.yaml`` documents both). The page itself and its
static files are open: they hold no data, and the page's own fetches carry the
caller's key (``static/dashboard.js``). Spans come in from services and Triton,
which send a ``predict`` key: a data-plane writer's role.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from services.common import auth
from services.common.access import ADMIN, OPEN, PREDICT, READ, Access, AccessTable
from services.common.envelope import now_ms
from services.common.registry.schema import ModelRecord
from services.monitor.otlp_receiver import make_http_handler
from services.monitor.rollout import weight

if TYPE_CHECKING:
    from services.monitor.service import Monitor

STATIC = Path(__file__).resolve().parent / "static"
OPENAPI = Path(__file__).resolve().parent / "openapi.yaml"
OTLP_GRPC_EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"

_READS = (
    "/openapi.yaml",
    "/v1/dashboard",
    "/v1/stats",
    "/v1/alerts",
    "/v1/traces",
    "/v1/traces/{id}",
    "/v1/drift",
    "/v1/drift/baseline",
    "/v1/accuracy",
    "/v1/slo",
    "/v1/rollouts",
    "/v1/versions",
)
HTTP: dict[tuple[str, str], Access] = {
    ("GET", "/"): OPEN,  # the page and its files: no data in them
    ("GET", "/static"): OPEN,
    **{("GET", path): READ for path in _READS},
    ("POST", "/v1/traces"): PREDICT,  # OTLP/HTTP span ingest (Triton)
    ("POST", "/v1/drift/baseline"): ADMIN,
    ("POST", "/v1/evaluate"): ADMIN,
}
#: What the monitor's routes and methods need (the runtime adds health and /metrics).
ACCESS = AccessTable(HTTP, {OTLP_GRPC_EXPORT: PREDICT})


def _actor() -> str:
    principal = auth.current()
    return principal.name if principal is not None else "anonymous"


async def audited(
    m: Monitor, action: str, target: str, response: web.Response, details: dict[str, Any]
) -> web.Response:
    """``response`` after the audit entry of the admin action that produced it (ok, or refused on a 4xx)."""
    log = m.audit  # None before the monitor started: without a bus no entry can go
    if log is not None:
        result = "ok" if response.status < 400 else "refused"
        if response.status >= 400 and response.text:
            details = {**details, "error": response.text[:500]}
        await log.record(action, actor=_actor(), target=target, result=result, details=details)
    return response


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def models_view(m: Monitor, t: int) -> dict[str, Any]:
    traffic: dict[tuple[Any, Any], dict[str, Any]] = {
        (r["model"], r["version"]): r for r in m.traffic.snapshot(t, m.ms.slo_short_s)
    }
    ready = {(s.model, s.version): s.ready for s in m.triton.models}
    records = m.rollouts.view() if m.rollouts is not None else {}
    in_rollout = {(name, rec.rollout.version) for name, rec in records.items() if rec.rollout is not None}
    rows = []
    for key in sorted(set(traffic) | set(ready) | in_rollout):
        model, version = key
        row = traffic.get(key) or {"model": model, "version": version, "requests": 0, "share": 0.0}
        per = m.triton.per_request_us.get(key, {})
        rows.append(
            {
                "p50_ms": None,
                "p95_ms": None,
                **row,
                "ready": ready.get(key),
                "queue_us_per_request": _r(per.get("queue")),
                "compute_us_per_request": _r(per.get("compute")),
                "rollout": rollout_cell(records.get(model), version),
            }
        )
    return {"triton": m.triton.snapshot(), "versions": rows}


def rollout_cell(rec: ModelRecord | None, version: str) -> dict[str, Any] | None:
    """The models table's rollout column for the version being rolled out: {stage, percent, state}."""
    r = None if rec is None else rec.rollout
    if rec is None or r is None or r.version != version:
        return None
    if r.active:
        stage = f"step {r.step + 1}/{len(r.steps)}" + (" paused" if r.state == "paused" else "")
    else:
        stage = {"succeeded": "promoted", "rolled_back": "rolled back"}.get(r.state, r.state)
    return {"stage": stage, "percent": weight(rec), "state": r.state, "id": r.id}


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def dashboard(m: Monitor) -> dict[str, Any]:
    t = now_ms()
    stages = [
        {k: s[k] for k in ("pipeline", "service", "stage", "count", "errors", "mean_ms", "p50_ms", "p95_ms", "p99_ms")}
        for s in m.book.rows()
    ]
    return {
        "generated_unix_ms": t,
        "pipelines": m.slo.snapshot(m.slo_specs(), t),
        "stages": stages,
        "models": models_view(m, t),
        "drift": m.latest["drift"],
        "accuracy": m.latest["accuracy"],
        "alerts": [a.to_dict() for a in m.alerts.firing()],
        "traces": m.traces.recent(limit=20),
    }


def add_routes(app: web.Application, m: Monitor) -> None:
    async def index(_: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html")

    async def openapi(_: web.Request) -> web.FileResponse:
        return web.FileResponse(OPENAPI, headers={"Content-Type": "application/yaml"})

    async def get_dashboard(_: web.Request) -> web.Response:
        return web.json_response(dashboard(m))

    async def get_stats(_: web.Request) -> web.Response:
        return web.json_response(m.book.snapshot())

    async def get_alerts(request: web.Request) -> web.Response:
        state = request.query.get("state", "active")
        if state not in ("active", "all"):
            return _error(400, "INVALID_ARGUMENT", "state must be 'active' or 'all'")
        alerts = m.alerts.firing() if state == "active" else m.alerts.all()
        return web.json_response({"alerts": [a.to_dict() for a in alerts]})

    async def list_traces(request: web.Request) -> web.Response:
        try:
            limit = int(request.query.get("limit", "20"))
        except ValueError:
            return _error(400, "INVALID_ARGUMENT", "limit must be an integer")
        return web.json_response({"traces": m.traces.recent(limit=max(1, min(limit, 500)))})

    async def get_trace(request: web.Request) -> web.Response:
        ident = request.match_info["id"]
        found = m.traces.get(ident)
        if found is None:
            return _error(404, "NOT_FOUND", f"no trace {ident!r} (by trace id or request id) in the monitor's store")
        return web.json_response(found)

    async def get_drift(_: web.Request) -> web.Response:
        return web.json_response({"features": m.latest["drift"]})

    async def get_baseline(_: web.Request) -> web.Response:
        return web.json_response(m.drift.dump())

    async def post_baseline(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        action = body.get("action") if isinstance(body, dict) else None
        pipeline = body.get("pipeline") if isinstance(body, dict) else None
        pipeline = pipeline if isinstance(pipeline, str) and pipeline else None
        what = f"monitor.baseline.{action}" if action in ("capture", "load") else "monitor.baseline"
        return await audited(m, what, f"drift/{pipeline or '*'}", baseline(body, action, pipeline), {})

    def baseline(body: Any, action: Any, pipeline: str | None) -> web.Response:
        if body is None:
            return _error(400, "INVALID_ARGUMENT", "the body must be JSON")
        if action == "capture":
            m.drift.capture(pipeline)
            return web.json_response({"capturing": True, "pipeline": pipeline}, status=202)
        if action == "load":
            try:
                m.drift.load(body.get("baseline"))
            except (ValueError, TypeError, KeyError) as exc:
                return _error(400, "INVALID_ARGUMENT", f"bad baseline: {exc}")
            return web.json_response({"loaded": True})
        return _error(400, "INVALID_ARGUMENT", "action must be 'capture' or 'load'")

    async def get_accuracy(_: web.Request) -> web.Response:
        return web.json_response({"accuracy": m.latest["accuracy"]})

    async def get_slo(_: web.Request) -> web.Response:
        return web.json_response({"pipelines": m.slo.snapshot(m.slo_specs(), now_ms())})

    async def get_rollouts(_: web.Request) -> web.Response:
        if m.rollouts is None:
            return web.json_response({"enabled": False, "rollouts": []})
        return web.json_response({"enabled": True, "rollouts": m.rollouts.rows()})

    async def get_versions(request: web.Request) -> web.Response:
        try:
            window_s = float(request.query.get("window_s", str(m.ms.slo_short_s)))
        except ValueError:
            return _error(400, "INVALID_ARGUMENT", "window_s must be a number of seconds")
        if not 0 < window_s <= m.ms.slo_long_s:
            return _error(400, "INVALID_ARGUMENT", f"window_s must be in (0, {m.ms.slo_long_s}]")
        return web.json_response({"versions": m.versions.snapshot(now_ms(), window_s)})

    async def evaluate(_: web.Request) -> web.Response:
        await m.evaluate()
        return await audited(m, "monitor.evaluate", "monitor", web.json_response({"evaluated_unix_ms": now_ms()}), {})

    app.router.add_get("/", index)
    app.router.add_static("/static/", STATIC)
    app.router.add_get("/openapi.yaml", openapi)
    app.router.add_get("/v1/dashboard", get_dashboard)
    app.router.add_get("/v1/stats", get_stats)
    app.router.add_get("/v1/alerts", get_alerts)
    app.router.add_get("/v1/traces", list_traces)
    app.router.add_post("/v1/traces", make_http_handler(m.traces))
    app.router.add_get("/v1/traces/{id}", get_trace)
    app.router.add_get("/v1/drift", get_drift)
    app.router.add_get("/v1/drift/baseline", get_baseline)
    app.router.add_post("/v1/drift/baseline", post_baseline)
    app.router.add_get("/v1/accuracy", get_accuracy)
    app.router.add_get("/v1/slo", get_slo)
    app.router.add_get("/v1/rollouts", get_rollouts)
    app.router.add_get("/v1/versions", get_versions)
    app.router.add_post("/v1/evaluate", evaluate)
