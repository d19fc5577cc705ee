"""What both suites share: the three paths, their long-lived clients, and the gateway answer checks.

Each path reuses one client for all its workers (one Triton gRPC channel, one
gateway gRPC channel, one aiohttp connection pool), as a real caller would.
Every gateway request asks to bypass the inference result cache, and every
answer must say it did: the suites send the same input again and again, and a
cache hit would measure a key-value lookup instead of the model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import aiohttp
import grpc
import tritonclient.grpc.aio as triton_aio

from services.common.launch.mesh import Mesh
from services.common.pb.loom.v1 import gateway_pb2, gateway_pb2_grpc
from tools.bench.load import BadAnswer, Call

TARGETS = ("triton", "gateway-grpc", "gateway-http")
TARGET_LABEL = {
    "triton": "(a) Triton direct, gRPC",
    "gateway-grpc": "(b) Loom gateway, gRPC",
    "gateway-http": "(c) Loom gateway, HTTP",
}
VIA = ("gateway-grpc", "gateway-http")
#: Seconds a client waits for one answer; far above any level's latency, so a hang shows as an error.
CLIENT_TIMEOUT_S = 30.0
#: The gateway's note on each part's inference stage; "bypass" proves the model really ran.
CACHE_NOTE = "{part}/inference.cache"
#: gRPC call metadata (the credential).
Metadata = tuple[tuple[str, str], ...]


@dataclass
class Suite:
    """One benchmark suite: the same input sent three ways, at each concurrency level."""

    name: str
    calls: dict[str, Call[Any]]
    levels: list[int]
    requests: int
    warmup: int
    #: Triton models whose counters are read around each level.
    models: tuple[str, ...]


@dataclass
class Clients:
    """The long-lived clients of the three paths (the Triton one also reads its statistics)."""

    triton: triton_aio.InferenceServerClient
    channel: grpc.aio.Channel
    gateway: gateway_pb2_grpc.GatewayAsyncStub
    http: aiohttp.ClientSession
    gateway_http: str
    #: The mesh's admin key as gRPC metadata; the HTTP session sends it as a default header.
    auth: Metadata = ()

    @classmethod
    def open(cls, mesh: Mesh, connections: int) -> Clients:
        """Clients for ``mesh``; the HTTP pool holds ``connections`` keep-alive connections (one per worker)."""
        channel = grpc.aio.insecure_channel(mesh.gateway_grpc)
        auth = {"authorization": f"Bearer {mesh.api_key}"}
        return cls(
            triton=triton_aio.InferenceServerClient(mesh.triton_grpc),
            channel=channel,
            # grpc.aio is untyped here, so mypy cannot pick the stub's async overload by itself.
            gateway=cast("gateway_pb2_grpc.GatewayAsyncStub", gateway_pb2_grpc.GatewayStub(channel)),
            http=aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections), headers=auth),
            gateway_http=mesh.gateway_http,
            auth=tuple(auth.items()),
        )

    def predict_url(self, pipeline: str) -> str:
        return f"{self.gateway_http}/v1/pipelines/{pipeline}:predict"

    async def close(self) -> None:
        await self.http.close()
        await self.channel.close()
        await self.triton.close()


def check_grpc(resp: gateway_pb2.PredictResponse, part: str) -> tuple[Any, dict[str, float]]:
    """(the part's output, the stage timings) of a gateway gRPC answer that is whole and uncached."""
    if resp.degraded or part not in resp.outputs:
        raise BadAnswer(f"degraded answer, missing {list(resp.missing)}: {dict(resp.errors)}")
    _check_bypassed(resp.notes, part)
    return resp.outputs[part], dict(resp.timings_ms)


async def post_json(clients: Clients, url: str, body: bytes) -> dict[str, Any]:
    """POST a prepared JSON body; the answer document if it is HTTP 200 and valid JSON."""
    async with clients.http.post(url, data=body, headers={"content-type": "application/json"}) as resp:
        payload = await resp.read()
        if resp.status != 200:
            raise BadAnswer(f"HTTP {resp.status}: {payload[:200]!r}")
    return cast(dict[str, Any], json.loads(payload))


def check_json(doc: dict[str, Any], part: str) -> tuple[dict[str, Any], dict[str, float]]:
    """(the part's output, the stage timings) of a gateway HTTP answer that is whole and uncached."""
    output = doc.get("outputs", {}).get(part)
    if doc.get("degraded") or not output:
        raise BadAnswer(f"degraded answer, missing {doc.get('missing')}: {str(doc.get('errors'))[:200]}")
    _check_bypassed(doc.get("notes", {}), part)
    return output, {k: float(v) for k, v in doc.get("timings_ms", {}).items()}


def _check_bypassed(notes: Mapping[str, str], part: str) -> None:
    note = notes.get(CACHE_NOTE.format(part=part))
    if note != "bypass":
        raise BadAnswer(f"inference cache {note!r}, expected 'bypass': the model may not have run")
