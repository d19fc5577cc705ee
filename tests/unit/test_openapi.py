"""The OpenAPI document matches the routes the gateway really serves."""

import pytest
import yaml
from aiohttp import web

from services.common.bus import Bus
from services.common.pipelines import PipelineRegistry
from services.gateway.core import GatewayCore
from services.gateway.http_api import OPENAPI, GatewayHttp
from services.gateway.settings import GatewaySettings

pytestmark = pytest.mark.unit


def test_every_route_is_documented_and_nothing_more() -> None:
    doc = yaml.safe_load(OPENAPI.read_text())
    assert doc["openapi"].startswith("3.")
    app = web.Application()
    GatewayHttp(GatewayCore(Bus("gateway"), GatewaySettings(), PipelineRegistry()), 1024).add_routes(app)
    served = {
        (r.resource.canonical, r.method.lower())  # type: ignore[union-attr]
        for r in app.router.routes()
        if r.method != "HEAD"
    } | {("/metrics", "get"), ("/healthz", "get"), ("/readyz", "get")}
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops if method != "parameters"}
    assert documented == served
    predict = doc["paths"]["/v1/pipelines/{pipeline}:predict"]["post"]
    assert {"200", "400", "404", "413", "503", "504"} <= set(predict["responses"])
