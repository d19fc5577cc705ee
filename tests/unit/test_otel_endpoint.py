"""OTEL_EXPORTER_OTLP_ENDPOINT (the standard variable) wins over LOOM_OTLP_ENDPOINT: services.common.telemetry's
set-up sends spans to the collector it names, and none to the monitor. Both ends are the monitor's real OTLP/gRPC
TraceReceiver on free loopback ports, in process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from services.common.settings import CommonSettings
from services.common.telemetry import setup_tracing
from services.monitor.traces import TraceStore
from tests.loopback import otlp_receiver

pytestmark = pytest.mark.unit


@asynccontextmanager
async def receiver() -> AsyncIterator[tuple[TraceStore, str]]:
    """A TraceReceiver on a free port: its store and its http:// endpoint."""
    store = TraceStore()
    async with otlp_receiver(store) as port:
        yield store, f"http://127.0.0.1:{port}"


@pytest.fixture(autouse=True)
def keep_the_global_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    # setup_tracing installs its provider globally; a test must not leave that behind for the next one.
    monkeypatch.setattr(trace, "set_tracer_provider", lambda provider: None)


@pytest.mark.parametrize("variable", ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"])
async def test_spans_go_to_the_standard_endpoint_and_not_to_the_monitor(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    async with receiver() as (collector, collector_url), receiver() as (monitor, monitor_url):
        monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
        monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
        monkeypatch.setenv("LOOM_OTLP_ENDPOINT", monitor_url)
        monkeypatch.setenv(variable, collector_url)
        settings = CommonSettings()
        assert settings.otlp_endpoint == monitor_url  # the monitor is configured, and still gets nothing

        provider = setup_tracing("gateway", otlp_endpoint=settings.otlp_endpoint, replica_id="gw-otel")

        def emit() -> None:
            tracer = provider.get_tracer("test")
            with tracer.start_as_current_span("POST /v1/predict", kind=SpanKind.SERVER) as span:
                span.set_attribute("loom.request_id", "otel-req")
            assert provider.force_flush(10_000)  # the batch processor exports on its own thread

        await asyncio.to_thread(emit)
        try:
            got = collector.get("otel-req")
            assert got is not None and got["services"] == ["gateway"]
            assert got["spans"][0]["name"] == "POST /v1/predict" and got["spans"][0]["replica"] == "gw-otel"
            assert len(monitor) == 0  # nothing went to LOOM_OTLP_ENDPOINT
        finally:
            await asyncio.to_thread(provider.shutdown)


async def test_without_the_standard_variable_spans_go_to_the_monitor(monkeypatch: pytest.MonkeyPatch) -> None:
    """The control case: the same set-up with the variable unset exports to LOOM_OTLP_ENDPOINT."""
    async with receiver() as (monitor, monitor_url):
        monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
        monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
        monkeypatch.setenv("LOOM_OTLP_ENDPOINT", monitor_url)
        provider = setup_tracing("gateway", otlp_endpoint=CommonSettings().otlp_endpoint)

        def emit() -> None:
            with provider.get_tracer("test").start_as_current_span("POST /v1/predict") as span:
                span.set_attribute("loom.request_id", "loom-req")
            assert provider.force_flush(10_000)

        await asyncio.to_thread(emit)
        try:
            assert monitor.get("loom-req") is not None
        finally:
            await asyncio.to_thread(provider.shutdown)
