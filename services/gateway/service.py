"""The gateway service: wires the core to gRPC, HTTP and NATS."""

from __future__ import annotations

from typing import ClassVar

import grpc
from aiohttp import web

from services.common.lifecycle import Runtime, Service
from services.common.pipelines import PipelineRegistry
from services.gateway.core import GatewayCore
from services.gateway.grpc_api import SERVICE, GatewayGrpc
from services.gateway.http_api import GatewayHttp
from services.gateway.settings import GatewaySettings


class Gateway(Service):
    name: ClassVar[str] = "gateway"
    grpc_service_names: ClassVar[tuple[str, ...]] = (SERVICE,)

    def __init__(self, settings: GatewaySettings) -> None:
        super().__init__(settings)
        self.gw = settings
        self.pipelines = PipelineRegistry()
        self._core: GatewayCore | None = None

    @property
    def core(self) -> GatewayCore:
        assert self._core is not None, "bind() first"
        return self._core

    def bind(self, rt: Runtime) -> None:
        self._core = GatewayCore(rt.bus, self.gw, self.pipelines)

    async def start(self, rt: Runtime) -> None:
        await self.core.start()

    def add_grpc(self, server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((GatewayGrpc(self.core).handler(),))

    def add_http(self, app: web.Application) -> None:
        GatewayHttp(self.core, self.gw.max_body_bytes).add_routes(app)

    def grpc_options(self) -> list[tuple[str, int]]:
        return [("grpc.max_receive_message_length", self.gw.max_body_bytes)]

    def http_client_max_size(self) -> int:
        return self.gw.max_body_bytes
