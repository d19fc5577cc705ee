"""Helpers shared by the tests: NATS for one test, gateway clients (with credentials), metric reads.

Every test mesh's gateway takes :data:`TEST_API_KEY` as its admin key (``Mesh(api_key=...)``),
and the clients here send it unless told otherwise (``key=None`` sends nothing).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families
from tritonclient._plugin import InferenceServerClientPlugin

from services.common.auth import hash_key
from services.common.launch.nats_server import NatsServer, new_passwords, run_provisioning
from services.common.pb.loom.v1 import gateway_pb2, gateway_pb2_grpc

# --- credentials ---------------------------------------------------------------------------------

#: The admin key of every test mesh (its LOOM_DEV_API_KEY: id "dev", tenant "dev").
TEST_API_KEY = "loom_test-admin-key-0123456789abcdefghijklmnop"
#: Keys of the keys file the shared mesh reads (:func:`write_keys_file`), tenant "acme".
TEST_PREDICT_KEY = "loom_test-predict-key-0123456789abcdefghijklmn"
TEST_VIEWER_KEY = "loom_test-viewer-key-0123456789abcdefghijklmno"
TEST_TENANT = "acme"
#: The HS256 secret and audience of the shared mesh's bearer JWTs.
TEST_JWT_SECRET = "loom-test-jwt-secret-0123456789abcdefghijklmnop"
TEST_JWT_AUDIENCE = "loom-tests"


def write_keys_file(path: Path) -> Path:
    """A keys file holding a predict key and a viewer key (their sha256 only, as in production)."""
    records = [
        {"id": "test-predict", "sha256": hash_key(TEST_PREDICT_KEY), "roles": ["predict"], "tenant": TEST_TENANT},
        {"id": "test-viewer", "sha256": hash_key(TEST_VIEWER_KEY), "roles": ["viewer"], "tenant": TEST_TENANT},
    ]
    path.write_text(json.dumps(records))
    return path


def auth_env(keys_file: Path) -> dict[str, str]:
    """The gateway settings that make it take the keys file and the test JWTs."""
    return {
        "LOOM_AUTH_KEYS_FILE": str(keys_file),
        "LOOM_AUTH_JWT_SECRET": TEST_JWT_SECRET,
        "LOOM_AUTH_JWT_AUDIENCE": TEST_JWT_AUDIENCE,
    }


def bearer(key: str | None = TEST_API_KEY) -> dict[str, str]:
    """The HTTP header carrying ``key``; none for None."""
    return {} if key is None else {"authorization": f"Bearer {key}"}


def grpc_auth(key: str | None = TEST_API_KEY) -> tuple[tuple[str, str], ...]:
    """The gRPC metadata carrying ``key``; none for None."""
    return tuple(bearer(key).items())


class BearerAuth(InferenceServerClientPlugin):  # type: ignore[misc]
    """tritonclient (gRPC and HTTP) sends ``key`` with every call: ``client.register_plugin(BearerAuth())``."""

    def __init__(self, key: str = TEST_API_KEY) -> None:
        self.key = key

    def __call__(self, request: Any) -> None:
        request.headers["authorization"] = f"Bearer {self.key}"


class _Metadata(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, pairs: tuple[tuple[str, str], ...]) -> None:
        self.pairs = pairs

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(details._replace(metadata=(*(details.metadata or ()), *self.pairs)), request)


def gateway_channel(target: str, key: str | None = TEST_API_KEY) -> grpc.Channel:
    """A channel to the gateway whose unary calls carry ``key``."""
    return grpc.intercept_channel(grpc.insecure_channel(target), _Metadata(grpc_auth(key)))


@dataclass
class NatsHandle:
    """A NATS for one test. ``url`` logs in as admin: the test's own clients may do anything."""

    url: str
    stop: Callable[[], None]
    #: The local server, running deploy/nats/loom.conf (None: a container without authentication).
    server: NatsServer | None = None

    def login_env(self, user: str) -> dict[str, str]:
        """The ``LOOM_NATS_*`` settings of a service process that logs in as ``user`` (least privilege)."""
        return self.server.login_env(user) if self.server is not None else {"LOOM_NATS_URL": self.url}

    def provision(self, workdir: Path, **settings: str) -> None:
        """Make every stream and bucket (as admin), as ``make run`` does before the services start."""
        env = {
            **os.environ,
            "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
            **settings,
            **self.login_env("admin"),
        }
        run_provisioning(env, workdir / "provision.log")

    def permission_violations(self) -> list[str]:
        """The server's log lines about refused publishes and subscriptions."""
        return self.server.permission_violations() if self.server is not None else []


def docker_available() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


def start_nats() -> NatsHandle:
    if docker_available():  # pragma: no cover - no Docker engine on these machines
        from testcontainers.core.container import DockerContainer
        from testcontainers.core.waiting_utils import wait_for_logs

        container = DockerContainer("nats:2.11").with_command("-js").with_exposed_ports(4222)
        container.start()
        wait_for_logs(container, "Server is ready")
        url = f"nats://{container.get_container_host_ip()}:{container.get_exposed_port(4222)}"
        return NatsHandle(url, container.stop)
    # Loom's least-privilege configuration, fresh passwords: a service process the test starts logs
    # in as itself (NatsHandle.login_env), the test's own clients as admin.
    server = NatsServer(passwords=new_passwords()).start()
    return NatsHandle(server.url_for("admin"), server.stop, server)


def http_json(
    url: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    method: str | None = None,
    timeout: float = 30.0,
    headers: dict[str, str] | None = None,
    key: str | None = TEST_API_KEY,
) -> tuple[int, Any]:
    """One JSON call, with ``key`` as the bearer credential; (status, parsed body) whatever the status."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(
        url, data=data, method=method, headers={"content-type": "application/json", **bearer(key), **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def predict_http(
    gateway_http: str,
    text: str,
    pipeline: str = "embed",
    *,
    headers: dict[str, str] | None = None,
    key: str | None = TEST_API_KEY,
    **extra: Any,
) -> tuple[int, Any]:
    return http_json(
        f"{gateway_http}/v1/pipelines/{pipeline}:predict", {"inputs": {"text": text}, **extra}, headers=headers, key=key
    )


def predict_grpc(
    target: str,
    text: str,
    pipeline: str = "embed",
    timeout: float = 30.0,
    *,
    key: str | None = TEST_API_KEY,
    **fields: Any,
) -> gateway_pb2.PredictResponse:
    with grpc.insecure_channel(target) as channel:
        req = gateway_pb2.PredictRequest(pipeline=pipeline, **fields)
        req.inputs["text"].text = text
        reply: gateway_pb2.PredictResponse = gateway_pb2_grpc.GatewayStub(channel).Predict(
            req, timeout=timeout, metadata=grpc_auth(key)
        )
        return reply


def metric(url: str, name: str, *, key: str | None = TEST_API_KEY, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (``/metrics`` needs a viewer's ``key``)."""
    req = urllib.request.Request(f"{url}/metrics", headers=bearer(key))
    with urllib.request.urlopen(req, timeout=5) as resp:
        text = resp.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def read_spans(folder: Path) -> list[dict[str, Any]]:
    spans = []
    for path in folder.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            if line.strip():
                spans.append(json.loads(line))
    return spans


def eventually(check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.2) -> Any:
    """Retry ``check`` until it returns a truthy value without raising."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except AssertionError as exc:
            last = exc
        time.sleep(interval)
    if last is not None:
        raise last
    raise AssertionError(f"condition not met within {timeout}s")


def predict_inputs(
    gateway_http: str,
    pipeline: str,
    inputs: dict[str, str | bytes],
    timeout: float = 60.0,
    *,
    key: str | None = TEST_API_KEY,
    **extra: Any,
) -> tuple[int, Any]:
    """POST /v1 predict with text as strings and files base64-encoded."""
    body = {
        name: value if isinstance(value, str) else {"b64": base64.b64encode(value).decode()}
        for name, value in inputs.items()
    }
    url = f"{gateway_http}/v1/pipelines/{pipeline}:predict"
    return http_json(url, {"inputs": body, **extra}, timeout=timeout, key=key)


MODEL_REPOSITORY = Path(__file__).resolve().parents[1] / "deploy" / "triton"


def copy_model_repository(dest: Path, src: Path = MODEL_REPOSITORY) -> Path:
    """A model repository a test may change (registering copies version folders into it).

    Symlinks stay symlinks; ONNX files are hard-linked (symlinked across file
    systems) rather than copied; ``__pycache__`` folders are left behind.
    """

    def link_or_copy(source: str, target: str) -> None:
        if source.endswith(".onnx"):
            try:
                os.link(source, target)
            except OSError:
                os.symlink(os.path.abspath(source), target)
        else:
            shutil.copy2(source, target)

    shutil.copytree(src, dest, symlinks=True, copy_function=link_or_copy, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def start_explicit_triton(repository: Path, workdir: Path, model: str, timeout: float = 120.0) -> Any:
    """A tritonserver in explicit model-control mode that loads only ``model`` (the caller closes it)."""
    from services.common.launch.procs import free_port
    from services.common.triton_server import TritonServer

    triton = TritonServer(
        repository,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        workdir=workdir / "triton",
        model_control_mode="explicit",
        load_models=[model],
    )
    triton.start()
    try:
        triton.wait_ready(timeout=timeout)
    except BaseException:
        triton.close()
        raise
    return triton


def start_inference_process(
    workdir: Path, nats: NatsHandle | str, triton_grpc: str, **settings: str
) -> tuple[Any, str]:
    """The inference service as its own process, no monitor to export to; returns it and its HTTP URL.

    ``settings``: more ``LOOM_*`` variables, e.g. ``LOOM_INFERENCE_MODELS='["minilm"]'``. Given a
    :class:`NatsHandle`, JetStream is provisioned first and the service logs in as ``inference``,
    with only its own permissions; given a URL, it connects with that.
    """
    if isinstance(nats, NatsHandle):
        nats.provision(workdir, **settings)
        login = nats.login_env("inference")
    else:
        login = {"LOOM_NATS_URL": nats}
    import sys

    from services.common.launch.mesh import ROOT, grpc_serving
    from services.common.launch.procs import ManagedProcess, free_port, wait_until

    grpc_port, http_port = free_port(), free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        **login,
        "LOOM_INFERENCE_TRITON_URL": triton_grpc,
        "LOOM_INFERENCE_GRPC_PORT": str(grpc_port),
        "LOOM_INFERENCE_HTTP_PORT": str(http_port),
        "LOOM_OTLP_ENDPOINT": "",  # no monitor here: spans go to LOOM_TRACES_FILE, if set, only
        "LOOM_DEV_API_KEY": TEST_API_KEY,  # its /metrics needs credentials, as every service's
        **settings,
    }
    service = ManagedProcess(
        "inference", [sys.executable, "-m", "services.inference"], env=env, log_path=workdir / "inference.log"
    ).start()
    try:
        wait_until(lambda: grpc_serving(f"127.0.0.1:{grpc_port}"), 60, what="the inference service")
    except BaseException:
        print(service.log_tail(40))
        service.stop()
        raise
    return service, f"http://127.0.0.1:{http_port}"
