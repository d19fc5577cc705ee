"""TLS to NATS: a Bus verifies the server against LOOM_NATS_TLS_CA, and shows LOOM_NATS_TLS_CERT when asked.

The certificates are made by the test (tests/certs.py, a throwaway CA); the
server runs Loom's least-privilege configuration with TLS on, so each client
logs in with its service's user over an encrypted, verified connection.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.aio.msg import Msg

from services.common.bus import Bus
from services.common.errors import Unavailable
from services.common.launch.nats_server import NatsServer, ServerTls, new_passwords
from services.common.nats_options import NatsOptions
from services.common.settings import CommonSettings
from tests.certs import Pki, make_pki

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def start(pki: Pki, *, verify_clients: bool = False) -> NatsServer:
    tls = ServerTls(str(pki.server_cert), str(pki.server_key), str(pki.ca) if verify_clients else "")
    return NatsServer(passwords=new_passwords(), tls=tls).start()


@pytest.fixture(scope="module")
def server(pki: Pki) -> Iterator[NatsServer]:
    srv = start(pki)
    try:
        yield srv
    finally:
        srv.stop()


def options(srv: NatsServer, user: str, **tls: str) -> NatsOptions:
    """What a service builds from its LOOM_NATS_* settings."""
    settings = CommonSettings(
        nats_user=user,
        nats_password=srv.passwords[user],
        nats_tls_ca=tls.get("ca", ""),
        nats_tls_cert=tls.get("cert", ""),
        nats_tls_key=tls.get("key", ""),
    )
    return NatsOptions.from_settings(settings)


async def test_a_bus_verifies_the_server_and_does_request_reply_over_tls(server: NatsServer, pki: Pki) -> None:
    inference, gateway = Bus("inference"), Bus("gateway")
    await inference.connect(server.url, timeout=10, options=options(server, "inference", ca=str(pki.ca)))
    await gateway.connect(server.url, timeout=10, options=options(server, "gateway", ca=str(pki.ca)))
    try:

        async def answer(msg: Msg) -> None:
            await inference.respond(msg, b"models: " + msg.data)

        await inference.subscribe("loom.models.list", answer, queue="inference")
        await inference.nc.flush()
        reply = await gateway.request("loom.models.list", b"?", timeout=5)
        assert reply.data == b"models: ?"
        # The server's view: both over TLS, each logged in as its own service.
        url = f"http://127.0.0.1:{server.monitor_port}/connz?auth=true"
        with urllib.request.urlopen(url, timeout=5) as resp:
            conns = {c["name"]: c for c in json.load(resp)["connections"]}
        for name in ("inference", "gateway"):
            assert conns[name]["tls_version"].startswith("1.") and conns[name]["authorized_user"] == name
    finally:
        await gateway.close()
        await inference.close()


async def test_a_client_without_the_ca_is_refused_at_once(server: NatsServer) -> None:
    bus = Bus("gateway")
    # Not the CA of the server's certificate: the system roots (a tls:// URL), or none set at all.
    for url, opts in (
        (server.url, NatsOptions(user="gateway", password=server.passwords["gateway"])),
        (server.url.replace("nats://", "tls://"), None),
    ):
        with pytest.raises(Unavailable, match="CERTIFICATE_VERIFY_FAILED"):
            await asyncio.wait_for(bus.connect(url, timeout=30, options=opts), 10)  # no 30 s of retries


async def test_a_server_that_verifies_clients_takes_only_certificates_of_its_ca(pki: Pki) -> None:
    srv = start(pki, verify_clients=True)
    try:
        bus = Bus("monitor")
        mine = options(srv, "monitor", ca=str(pki.ca), cert=str(pki.client_cert), key=str(pki.client_key))
        await bus.connect(srv.url, timeout=10, options=mine)
        assert bus.connected
        await bus.close()
        stranger = options(srv, "monitor", ca=str(pki.ca), cert=str(pki.other_cert), key=str(pki.other_key))
        for opts in (options(srv, "monitor", ca=str(pki.ca)), stranger):  # no certificate; another CA's
            with pytest.raises(Unavailable):
                await asyncio.wait_for(Bus("monitor").connect(srv.url, timeout=30, options=opts), 10)
    finally:
        srv.stop()


def test_tls_settings_are_checked_before_connecting(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="go together"):
        NatsOptions.from_settings(CommonSettings(nats_tls_cert="c.pem"))
    missing = NatsOptions.from_settings(CommonSettings(nats_tls_ca=str(tmp_path / "nope.pem")))
    with pytest.raises(ValueError, match="cannot read the NATS TLS files"):
        missing.connect_kwargs()
    assert NatsOptions.from_settings(CommonSettings()).connect_kwargs() == {
        "ping_interval": 5.0,
        "max_outstanding_pings": 3,
    }
