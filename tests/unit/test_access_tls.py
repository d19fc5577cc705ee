"""TLS settings and credentials in-process: TLS and mutual TLS on a gRPC and an HTTP server, and loomctl over https.

The certificates are made here (tests/certs.py). The same settings on a real
service process: tests/integration/test_tls.py.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import aiohttp
import grpc
import pytest
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from pydantic import ValidationError

from services.common.tls import ClientTls, TlsSettings, server_credentials, server_ssl_context
from tests.certs import Pki, make_pki

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def settings(pki: Pki, *, mutual: bool = False) -> TlsSettings:
    return TlsSettings(
        tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), tls_client_ca=str(pki.ca) if mutual else ""
    )


def test_the_settings_come_in_pairs(pki: Pki) -> None:
    assert not TlsSettings().tls_enabled and server_credentials(TlsSettings()) is None
    assert server_ssl_context(TlsSettings()) is None
    with pytest.raises(ValidationError, match="set both or neither"):
        TlsSettings(tls_cert=str(pki.server_cert))
    with pytest.raises(ValidationError, match="needs LOOM_TLS_CERT"):
        TlsSettings(tls_client_ca=str(pki.ca))
    with pytest.raises(ValueError, match="cannot read LOOM_TLS_KEY"):
        server_credentials(TlsSettings(tls_cert=str(pki.server_cert), tls_key=str(pki.ca.parent / "missing.pem")))
    with pytest.raises(ValueError, match="cannot load the TLS certificate"):
        server_ssl_context(TlsSettings(tls_cert=str(pki.server_cert), tls_key=str(pki.client_key)))  # not its key
    s = settings(pki, mutual=True)
    assert s.client_tls() == ClientTls(ca="", cert=str(pki.server_cert), key=str(pki.server_key))


@dataclass
class Servers:
    grpc_target: str
    https: str


@pytest.fixture(params=[False, True], ids=["tls", "mutual-tls"])
async def servers(request: pytest.FixtureRequest, pki: Pki) -> AsyncIterator[tuple[Servers, bool]]:
    mutual: bool = request.param
    s = settings(pki, mutual=mutual)
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
    credentials = server_credentials(s)
    assert credentials is not None
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ssl_context(s))
    await site.start()
    http_port = runner.addresses[0][1]
    try:
        yield Servers(f"127.0.0.1:{port}", f"https://127.0.0.1:{http_port}"), mutual
    finally:
        await runner.cleanup()
        await server.stop(0)


async def grpc_ok(target: str, credentials: grpc.ChannelCredentials | None) -> bool:
    channel = grpc.aio.insecure_channel(target) if credentials is None else grpc.aio.secure_channel(target, credentials)
    async with channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err  # the handshake failed
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


async def http_ok(url: str, ctx: ssl.SSLContext | bool) -> bool:
    try:
        async with aiohttp.ClientSession() as session, session.get(url, ssl=ctx, timeout=aiohttp.ClientTimeout(5)) as r:
            return r.status == 200
    except (aiohttp.ClientError, ssl.SSLError, ConnectionError):
        return False


async def test_tls_and_mutual_tls_refuse_whom_they_should(servers: tuple[Servers, bool], pki: Pki) -> None:
    srv, mutual = servers
    trusted = ClientTls(str(pki.ca), str(pki.client_cert), str(pki.client_key))  # a client of the mesh's CA
    anonymous = ClientTls(str(pki.ca))  # trusts the server, shows no certificate
    stranger = ClientTls(str(pki.ca), str(pki.other_cert), str(pki.other_key))  # a certificate nobody here signed
    naive = ClientTls(str(pki.other_ca))  # does not trust the server's CA

    assert await grpc_ok(srv.grpc_target, trusted.channel_credentials())
    assert await http_ok(f"{srv.https}/healthz", trusted.ssl_context())
    assert not await grpc_ok(srv.grpc_target, None)  # plaintext against a TLS port
    assert not await http_ok(srv.https.replace("https://", "http://") + "/healthz", False)
    assert not await grpc_ok(srv.grpc_target, naive.channel_credentials())
    assert not await http_ok(f"{srv.https}/healthz", naive.ssl_context())
    # Only mutual TLS asks for the client's certificate.
    assert await grpc_ok(srv.grpc_target, anonymous.channel_credentials()) is not mutual
    assert await http_ok(f"{srv.https}/healthz", anonymous.ssl_context()) is not mutual
    assert await grpc_ok(srv.grpc_target, stranger.channel_credentials()) is not mutual
    assert await http_ok(f"{srv.https}/healthz", stranger.ssl_context()) is not mutual


# --- loomctl -----------------------------------------------------------------------------------------


@pytest.fixture
def https_monitor(pki: Pki) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """A stand-in monitor on https that records each request's headers and answers /v1/alerts."""
    seen: list[dict[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append({k.lower(): v for k, v in self.headers.items()})
            body = b'{"alerts": []}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = server_ssl_context(settings(pki))
    assert ctx is not None
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{httpd.server_address[1]}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def test_loomctl_sends_its_key_to_the_monitor_and_verifies_it_with_loom_tls_ca(
    https_monitor: tuple[str, list[dict[str, str]]],
    pki: Pki,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    from tools.loomctl.__main__ import main as loomctl

    url, seen = https_monitor
    monkeypatch.chdir(tmp_path)  # no .loom/dev-api-key here
    monkeypatch.setenv("LOOM_API_KEY", "loom_viewer-key-of-bob")
    monkeypatch.delenv("LOOM_TLS_CA", raising=False)
    assert loomctl(["--monitor", url, "alerts"]) == 1  # the system's roots do not know the test CA
    assert "certificate verify failed" in capsys.readouterr().err and seen == []
    monkeypatch.setenv("LOOM_TLS_CA", str(pki.ca))
    assert loomctl(["--monitor", url, "alerts"]) == 0
    assert seen[-1]["authorization"] == "Bearer loom_viewer-key-of-bob"
    monkeypatch.setenv("LOOM_TLS_CA", str(tmp_path / "nowhere.pem"))
    assert loomctl(["--monitor", url, "alerts"]) == 2  # a usage error, said as such
    assert "LOOM_TLS_CA" in capsys.readouterr().err
