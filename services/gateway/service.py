"""The gateway service: wires the core to gRPC, HTTP and NATS."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from typing import ClassVar

import grpc
from aiohttp import web

from services.common.access import AccessTable
from services.common.audit import AuditLog
from services.common.lifecycle import Runtime, Service
from services.common.pipeline_store import PipelineStore
from services.common.pipelines import default_dir, load_dir
from services.common.registry.store import RegistryStore
from services.gateway.access import TABLE
from services.gateway.admin import AdminCore
from services.gateway.admin_grpc import SERVICE as ADMIN_SERVICE
from services.gateway.admin_grpc import AdminGrpc
from services.gateway.admin_http import AdminHttp
from services.gateway.admission import Admission, AdmissionInterceptor
from services.gateway.admission import http_middleware as admission_middleware
from services.gateway.core import GatewayCore
from services.gateway.durable import DurableFront
from services.gateway.edges import NotReadyInterceptor, not_ready_middleware
from services.gateway.grpc_api import SERVICE, GatewayGrpc
from services.gateway.http_api import GatewayHttp
from services.gateway.kserve_dataplane import KServeDataPlane
from services.gateway.kserve_grpc import SERVICE as KSERVE_SERVICE
from services.gateway.kserve_grpc import KServeGrpc
from services.gateway.kserve_http import KServeHttp
from services.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)


class Gateway(Service):
    name: ClassVar[str] = "gateway"
    grpc_service_names: ClassVar[tuple[str, ...]] = (SERVICE, KSERVE_SERVICE, ADMIN_SERVICE)

    def __init__(self, settings: GatewaySettings) -> None:
        super().__init__(settings)
        self.gw = settings
        self._core: GatewayCore | None = None
        self._store: PipelineStore | None = None
        self._kserve: KServeDataPlane | None = None
        self._admin: AdminCore | None = None
        self._lane: DurableFront | None = None
        self._audit: AuditLog | None = None
        # One for both ports: HTTP and gRPC calls share the in-flight limit and the tenants' rates.
        self.admission = Admission.from_settings(settings)
        #: Whether the runtime says ready (set in bind); until then every data-plane call is UNAVAILABLE.
        self._ready: Callable[[], bool] = lambda: False

    @property
    def core(self) -> GatewayCore:
        assert self._core is not None, "bind() first"
        return self._core

    def bind(self, rt: Runtime) -> None:
        self._core = GatewayCore(rt.bus, self.gw, rt.pipelines, rt.claims)
        self._lane = DurableFront(rt.bus, self._core, rt.claims, rt.lane) if rt.lane is not None else None
        self._store = rt.store
        self._ready = rt.ready.is_set
        # KServe's ServerReady is the gateway's own readiness, as /readyz reports it.
        self._kserve = KServeDataPlane(self._core, lambda: rt.ready.is_set() and rt.bus.connected)
        registry = RegistryStore(rt.bus, self.gw.models_bucket, service=self.name)
        self._audit = rt.audit
        self._admin = AdminCore(rt.bus, registry, rt.audit, self.gw)

    async def start(self, rt: Runtime) -> None:
        directory = self.gw.pipelines_dir or default_dir()
        added = await rt.store.seed(directory)
        if added:
            log.info("stored pipeline specs %s from %s", added, directory)
        await rt.store.wait_for([spec.name for spec in load_dir(directory)])
        await self.core.start()
        if self._lane is not None:
            await self._lane.start()
        assert self._admin is not None, "bind() first"
        # Reads go to KV each time (admin calls are rare), so no watch to keep.
        await self._admin.registry.start(watch=False)
        await self._admin.audit.start()
        await self._admin.seed()
        # What start-up built lives as long as the process: out of the collector's sight, a full
        # collection no longer walks it (measured: a 40-65 ms pause in every call in flight, refusals
        # too, became none over 10 ms).
        gc.collect()
        gc.freeze()

    async def stop(self) -> None:
        if self._admin is not None:
            await self._admin.registry.stop()

    def add_grpc(self, server: grpc.aio.Server) -> None:
        assert self._kserve is not None and self._admin is not None and self._audit is not None, "bind() first"
        server.add_generic_rpc_handlers(
            (
                GatewayGrpc(self.core, self._lane).handler(),
                KServeGrpc(self._kserve).handler(),
                AdminGrpc(self._admin).handler(),
            )
        )

    def access(self) -> AccessTable:
        return TABLE

    def grpc_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        # Inside the runtime's authentication, whose wrapper binds the tenant around ours.
        # Not ready first: a call refused for that takes no admission slot and none of the tenant's rate.
        return [NotReadyInterceptor(lambda: self._ready()), AdmissionInterceptor(self.admission)]

    def add_http(self, app: web.Application) -> None:
        assert self._store is not None, "bind() first"
        assert self._kserve is not None and self._admin is not None and self._audit is not None, "bind() first"
        # After the runtime's authentication (the app's first middleware), before any handler reads a body.
        app.middlewares.append(not_ready_middleware(lambda: self._ready()))
        app.middlewares.append(admission_middleware(self.admission))
        GatewayHttp(self.core, self._store, self.gw, self._audit, self._lane).add_routes(app)
        AdminHttp(self._admin).add_routes(app)
        KServeHttp(self._kserve, self.gw).add_routes(app)

    def grpc_options(self) -> list[tuple[str, int]]:
        return [("grpc.max_receive_message_length", self.gw.max_body_bytes)]

    def http_client_max_size(self) -> int:
        return self.gw.max_body_bytes
