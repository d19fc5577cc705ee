"""How a Loom process logs in to NATS and checks the server's certificate (the ``LOOM_NATS_*`` settings).

In production the server runs ``deploy/nats/loom.conf``: one user per
service, each allowed only its own subjects, so a service needs a user and a
password (or a credentials file) to connect at all. TLS is on when a CA or a
client certificate is set; the server's certificate is verified against
``LOOM_NATS_TLS_CA`` and, for servers that verify clients, the service shows
``LOOM_NATS_TLS_CERT``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from services.common.settings import CommonSettings
from services.common.tls import ClientTls


@dataclass(frozen=True)
class NatsOptions:
    """Credentials and TLS of one NATS connection; the default is neither."""

    user: str = ""
    password: str = field(default="", repr=False)
    #: A NATS credentials file (user JWT + NKey seed), for servers in operator mode.
    creds: str = ""
    tls: ClientTls | None = None
    #: A server that stops answering (a partitioned node: no reset, just silence) is left after
    #: ``ping_interval_s * max_outstanding_pings``; nats-py's own default is 2 x 120 s.
    ping_interval_s: float = 5.0
    max_outstanding_pings: int = 3

    @classmethod
    def from_settings(cls, s: CommonSettings) -> NatsOptions:
        if bool(s.nats_tls_cert) != bool(s.nats_tls_key):
            raise ValueError("LOOM_NATS_TLS_CERT and LOOM_NATS_TLS_KEY go together: set both or neither")
        if s.nats_password and not s.nats_user:
            raise ValueError("LOOM_NATS_PASSWORD needs LOOM_NATS_USER")
        on = bool(s.nats_tls_ca or s.nats_tls_cert)
        tls = ClientTls(ca=s.nats_tls_ca, cert=s.nats_tls_cert, key=s.nats_tls_key) if on else None
        return cls(
            user=s.nats_user,
            password=s.nats_password,
            creds=s.nats_creds,
            tls=tls,
            ping_interval_s=s.nats_ping_interval_s,
            max_outstanding_pings=s.nats_max_outstanding_pings,
        )

    def connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect``; the TLS files are read here."""
        kwargs: dict[str, Any] = {
            "ping_interval": self.ping_interval_s,
            "max_outstanding_pings": self.max_outstanding_pings,
        }
        if self.user:
            kwargs.update(user=self.user, password=self.password)
        if self.creds:
            kwargs["user_credentials"] = self.creds
        if self.tls is not None:
            try:
                kwargs["tls"] = self.tls.ssl_context()
            except OSError as exc:
                raise ValueError(f"cannot read the NATS TLS files ({self.tls.ca}, {self.tls.cert}): {exc}") from None
        return kwargs


def inbox_prefix(service: str) -> str:
    """``_INBOX.<service>``: where this service's replies arrive (and all it may read of ``_INBOX``)."""
    return "_INBOX." + (re.sub(r"[^A-Za-z0-9_-]", "_", service) or "_")


def redact(servers: str) -> str:
    """``servers`` without the passwords of URLs that carry ``user:password@``, for logs and errors."""
    out = []
    for url in servers.split(","):
        parts = urlsplit(url.strip())
        if parts.password is not None:
            host = parts.netloc.rsplit("@", 1)[-1]
            parts = parts._replace(netloc=f"{parts.username}:***@{host}")
        out.append(urlunsplit(parts))
    return ",".join(out)
