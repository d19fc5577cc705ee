"""`make run`'s launcher: ready banner, a working request, clean stop on Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.common.launch.mesh import DEFAULT_PORTS, ROOT
from services.common.launch.procs import free_port
from services.common.triton_server import shm_regions
from tests.support import TEST_API_KEY, predict_http

pytestmark = pytest.mark.integration


def mesh_pids(nats_port: int) -> set[int]:
    """Our processes of this mesh: every one carries the NATS port in its env or argv."""
    marks = (f"LOOM_NATS_PORT={nats_port}".encode(), f"nats://127.0.0.1:{nats_port}".encode())
    found = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # a zombie is dead; reaping it is its new parent's business
            blob = (proc / "environ").read_bytes() + (proc / "cmdline").read_bytes()
        except OSError:
            continue
        argv = (proc / "cmdline").read_bytes() if (proc / "cmdline").exists() else b""
        if any(m in blob for m in marks) or (b"nats-server" in argv and str(nats_port).encode() in argv):
            found.add(int(proc.name))
    found.discard(os.getpid())
    return found


def start_launcher(log: Path) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    """``python -m services.common.launch`` on free ports; returns once it printed the banner."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    env["LOOM_DEV_API_KEY"] = TEST_API_KEY  # the launcher's admin key (else it would use .loom/dev-api-key)
    ports = {name: free_port() for name in DEFAULT_PORTS}
    env.update({f"LOOM_{name.upper()}_PORT": str(port) for name, port in ports.items()})
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.common.launch"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 240
    while "Loom is ready" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"launcher never became ready:\n{log.read_text()}")
        time.sleep(0.5)
    return proc, ports


def shm_prefix(pids: set[int]) -> str:
    """The shared-memory prefix of this mesh's Triton (another test's Triton may run meanwhile)."""
    for pid in pids:
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            for arg in argv:
                if b"shm-region-prefix-name=" in arg:
                    return arg.split(b"shm-region-prefix-name=", 1)[1].decode()
    raise AssertionError("no tritonserver with a shm-region prefix among the mesh's processes")


def test_launcher_serves_then_stops_everything(tmp_path: Path) -> None:
    proc, ports = start_launcher(tmp_path / "launcher.log")
    try:
        banner = (tmp_path / "launcher.log").read_text()
        gateway = f"http://127.0.0.1:{ports['gateway_http']}"
        assert f"{gateway}/v1/pipelines/embed:predict" in banner and "curl" in banner
        assert '-H "Authorization: Bearer $LOOM_DEV_API_KEY"' in banner and TEST_API_KEY not in banner
        status, body = predict_http(gateway, "the launcher works")
        assert status == 200 and len(body["outputs"]["text"]["embedding"]) == 384
        assert predict_http(gateway, "no key", key=None)[0] == 401

        running = mesh_pids(ports["nats"])
        assert len(running) >= 9, running  # launcher, nats-server, tritonserver (+stub), six services
        prefix = shm_prefix(running)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = (tmp_path / "launcher.log").read_text()
    assert "stopped in" in log
    assert mesh_pids(ports["nats"]) == set()  # no orphans
    assert not [r for r in shm_regions() if r.startswith(prefix)]  # Triton's python-backend regions are gone


def test_a_killed_launcher_leaves_no_orphans(tmp_path: Path) -> None:
    proc, ports = start_launcher(tmp_path / "launcher.log")
    try:
        assert len(mesh_pids(ports["nats"])) >= 9
        proc.kill()  # no chance to clean up: the children must notice on their own
        proc.wait()
        deadline = time.monotonic() + 30
        while mesh_pids(ports["nats"]) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:120] for pid in mesh_pids(ports["nats"])}
        assert left == {}
    finally:
        for pid in mesh_pids(ports["nats"]):
            os.kill(pid, signal.SIGKILL)
