"""Container health probe: ``python -m services.common.healthcheck``.

Asks the gRPC health service of the service in this container on 127.0.0.1
whether it is SERVING, and exits 0 if so, 1 otherwise with a
one-line reason on stderr. The Dockerfile's HEALTHCHECK and Compose run it; on
Kubernetes the kubelet's own gRPC probe does the same job.

Which service: ``LOOM_SERVICE``, else the one PID 1 runs (``python -m
services.<name>``, the image's command form, read from /proc/1/cmdline). The
port is the service's ``LOOM_<SERVICE>_GRPC_PORT`` (its default otherwise).
Under TLS (``LOOM_TLS_CERT`` set) the probe speaks TLS, trusts ``LOOM_TLS_CA``
and presents the service's own pair, as Loom's other clients do; the name it
checks the certificate against is ``LOOM_HEALTHCHECK_TLS_NAME`` (default
``localhost``), since the certificate rarely names 127.0.0.1.

Only the standard library, grpcio and grpcio-health-checking are imported:
the probe runs every few seconds, and pydantic alone would double its start-up.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

#: Default gRPC port of each service (the ``grpc_port`` defaults of their settings classes).
GRPC_PORTS: dict[str, int] = {
    "gateway": 50051,
    "preprocess": 50052,
    "inference": 50053,
    "postprocess": 50054,
    "fusion": 50055,
    "monitor": 50056,
}
TIMEOUT_S = 2.0
PID1_CMDLINE = Path("/proc/1/cmdline")
#: Variables read here that are no service's setting (Compose and the Dockerfile set them).
ENV_VARS = ("LOOM_SERVICE", "LOOM_HEALTHCHECK_TLS_NAME")


class ProbeError(Exception):
    """The probe cannot run: a setting is wrong (the message says which)."""


@dataclass(frozen=True)
class Target:
    service: str
    host: str
    port: int
    tls: bool = False


def service_of(cmdline: Path) -> str:
    """``gateway`` for a process started as ``python -m services.gateway``; "" if it is none of the six."""
    try:
        argv = cmdline.read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return ""
    for flag, module in itertools.pairwise(argv):
        if flag == "-m" and module.startswith("services.") and module.removeprefix("services.") in GRPC_PORTS:
            return module.removeprefix("services.")
    return ""


def target(env: Mapping[str, str], service: str = "", host: str = "127.0.0.1", cmdline: Path = PID1_CMDLINE) -> Target:
    """Where the probe goes, from ``LOOM_SERVICE`` (or PID 1) and ``LOOM_<SERVICE>_GRPC_PORT``."""
    name = (service or env.get("LOOM_SERVICE", "")).strip().lower() or service_of(cmdline)
    if name not in GRPC_PORTS:
        raise ProbeError(
            f"LOOM_SERVICE={name!r}, and PID 1 runs no `python -m services.<name>`: "
            f"expected one of {', '.join(GRPC_PORTS)}"
        )
    var = f"LOOM_{name.upper()}_GRPC_PORT"
    raw = env.get(var, "").strip()
    try:
        port = int(raw) if raw else GRPC_PORTS[name]
    except ValueError:
        raise ProbeError(f"{var}={raw!r} is not a port number") from None
    return Target(name, host, port, tls=bool(env.get("LOOM_TLS_CERT")))


def _credentials(env: Mapping[str, str]) -> grpc.ChannelCredentials:
    def read(var: str) -> bytes | None:
        path = env.get(var, "")
        try:
            return Path(path).read_bytes() if path else None
        except OSError as exc:
            raise ProbeError(f"cannot read {var}={path}: {exc.strerror or exc}") from None

    return grpc.ssl_channel_credentials(
        root_certificates=read("LOOM_TLS_CA"), private_key=read("LOOM_TLS_KEY"), certificate_chain=read("LOOM_TLS_CERT")
    )


def check(t: Target, env: Mapping[str, str], timeout_s: float = TIMEOUT_S) -> str | None:
    """None when the service says SERVING; otherwise why not, in one line."""
    address = f"{t.host}:{t.port}"
    if t.tls:
        name = env.get("LOOM_HEALTHCHECK_TLS_NAME", "") or "localhost"
        channel = grpc.secure_channel(address, _credentials(env), options=[("grpc.ssl_target_name_override", name)])
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            return f"{t.service} at {address}: {code.name if code else 'error'}: {detail}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"{t.service} at {address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None, cmdline: Path = PID1_CMDLINE) -> int:
    """Exit status for Docker: 0 healthy, 1 not (Docker reserves 2)."""
    parser = argparse.ArgumentParser(
        prog="python -m services.common.healthcheck", description="Exit 0 when the Loom service here is SERVING."
    )
    parser.add_argument("--service", default="", help="instead of LOOM_SERVICE")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds (default %(default)s)")
    args = parser.parse_args(argv)
    env = os.environ if env is None else env
    try:
        t = target(env, args.service, args.host, cmdline)
        reason = check(t, env, args.timeout)
    except ProbeError as exc:
        reason = str(exc)
    if reason is None:
        return 0
    print(f"unhealthy: {reason}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
