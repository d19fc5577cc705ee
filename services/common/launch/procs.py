"""A child process we own: own session, log file, stop by PID with a grace period."""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

# Below Linux's ephemeral range (32768-60999): a port picked there can be taken
# by an outgoing connection's local end before our server binds it.
_PORT_RANGE = (20000, 32700)
_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, never handed out before by this process."""
    for _ in range(1000):
        port = random.randrange(*_PORT_RANGE)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port found")


class ProcessExited(RuntimeError):
    """A process we wait for died: waiting longer is pointless."""


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.1, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except ProcessExited:
            raise
        except Exception:  # the thing we wait for may not answer yet
            pass
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def die_with_parent() -> None:
    # Runs in the child before exec: if the process that started us dies
    # (even by SIGKILL), the kernel sends us SIGTERM, so no orphan is left.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG


class ManagedProcess:
    def __init__(self, name: str, argv: list[str], *, env: dict[str, str], log_path: Path, cwd: Path | None = None):
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        try:
            # setpriv (util-linux) sets the parent-death signal and execs: no Python runs between
            # fork and exec. A preexec_fn would, and it makes fork take Python's at-fork locks,
            # which deadlocked a parent whose other threads (gRPC, NATS) held them.
            setpriv = shutil.which("setpriv")
            argv = [setpriv, "--pdeathsig", "TERM", "--", *self.argv] if setpriv else self.argv
            self.proc = subprocess.Popen(
                argv,
                env=self.env,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=None if setpriv else die_with_parent,
            )
        finally:
            log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.running():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait; then SIGKILL the whole process group."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # our own session: children too
        self.proc.wait()
        return self.proc.returncode
