"""The text suite: one sentence embedded by ``minilm``, directly and through the ``embed`` pipeline.

Path (a) sends Triton the tensors the preprocess service would produce
(``TextTokenizer``) in the shape the inference service sends (``[1, seq]``
int64, built per request by the service's own ``to_inputs``); tokenization is
done once, outside the timing. Each call returns the embedding, so the report
can check that all three paths compute the same thing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc.aio as triton_aio

from services.common.pb.loom.v1 import gateway_pb2, gateway_pb2_grpc
from services.inference.triton import to_inputs
from services.preprocess.text import TextTokenizer
from tools.bench.load import Answer, BadAnswer, Call
from tools.bench.targets import CLIENT_TIMEOUT_S, Clients, Metadata, Suite, check_grpc, check_json, post_json

MODEL = "minilm"
PIPELINE = "embed"
PART = "text"
EMBED_DIM = 384
DEFAULT_TEXT = "The match ended in a draw after extra time, and both coaches praised the young goalkeepers."


@dataclass(frozen=True)
class TextInput:
    text: str
    tensors: dict[str, np.ndarray]

    @classmethod
    def make(cls, text: str) -> TextInput:
        tensors, _ = TextTokenizer().encode(text)  # the preprocess service's defaults (max_tokens 256)
        return cls(text, tensors)

    @property
    def tokens(self) -> int:
        return int(self.tensors["input_ids"].shape[0])


def _embedding(values: list[float]) -> np.ndarray:
    if len(values) != EMBED_DIM:
        raise BadAnswer(f"embedding of length {len(values)}")
    return np.asarray(values, dtype=np.float32)


def triton_call(client: triton_aio.InferenceServerClient, item: TextInput) -> Call[np.ndarray]:
    async def call() -> Answer[np.ndarray]:
        # Built per request, exactly as the inference service does it.
        result = await client.infer(MODEL, to_inputs(item.tensors), client_timeout=CLIENT_TIMEOUT_S)
        out = result.as_numpy("embedding")
        if out is None or out.shape != (1, EMBED_DIM):
            raise BadAnswer(f"embedding shape {None if out is None else out.shape}")
        return Answer(np.asarray(out[0], dtype=np.float32))

    return call


def grpc_call(stub: gateway_pb2_grpc.GatewayAsyncStub, auth: Metadata, item: TextInput) -> Call[np.ndarray]:
    request = gateway_pb2.PredictRequest(
        pipeline=PIPELINE, inputs={PART: gateway_pb2.Input(text=item.text)}, bypass_cache=True
    )

    async def call() -> Answer[np.ndarray]:
        output, stages = check_grpc(await stub.Predict(request, timeout=CLIENT_TIMEOUT_S, metadata=auth), PART)
        return Answer(_embedding(list(output.text.embedding)), stages)

    return call


def http_call(clients: Clients, item: TextInput) -> Call[np.ndarray]:
    url = clients.predict_url(PIPELINE)
    body = json.dumps({"inputs": {PART: item.text}, "bypass_cache": True}).encode()

    async def call() -> Answer[np.ndarray]:
        output, stages = check_json(await post_json(clients, url, body), PART)
        return Answer(_embedding(output.get("embedding", [])), stages)

    return call


def text_suite(clients: Clients, item: TextInput, levels: list[int], requests: int, warmup: int) -> Suite:
    return Suite(
        name="text",
        calls={
            "triton": triton_call(clients.triton, item),
            "gateway-grpc": grpc_call(clients.gateway, clients.auth, item),
            "gateway-http": http_call(clients, item),
        },
        levels=levels,
        requests=requests,
        warmup=warmup,
        models=(MODEL,),
    )


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))
