"""The container probe against a real gRPC health server started here (plaintext and mutual TLS)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common import healthcheck
from services.fusion.settings import FusionSettings
from services.gateway.settings import GatewaySettings
from services.inference.settings import InferenceSettings
from services.monitor.settings import MonitorSettings
from services.postprocess.settings import PostprocessSettings
from services.preprocess.settings import PreprocessSettings
from tests.certs import Pki, make_pki

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class HealthServer:
    """grpcio's own health servicer on 127.0.0.1, on a free port."""

    def __init__(self, credentials: grpc.ServerCredentials | None = None) -> None:
        self.servicer = health.HealthServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, self.server)
        if credentials is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
        self.server.start()

    def set(self, status: int) -> None:
        self.servicer.set("", status)


@pytest.fixture
def server() -> Iterator[HealthServer]:
    s = HealthServer()
    yield s
    s.server.stop(None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env_for(port: int, **extra: str) -> dict[str, str]:
    return {"LOOM_SERVICE": "fusion", "LOOM_FUSION_GRPC_PORT": str(port), **extra}


def test_serving_exits_0(server: HealthServer, capsys: pytest.CaptureFixture[str]) -> None:
    server.set(SERVING)
    assert healthcheck.main([], env_for(server.port)) == 0
    assert capsys.readouterr().err == ""


def test_not_serving_exits_1_with_reason(server: HealthServer, capsys: pytest.CaptureFixture[str]) -> None:
    server.set(NOT_SERVING)  # what a draining service reports after SIGTERM
    assert healthcheck.main([], env_for(server.port)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"fusion at 127.0.0.1:{server.port}: NOT_SERVING" in err


def test_nothing_listening_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    assert healthcheck.main(["--timeout", "1"], env_for(port)) == 1
    assert f"fusion at 127.0.0.1:{port}: UNAVAILABLE" in capsys.readouterr().err


def test_bad_settings_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert healthcheck.main([], {"LOOM_SERVICE": "gatewya"}) == 1
    assert "expected one of gateway" in capsys.readouterr().err
    assert healthcheck.main([], {}, cmdline=Path("/nonexistent")) == 1
    assert "LOOM_SERVICE=''" in capsys.readouterr().err
    assert healthcheck.main([], {"LOOM_SERVICE": "gateway", "LOOM_GATEWAY_GRPC_PORT": "x"}) == 1
    assert "LOOM_GATEWAY_GRPC_PORT='x'" in capsys.readouterr().err


def test_service_from_pid1(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cases = {
        b"python\0-m\0services.preprocess\0": "preprocess",
        b"/opt/venv/bin/python3\0-X\0dev\0-m\0services.monitor\0": "monitor",
        b"python\0-m\0services.common.provision\0": "",
        b"tritonserver\0--model-repository=/models\0": "",
    }
    for raw, name in cases.items():
        cmdline.write_bytes(raw)
        assert healthcheck.service_of(cmdline) == name
    assert healthcheck.service_of(tmp_path / "missing") == ""
    cmdline.write_bytes(b"python\0-m\0services.postprocess\0")
    assert healthcheck.target({}, cmdline=cmdline) == healthcheck.Target("postprocess", "127.0.0.1", 50054)
    # LOOM_SERVICE wins over PID 1.
    assert healthcheck.target({"LOOM_SERVICE": "gateway"}, cmdline=cmdline).port == 50051


def test_the_cli_as_docker_runs_it(server: HealthServer) -> None:
    server.set(SERVING)
    env = {**os.environ, **env_for(server.port)}
    cmd = [sys.executable, "-m", "services.common.healthcheck"]
    assert subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=30).returncode == 0
    server.set(NOT_SERVING)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "NOT_SERVING" in done.stderr


def test_default_ports_are_the_settings_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in os.environ if v.startswith("LOOM_")]:
        monkeypatch.delenv(var)
    classes = {
        "gateway": GatewaySettings,
        "preprocess": PreprocessSettings,
        "inference": InferenceSettings,
        "postprocess": PostprocessSettings,
        "fusion": FusionSettings,
        "monitor": MonitorSettings,
    }
    assert {name: cls().grpc_port for name, cls in classes.items()} == healthcheck.GRPC_PORTS
    assert healthcheck.target({"LOOM_SERVICE": "Monitor"}).port == 50056
    assert healthcheck.target({"LOOM_SERVICE": "monitor", "LOOM_MONITOR_GRPC_PORT": "6001"}).port == 6001


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_mutual_tls(pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    creds = grpc.ssl_server_credentials(
        [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())],
        root_certificates=pki.ca.read_bytes(),
        require_client_auth=True,
    )
    s = HealthServer(creds)
    try:
        s.set(SERVING)
        # As in a service's container: its own pair (a client identity too) and the CA.
        tls = {"LOOM_TLS_CERT": str(pki.server_cert), "LOOM_TLS_KEY": str(pki.server_key), "LOOM_TLS_CA": str(pki.ca)}
        assert healthcheck.main([], env_for(s.port, **tls)) == 0
        # Plaintext against a TLS port fails, and so does a name the certificate does not carry.
        assert healthcheck.main(["--timeout", "1"], env_for(s.port)) == 1
        assert healthcheck.main(["--timeout", "1"], env_for(s.port, LOOM_HEALTHCHECK_TLS_NAME="nats-1", **tls)) == 1
        assert healthcheck.main([], env_for(s.port, **{**tls, "LOOM_TLS_CA": "/nonexistent/ca.pem"})) == 1
        assert "cannot read LOOM_TLS_CA=/nonexistent/ca.pem" in capsys.readouterr().err
    finally:
        s.server.stop(None)
