"""The image suite: one phrase image read by ``ocr``, directly and through the ``content`` pipeline.

Path (a) sends Triton the BGR uint8 ``[H, W, 3]`` array the preprocess service
would produce (``ImagePreprocessor.prepare`` with its defaults: decode,
orientation, longest side at most 960) with the batch dimension the inference
service adds; preprocessing is done once, outside the timing. Paths (b) and (c)
send the PNG itself, image only, so they run the whole chain: decode, OCR,
the text model on the recognised text, topics and fusion.

An answer counts only if the recognised text contains the phrase (case and
spaces ignored); through the gateway it must also be whole (not degraded),
uncached, and carry topics, the proof that the text model ran on it.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc.aio as triton_aio

from services.common.pb.loom.v1 import gateway_pb2, gateway_pb2_grpc
from services.inference.triton import to_inputs
from services.preprocess.image import ImagePreprocessor
from tests.media import text_image
from tools.bench.load import Answer, BadAnswer, Call
from tools.bench.targets import CLIENT_TIMEOUT_S, Clients, Metadata, Suite, check_grpc, check_json, post_json

MODEL = "ocr"
TEXT_MODEL = "minilm"
PIPELINE = "content"
PART = "image"
DEFAULT_PHRASE = "LOOM SERVES MODELS"
DEFAULT_SIZE = (640, 160)
DEFAULT_FONT_SIZE = 48


@dataclass(frozen=True)
class ImageInput:
    phrase: str
    size: tuple[int, int]
    font_size: int
    png: bytes
    bgr: np.ndarray

    @classmethod
    def make(cls, phrase: str, size: tuple[int, int], font_size: int) -> ImageInput:
        png = text_image(phrase, size=size, font_size=font_size)
        bgr, _, _ = ImagePreprocessor().prepare(png)  # what loom.pre.image hands the inference service
        return cls(phrase, size, font_size, png, bgr)


def squash(text: str) -> str:
    """Lower case without whitespace: OCR may split or join words differently from the drawn phrase."""
    return "".join(text.split()).lower()


def _read(phrase: str, lines: list[str]) -> str:
    """The recognised lines joined; BadAnswer unless the phrase is among them."""
    text = " ".join(lines)
    if squash(phrase) not in squash(text):
        raise BadAnswer(f"OCR read {text[:120]!r}, not {phrase!r}")
    return text


def triton_call(client: triton_aio.InferenceServerClient, item: ImageInput) -> Call[str]:
    async def call() -> Answer[str]:
        # Built per request, exactly as the inference service does it (batch of one).
        result = await client.infer(MODEL, to_inputs({"image": item.bgr}), client_timeout=CLIENT_TIMEOUT_S)
        texts = result.as_numpy("text")
        if texts is None or texts.ndim != 2 or texts.shape[0] != 1:
            raise BadAnswer(f"text output of shape {None if texts is None else texts.shape}")
        return Answer(_read(item.phrase, [bytes(t).decode("utf-8", "replace") for t in texts[0]]))

    return call


def grpc_call(stub: gateway_pb2_grpc.GatewayAsyncStub, auth: Metadata, item: ImageInput) -> Call[str]:
    request = gateway_pb2.PredictRequest(pipeline=PIPELINE, bypass_cache=True)
    request.inputs[PART].data = item.png

    async def call() -> Answer[str]:
        output, stages = check_grpc(await stub.Predict(request, timeout=CLIENT_TIMEOUT_S, metadata=auth), PART)
        text = _read(item.phrase, [line.text for line in output.image.ocr])
        if not output.image.topics:
            raise BadAnswer("no topics: the text model did not run on the OCR text")
        return Answer(text, stages)

    return call


def http_call(clients: Clients, item: ImageInput) -> Call[str]:
    url = clients.predict_url(PIPELINE)
    # Encoded once: base64 and JSON on the client are the caller's cost, not the mesh's.
    body = json.dumps({"inputs": {PART: {"b64": base64.b64encode(item.png).decode()}}, "bypass_cache": True}).encode()

    async def call() -> Answer[str]:
        output, stages = check_json(await post_json(clients, url, body), PART)
        text = _read(item.phrase, [str(line.get("text", "")) for line in output.get("ocr", [])])
        if not output.get("topics"):
            raise BadAnswer("no topics: the text model did not run on the OCR text")
        return Answer(text, stages)

    return call


def image_suite(clients: Clients, item: ImageInput, levels: list[int], requests: int, warmup: int) -> Suite:
    return Suite(
        name="image",
        calls={
            "triton": triton_call(clients.triton, item),
            "gateway-grpc": grpc_call(clients.gateway, clients.auth, item),
            "gateway-http": http_call(clients, item),
        },
        levels=levels,
        requests=requests,
        warmup=warmup,
        models=(MODEL, TEXT_MODEL),
    )
