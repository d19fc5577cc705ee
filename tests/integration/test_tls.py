"""TLS on a real service process: LOOM_TLS_CERT/KEY put both ports on TLS, LOOM_TLS_CLIENT_CA asks for client certs.

Two fusion processes (the cheapest service to start) on one test NATS, with
certificates made here (tests/certs.py): one with TLS, one with mutual TLS.
Each must answer gRPC health and HTTPS /healthz to a client that trusts the
CA, refuse plaintext on both ports, and refuse a client that does not trust
it or, under mutual TLS, one without a certificate of the mesh's CA.
Credentials are still checked inside TLS.
"""

from __future__ import annotations

import functools
import os
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from services.common.launch.mesh import ROOT, grpc_serving
from services.common.launch.procs import ManagedProcess, free_port, wait_until
from services.common.tls import ClientTls
from tests.certs import Pki, make_pki
from tests.support import TEST_API_KEY, bearer, start_nats

pytestmark = pytest.mark.integration


@dataclass
class Fusion:
    process: ManagedProcess
    grpc: str
    http: str  # host:port


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def fusions(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Fusion]]:
    """{"tls": ..., "mutual": ...}, both serving."""
    nats = start_nats()
    logs = tmp_path_factory.mktemp("logs")
    started: dict[str, Fusion] = {}
    try:
        for name, client_ca in (("tls", ""), ("mutual", str(pki.ca))):
            grpc_port, http_port = free_port(), free_port()
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith(("LOOM_", "OTEL_"))},
                "PYTHONPATH": str(ROOT),
                "LOOM_NATS_URL": nats.url,
                "LOOM_FUSION_GRPC_PORT": str(grpc_port),
                "LOOM_FUSION_HTTP_PORT": str(http_port),
                "LOOM_OTLP_ENDPOINT": "",
                "LOOM_DEV_API_KEY": TEST_API_KEY,
                "LOOM_TLS_CERT": str(pki.server_cert),
                "LOOM_TLS_KEY": str(pki.server_key),
                "LOOM_TLS_CLIENT_CA": client_ca,
            }
            proc = ManagedProcess(
                f"fusion-{name}", [sys.executable, "-m", "services.fusion"], env=env, log_path=logs / f"{name}.log"
            ).start()
            started[name] = Fusion(proc, f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http_port}")
        client = ClientTls(str(pki.ca), str(pki.client_cert), str(pki.client_key))
        for name, fusion in started.items():  # they start side by side
            serving = functools.partial(grpc_serving, fusion.grpc, tls=client)
            wait_until(serving, 60, interval=0.2, what=f"fusion-{name}")
        yield started
    except BaseException:
        for fusion in started.values():
            print(fusion.process.log_tail(40))
        raise
    finally:
        for fusion in started.values():
            fusion.process.stop()
        nats.stop()


def health(target: str, tls: ClientTls | None) -> bool | grpc.StatusCode:
    """SERVING (True), or the status code the call failed with."""
    try:
        return grpc_serving(target, timeout=5, tls=tls)
    except grpc.RpcError as err:
        code: grpc.StatusCode = err.code()
        return code


def https(url: str, ctx: ssl.SSLContext | None, key: str | None = None) -> int | str:
    """The HTTP status, or why no answer came."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=bearer(key)), timeout=5, context=ctx) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError) as exc:
        return type(getattr(exc, "reason", exc)).__name__


def test_tls_serves_both_ports_to_clients_that_trust_its_ca(fusions: dict[str, Fusion], pki: Pki) -> None:
    f = fusions["tls"]
    trusting = ClientTls(str(pki.ca))
    assert health(f.grpc, trusting) is True
    assert https(f"https://{f.http}/healthz", trusting.ssl_context()) == 200
    # Credentials are checked inside TLS as well.
    assert https(f"https://{f.http}/metrics", trusting.ssl_context()) == 401
    assert https(f"https://{f.http}/metrics", trusting.ssl_context(), TEST_API_KEY) == 200
    # Plaintext is refused on both ports.
    assert health(f.grpc, None) == grpc.StatusCode.UNAVAILABLE
    assert https(f"http://{f.http}/healthz", None) in ("RemoteDisconnected", "ConnectionResetError", 400)
    # A client that does not trust the CA refuses the server.
    assert health(f.grpc, ClientTls(str(pki.other_ca))) == grpc.StatusCode.UNAVAILABLE
    assert https(f"https://{f.http}/healthz", ClientTls(str(pki.other_ca)).ssl_context()) == "SSLCertVerificationError"


def test_mutual_tls_refuses_clients_without_a_certificate_of_its_ca(fusions: dict[str, Fusion], pki: Pki) -> None:
    f = fusions["mutual"]
    member = ClientTls(str(pki.ca), str(pki.client_cert), str(pki.client_key))
    assert health(f.grpc, member) is True
    assert https(f"https://{f.http}/healthz", member.ssl_context()) == 200
    for stranger in (ClientTls(str(pki.ca)), ClientTls(str(pki.ca), str(pki.other_cert), str(pki.other_key))):
        assert health(f.grpc, stranger) == grpc.StatusCode.UNAVAILABLE
        assert https(f"https://{f.http}/healthz", stranger.ssl_context()) != 200
    assert health(f.grpc, None) == grpc.StatusCode.UNAVAILABLE
    log = Path(f.process.log_path).read_text()
    assert "(mutual TLS)" in log and "(TLS)" in Path(fusions["tls"].process.log_path).read_text()
