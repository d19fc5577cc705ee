"""In-process servers on free loopback ports, for unit tests that need a real socket."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
from aiohttp import web

from services.monitor.otlp_receiver import TraceReceiver
from services.monitor.traces import TraceStore


@asynccontextmanager
async def serve_http(app: web.Application) -> AsyncIterator[int]:
    """Serve ``app`` on 127.0.0.1 at a free port; yields the port."""
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


@asynccontextmanager
async def otlp_receiver(store: TraceStore, **kwargs: Any) -> AsyncIterator[int]:
    """The monitor's OTLP/gRPC TraceReceiver filling ``store``, on a free loopback port; yields the port."""
    server = grpc.aio.server()
    TraceReceiver(store, **kwargs).add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)
