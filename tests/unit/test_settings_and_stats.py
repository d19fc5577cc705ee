import pytest

from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.gateway.settings import GatewaySettings
from services.monitor.stats import StatsBook
from services.postprocess.settings import PostprocessSettings

pytestmark = pytest.mark.unit


def test_settings_come_from_loom_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOM_NATS_URL", "nats://10.0.0.1:4222")
    monkeypatch.setenv("LOOM_GATEWAY_GRPC_PORT", "6000")
    monkeypatch.setenv("LOOM_GATEWAY_DEFAULT_TIMEOUT_MS", "1234")
    monkeypatch.setenv("LOOM_POSTPROCESS_LABELS", '{"cats": "cats and kittens"}')
    gw = GatewaySettings()
    assert (gw.nats_url, gw.grpc_port, gw.http_port, gw.default_timeout_ms) == (
        "nats://10.0.0.1:4222",
        6000,
        8080,
        1234,
    )
    assert PostprocessSettings().labels == {"cats": "cats and kittens"}


def test_stats_book_counts_errors_and_percentiles() -> None:
    book = StatsBook(window=100)
    for i in range(10):
        book.record(pb.TelemetryEvent(service="inference", stage="loom.infer.minilm", duration_ms=float(i + 1)))
    book.record(pb.TelemetryEvent(service="inference", stage="loom.infer.minilm", code="UNAVAILABLE", duration_ms=1))
    (row,) = book.snapshot()["stages"]  # type: ignore[misc]
    assert row["count"] == 11 and row["errors"] == 1 and row["codes"] == {"OK": 10, "UNAVAILABLE": 1}
    assert 4.0 <= row["p50_ms"] <= 6.0 and row["p99_ms"] <= 10.0
