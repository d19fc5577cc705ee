"""The whole local mesh: nats-server, tritonserver and the six services.

Each service is its own process (``python -m services.<name>``) configured
only through ``LOOM_*`` environment variables, exactly as in production.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.auth import generate_api_key
from services.common.launch.nats_server import NatsServer, login_env, new_passwords, run_provisioning
from services.common.launch.procs import ManagedProcess, ProcessExited, free_port, wait_until
from services.common.tls import ClientTls
from services.common.tls import channel as tls_channel
from services.common.triton_server import TritonServer, repository_models

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[3]
SERVICES = ("monitor", "fusion", "inference", "preprocess", "postprocess", "gateway")
DEFAULT_PORTS = {
    "nats": 4222,
    "nats_monitor": 8222,
    "triton_http": 8000,
    "triton_grpc": 8001,
    "triton_metrics": 8002,
    "gateway_grpc": 50051,
    "gateway_http": 8080,
    "preprocess_grpc": 50052,
    "preprocess_http": 9102,
    "inference_grpc": 50053,
    "inference_http": 9103,
    "postprocess_grpc": 50054,
    "postprocess_http": 9104,
    "fusion_grpc": 50055,
    "fusion_http": 9105,
    "monitor_grpc": 50056,
    "monitor_http": 8090,
}


def ports_from_env(env: dict[str, str] | None = None) -> dict[str, int]:
    """Default ports, each overridable by ``LOOM_<NAME>_PORT``."""
    env = dict(os.environ if env is None else env)
    return {k: int(env.get(f"LOOM_{k.upper()}_PORT", v)) for k, v in DEFAULT_PORTS.items()}


def free_ports() -> dict[str, int]:
    return {k: free_port() for k in DEFAULT_PORTS}


def grpc_serving(target: str, timeout: float = 1.0, tls: ClientTls | None = None) -> bool:
    """Whether ``target``'s gRPC health check says SERVING (over TLS, verified with ``tls``, when given)."""
    with tls_channel(target, tls) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


@dataclass
class Mesh:
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="loom-mesh-")))
    ports: dict[str, int] = field(default_factory=ports_from_env)
    model_repository: Path = ROOT / "deploy" / "triton"
    #: Write each process's spans to ``workdir/traces/<service>-<replica>.jsonl``.
    traces: bool = False
    env: dict[str, str] = field(default_factory=dict)
    #: Triton's own OpenTelemetry spans to the monitor (LOOM_TRITON_TRACES=1). Off by default:
    #: Triton 2.51 can crash (SIGSEGV) under concurrent traced requests (triton-inference-server/server#7795).
    triton_traces: bool = field(default_factory=lambda: os.environ.get("LOOM_TRITON_TRACES", "") == "1")
    #: An admin API key every service accepts (their LOOM_DEV_API_KEY): whoever starts the mesh can call
    #: them; the services also send it with their spans to the monitor. Empty: none (then only
    #: LOOM_AUTH_KEYS_FILE or JWTs get in, and OTEL_EXPORTER_OTLP_HEADERS must carry a span key).
    api_key: str = field(default_factory=generate_api_key)
    #: Passwords of deploy/nats/loom.conf's users, fresh per mesh: each service logs in as itself and
    #: may use only its own subjects; ``nats_url`` logs in as admin. Empty: NATS without authentication.
    nats_passwords: dict[str, str] = field(default_factory=new_passwords)
    nats: NatsServer | None = None
    triton: TritonServer | None = None
    services: dict[str, ManagedProcess] = field(default_factory=dict)

    # -- endpoints --------------------------------------------------------
    @property
    def gateway_grpc(self) -> str:
        return f"127.0.0.1:{self.ports['gateway_grpc']}"

    @property
    def gateway_http(self) -> str:
        return f"http://127.0.0.1:{self.ports['gateway_http']}"

    @property
    def monitor_http(self) -> str:
        return f"http://127.0.0.1:{self.ports['monitor_http']}"

    @property
    def triton_grpc(self) -> str:
        return f"127.0.0.1:{self.ports['triton_grpc']}"

    @property
    def nats_address(self) -> str:
        """The NATS URL without credentials."""
        return f"nats://127.0.0.1:{self.ports['nats']}"

    @property
    def nats_url(self) -> str:
        """The NATS URL whoever started the mesh uses: it logs in as admin (all subjects, all of JetStream)."""
        return self.nats_env("admin")["LOOM_NATS_URL"]

    def nats_env(self, user: str) -> dict[str, str]:
        """The ``LOOM_NATS_*`` settings of a process that logs in as ``user`` (the six services, admin)."""
        return login_env("127.0.0.1", self.ports["nats"], user, self.nats_passwords)

    def permission_violations(self) -> list[str]:
        """nats-server's log lines about publishes and subscriptions it refused (a missing permission)."""
        return self.nats.permission_violations() if self.nats is not None else []

    @property
    def tls(self) -> ClientTls | None:
        """How to reach the services when their LOOM_TLS_CERT is set (verified with LOOM_TLS_CA); None: plaintext."""
        env = {**os.environ, **self.env}
        if not env.get("LOOM_TLS_CERT"):
            return None
        if not env.get("LOOM_TLS_CLIENT_CA"):
            return ClientTls(env.get("LOOM_TLS_CA", ""))
        # Mutual TLS: the mesh presents the services' own pair.
        return ClientTls(env.get("LOOM_TLS_CA", ""), env["LOOM_TLS_CERT"], env.get("LOOM_TLS_KEY", ""))

    def http_url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[f'{service}_http']}"

    # -- processes --------------------------------------------------------
    def service_env(self, name: str, replica: str, overrides: dict[str, str] | None = None) -> dict[str, str]:
        # The caller's LOOM_* settings pass through; wiring (addresses, ports) is ours.
        env = dict(os.environ)
        env.update(self.env)
        env["PYTHONPATH"] = str(ROOT)
        env.update(self.nats_env(name))  # each service logs in as itself
        env["LOOM_INFERENCE_TRITON_URL"] = self.triton_grpc
        # Where version folders live: the gateway copies registered versions in, the inference
        # service has Triton load them (explicit model control).
        env["LOOM_GATEWAY_MODEL_REPOSITORY"] = str(self.model_repository)
        env["LOOM_INFERENCE_MODEL_REPOSITORY"] = str(self.model_repository)
        env["LOOM_REPLICA_ID"] = replica
        scheme = "https" if self.tls is not None else "http"
        env["LOOM_OTLP_ENDPOINT"] = f"{scheme}://127.0.0.1:{self.ports['monitor_grpc']}"
        env["LOOM_MONITOR_TRITON_URL"] = f"127.0.0.1:{self.ports['triton_http']}"
        env["LOOM_MONITOR_TRITON_METRICS_URL"] = f"http://127.0.0.1:{self.ports['triton_metrics']}/metrics"
        for svc in SERVICES:
            env[f"LOOM_{svc.upper()}_GRPC_PORT"] = str(self.ports[f"{svc}_grpc"])
            env[f"LOOM_{svc.upper()}_HTTP_PORT"] = str(self.ports[f"{svc}_http"])
        if self.api_key:  # every service checks credentials, the monitor's span ingest too
            env["LOOM_DEV_API_KEY"] = self.api_key
            if not (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
                env.setdefault("OTEL_EXPORTER_OTLP_HEADERS", f"x-api-key={self.api_key}")  # not to a collector
        if self.traces:
            (self.workdir / "traces").mkdir(parents=True, exist_ok=True)
            env["LOOM_TRACES_FILE"] = str(self.workdir / "traces" / f"{replica}.jsonl")
        env.update(overrides or {})
        return env

    def start_service(
        self, name: str, replica: str | None = None, overrides: dict[str, str] | None = None
    ) -> ManagedProcess:
        replica = replica or f"{name}-0"
        proc = ManagedProcess(
            replica,
            [sys.executable, "-m", f"services.{name}"],
            env=self.service_env(name, replica, overrides),
            log_path=self.workdir / "logs" / f"{replica}.log",
            cwd=ROOT,
        ).start()
        self.services[replica] = proc
        return proc

    def start_replica(
        self, name: str, replica: str, timeout: float = 120.0, overrides: dict[str, str] | None = None
    ) -> tuple[ManagedProcess, dict[str, int]]:
        """One more replica of ``name`` on ports of its own; returns when it serves."""
        ports = {"grpc": free_port(), "http": free_port()}
        prefix = f"LOOM_{name.upper()}"
        env = {
            f"{prefix}_GRPC_PORT": str(ports["grpc"]),
            f"{prefix}_HTTP_PORT": str(ports["http"]),
            **(overrides or {}),
        }
        proc = self.start_service(name, replica, env)
        self.wait_serving(replica, ports["grpc"], timeout)
        return proc, ports

    def wait_serving(self, replica: str, grpc_port: int, timeout: float = 120.0) -> None:
        proc = self.services[replica]

        def ok() -> bool:
            if not proc.running():
                raise ProcessExited(f"{replica} exited:\n{proc.log_tail()}")
            return grpc_serving(f"127.0.0.1:{grpc_port}", tls=self.tls)

        try:
            wait_until(ok, timeout, interval=0.2, what=f"{replica} to serve")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{proc.log_tail()}") from None

    def start_triton(self, timeout: float = 120.0) -> TritonServer:
        self.triton = TritonServer(
            self.model_repository,
            http_port=self.ports["triton_http"],
            grpc_port=self.ports["triton_grpc"],
            metrics_port=self.ports["triton_metrics"],
            workdir=self.workdir / "triton",
            log_file=self.workdir / "logs" / "tritonserver.log",
            # Triton's own spans (OTLP/HTTP JSON) join the request traces at the monitor.
            trace_otlp_url=f"127.0.0.1:{self.ports['monitor_http']}/v1/traces" if self.triton_traces else None,
            trace_service_name="triton",
            trace_api_key=self.api_key,
            # Explicit control: every model starts with the versions its config.pbtxt names;
            # Loom's registry loads and unloads further versions through Triton's API.
            model_control_mode="explicit",
            load_models=repository_models(self.model_repository),
        )
        self.triton.start()
        self.triton.wait_ready(timeout)
        return self.triton

    def start(self, timeout: float = 180.0) -> Mesh:
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.nats = NatsServer(
            self.ports["nats"],
            monitor_port=self.ports["nats_monitor"],
            store_dir=self.workdir / "jetstream",
            log_path=self.workdir / "logs" / "nats-server.log",
            passwords=self.nats_passwords or None,
        ).start()
        # Every stream and bucket, made as admin: the services may only bind them.
        env = {**os.environ, **self.env, "PYTHONPATH": str(ROOT), **self.nats_env("admin")}
        run_provisioning(env, self.workdir / "logs" / "provision.log")
        for name in SERVICES:  # they come up in parallel with Triton
            self.start_service(name)
        self.start_triton(timeout)
        for name in SERVICES:
            self.wait_serving(f"{name}-0", self.ports[f"{name}_grpc"], timeout)
        return self

    def stop_replica(self, replica: str, timeout: float = 15.0) -> int | None:
        """SIGTERM one replica (it drains) and forget it; returns its exit code."""
        return self.services.pop(replica).stop(timeout=timeout)

    def stop(self, *, remove_workdir: bool = True) -> None:
        """Stop every process (entry first), then delete the work folder unless asked to keep it."""
        # Entry first, so nothing new comes in while the rest drains; the monitor last, so it
        # still takes the others' final spans.
        order = {"gateway": 0, "monitor": 2}
        for replica in sorted(self.services, key=lambda r: order.get(r.split("-")[0], 1)):
            self.services[replica].stop(timeout=15)
        self.services.clear()
        if self.triton is not None:
            self.triton.stop()
            self.triton = None
        if self.nats is not None:
            self.nats.stop()
            self.nats = None
        if remove_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
