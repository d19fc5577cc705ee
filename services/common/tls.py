"""TLS for every service's gRPC and HTTP ports, and for Loom's clients of those ports.

A service serves TLS on both ports when ``LOOM_TLS_CERT`` and ``LOOM_TLS_KEY``
name PEM files; with ``LOOM_TLS_CLIENT_CA`` as well it asks every client for a
certificate signed by that CA (mutual TLS) and drops the connection of one
that has none. Clients inside Loom (the span exporter, health checks, the
tests, loomctl) verify a server against ``LOOM_TLS_CA`` (empty: the system's
roots) and, under mutual TLS, present ``LOOM_TLS_CERT``/``LOOM_TLS_KEY``: a
service's certificate is also its identity as a client.

The files are read once, at start; a new certificate needs a restart.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc
from pydantic import Field, model_validator

from services.common.settings import CommonSettings


class TlsSettings(CommonSettings):
    """``LOOM_TLS_*``: certificates for the servers and the CA that Loom's clients trust."""

    tls_cert: str = Field(
        "",
        description="PEM certificate (chain) of this service; with LOOM_TLS_KEY, its gRPC and HTTP ports serve TLS "
        "only. Empty: plaintext.",
    )
    tls_key: str = Field("", description="PEM private key of LOOM_TLS_CERT.")
    tls_client_ca: str = Field(
        "",
        description="PEM CA bundle: when set, both ports require a client certificate signed by it (mutual TLS). "
        "Needs LOOM_TLS_CERT and LOOM_TLS_KEY.",
    )
    tls_ca: str = Field(
        "",
        description="PEM CA bundle that Loom's clients (span export to the monitor, health checks, loomctl) verify "
        "servers against. Empty: the system's trusted roots.",
    )

    @model_validator(mode="after")
    def _pairs(self) -> TlsSettings:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("LOOM_TLS_CERT and LOOM_TLS_KEY go together: set both or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("LOOM_TLS_CLIENT_CA (mutual TLS) needs LOOM_TLS_CERT and LOOM_TLS_KEY")
        return self

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert)

    def client_tls(self) -> ClientTls:
        """What this service presents and trusts when it calls another Loom service."""
        return ClientTls(ca=self.tls_ca, cert=self.tls_cert, key=self.tls_key)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


# --- servers ---------------------------------------------------------------------------------------


def server_credentials(s: TlsSettings) -> grpc.ServerCredentials | None:
    """The gRPC port's credentials; None for plaintext."""
    if not s.tls_enabled:
        return None
    pair = (_read(s.tls_key, "LOOM_TLS_KEY"), _read(s.tls_cert, "LOOM_TLS_CERT"))
    roots = _read(s.tls_client_ca, "LOOM_TLS_CLIENT_CA") if s.tls_client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=roots, require_client_auth=roots is not None)


def server_ssl_context(s: TlsSettings) -> ssl.SSLContext | None:
    """The HTTP port's context (TLS 1.2 or later); None for plaintext."""
    if not s.tls_enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(s.tls_cert, s.tls_key)
        if s.tls_client_ca:
            ctx.load_verify_locations(cafile=s.tls_client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load the TLS certificate {s.tls_cert} / key / client CA: {exc}") from None
    return ctx


# --- clients -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientTls:
    """A Loom client's side of TLS: the CA it trusts (empty: system roots) and, for mutual TLS, its own pair."""

    ca: str = ""
    cert: str = ""
    key: str = ""

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "LOOM_TLS_CA") if self.ca else None,
            private_key=_read(self.key, "the client key") if self.cert and self.key else None,
            certificate_chain=_read(self.cert, "the client certificate") if self.cert and self.key else None,
        )

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca or None)
        if self.cert and self.key:
            ctx.load_cert_chain(self.cert, self.key)
        return ctx


def channel(target: str, tls: ClientTls | None = None) -> grpc.Channel:
    """A blocking channel to ``target``: TLS when ``tls`` is given, plaintext otherwise."""
    if tls is None:
        return grpc.insecure_channel(target)
    return grpc.secure_channel(target, tls.channel_credentials())
