"""``make run``: start the whole mesh locally and serve until Ctrl-C."""

from __future__ import annotations

import shutil
import signal
import sys
import threading
import time

from services.common.launch.dev_key import DevKey, dev_api_key
from services.common.launch.mesh import ROOT, SERVICES, Mesh


def write_admin_env(mesh: Mesh) -> None:
    """Admin's NATS login for this run, readable by its owner only (``set -a; . .loom/run/nats-admin.env``)."""
    path = mesh.workdir / "nats-admin.env"
    path.touch(mode=0o600)
    password = mesh.nats_passwords.get("admin", "")
    path.write_text(f"LOOM_NATS_URL={mesh.nats_address}\nLOOM_NATS_USER=admin\nLOOM_NATS_PASSWORD={password}\n")


def banner(mesh: Mesh, key: DevKey) -> str:
    p = mesh.ports
    auth = f'-H "Authorization: Bearer {key.shell()}"'
    return f"""
Loom is ready ({len(SERVICES)} services, nats-server, tritonserver; logs in {mesh.workdir / "logs"})

  HTTP   {mesh.gateway_http}/v1/pipelines/{{embed,content}}:predict   (OpenAPI: {mesh.gateway_http}/openapi.yaml)
         {mesh.gateway_http}/v2/...   KServe v2 REST (tritonclient.http works unchanged)
  gRPC   {mesh.gateway_grpc}  loom.v1.Gateway/Predict and inference.GRPCInferenceService (tritonclient.grpc)
  NATS   {mesh.nats_address}  a user per service, each allowed its own subjects (deploy/nats/loom.conf)
         admin's login (provisioning, the nats CLI): {mesh.workdir / "nats-admin.env"}
  Triton grpc 127.0.0.1:{p["triton_grpc"]}  http 127.0.0.1:{p["triton_http"]}  metrics 127.0.0.1:{p["triton_metrics"]}
  Monitor {mesh.monitor_http}/   the dashboard; JSON under /v1 (alerts, slo, drift, accuracy, traces)
         metrics: {mesh.monitor_http}/metrics, {mesh.gateway_http}/metrics and each service's /metrics
  CLI    .venv/bin/loomctl status | alerts | trace <request_id> | feedback <pipeline> <request_id> --label L
  Auth   every call to every service but /healthz, /readyz and gRPC health needs credentials (the
         dashboard asks for a key once per tab; /metrics takes a viewer key). The local admin key
         (id "dev", tenant "dev") is in {key.origin}; loomctl finds it there. Other clients
         send it as the header (or gRPC metadata) authorization: Bearer <key>, for example
         export LOOM_API_KEY="{key.shell()}"

Try:
  curl -s -X POST {mesh.gateway_http}/v1/pipelines/embed:predict \\
       {auth} \\
       -H 'content-type: application/json' -d '{{"inputs": {{"text": "The match ended in a draw."}}}}'
  curl -s -X POST {mesh.gateway_http}/v1/pipelines/content:predict \\
       {auth} \\
       -F text='Stocks fell as the central bank raised rates.' -F image=@photo.png -F audio=@speech.wav

Ctrl-C stops everything.
"""


def main() -> int:
    stop = threading.Event()
    starting = threading.Event()
    starting.set()

    def on_signal(*_: object) -> None:
        stop.set()
        if starting.is_set():  # abandon the start; the finally block stops what is up
            raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    # Logs stay in .loom/run/logs after Ctrl-C; the JetStream store is fresh each run.
    workdir = ROOT / ".loom" / "run"
    shutil.rmtree(workdir, ignore_errors=True)
    key = dev_api_key(ROOT)
    mesh = Mesh(workdir=workdir, api_key=key.key)
    try:
        print("starting Loom ...", flush=True)
        mesh.start()
        write_admin_env(mesh)
        starting.clear()
        print(banner(mesh, key), flush=True)
        while not stop.is_set():
            for name, proc in mesh.services.items():
                if not proc.running():
                    print(f"{name} exited; see {proc.log_path}", file=sys.stderr, flush=True)
                    stop.set()
            stop.wait(1.0)
    except KeyboardInterrupt:
        print("interrupted while starting", file=sys.stderr, flush=True)
        return 130
    except Exception as exc:
        print(f"Loom failed to start: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        starting.clear()  # a second Ctrl-C must not cut the stop short
        print("stopping Loom ...", flush=True)
        t0 = time.monotonic()
        mesh.stop(remove_workdir=False)
        shutil.rmtree(workdir / "jetstream", ignore_errors=True)
        print(f"stopped in {time.monotonic() - t0:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
