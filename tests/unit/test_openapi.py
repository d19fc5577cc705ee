"""The OpenAPI document matches the routes the gateway really serves."""

import pytest
import yaml
from aiohttp import web

from services.common.lifecycle import Runtime
from services.gateway import access
from services.gateway.http_api import OPENAPI
from services.gateway.service import Gateway
from services.gateway.settings import GatewaySettings

pytestmark = pytest.mark.unit


def test_every_route_is_documented_and_nothing_more() -> None:
    doc = yaml.safe_load(OPENAPI.read_text())
    assert doc["openapi"].startswith("3.")
    app = web.Application()
    settings = GatewaySettings()
    gateway = Gateway(settings)
    gateway.bind(Runtime.create("gateway", settings))
    gateway.add_http(app)  # every route the service adds, whichever module adds it
    served = {
        (r.resource.canonical, r.method.lower())  # type: ignore[union-attr]
        for r in app.router.routes()
        if r.method != "HEAD"
    } | {("/metrics", "get"), ("/healthz", "get"), ("/readyz", "get")}
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops if method != "parameters"}
    assert documented == served
    predict = doc["paths"]["/v1/pipelines/{pipeline}:predict"]["post"]
    assert {"200", "400", "404", "413", "503", "504"} <= set(predict["responses"])


def test_each_operation_documents_the_roles_the_gateway_asks_for() -> None:
    doc = yaml.safe_load(OPENAPI.read_text())
    assert set(doc["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if method == "parameters":
                continue
            need = access.http_access(method.upper(), path)
            security = op.get("security", doc["security"])  # the document's default: admin-only
            if need is None:
                assert security == [], (method, path)
            else:
                assert security == [{"bearer": sorted(need)}, {"apiKey": sorted(need)}], (method, path)
                assert {"401", "403"} <= set(op["responses"]), (method, path)
