"""Helpers shared by the tests: NATS for one test, gateway clients, metric reads."""

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

from services.common.launch.nats_server import NatsServer
from services.common.pb.loom.v1 import gateway_pb2, gateway_pb2_grpc


@dataclass
class NatsHandle:
    url: str
    stop: Callable[[], None]


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
    server = NatsServer().start()
    return NatsHandle(server.url, server.stop)


def http_json(
    url: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    method: str | None = None,
    timeout: float = 30.0,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(
        url, data=data, method=method, headers={"content-type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def predict_http(
    gateway_http: str, text: str, pipeline: str = "embed", *, headers: dict[str, str] | None = None, **extra: Any
) -> tuple[int, Any]:
    return http_json(
        f"{gateway_http}/v1/pipelines/{pipeline}:predict", {"inputs": {"text": text}, **extra}, headers=headers
    )


def predict_grpc(
    target: str, text: str, pipeline: str = "embed", timeout: float = 30.0, **fields: Any
) -> gateway_pb2.PredictResponse:
    with grpc.insecure_channel(target) as channel:
        req = gateway_pb2.PredictRequest(pipeline=pipeline, **fields)
        req.inputs["text"].text = text
        return gateway_pb2_grpc.GatewayStub(channel).Predict(req, timeout=timeout)


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
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
    gateway_http: str, pipeline: str, inputs: dict[str, str | bytes], timeout: float = 60.0, **extra: Any
) -> tuple[int, Any]:
    """POST /v1 predict with text as strings and files base64-encoded."""
    body = {
        name: value if isinstance(value, str) else {"b64": base64.b64encode(value).decode()}
        for name, value in inputs.items()
    }
    return http_json(f"{gateway_http}/v1/pipelines/{pipeline}:predict", {"inputs": body, **extra}, timeout=timeout)


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
