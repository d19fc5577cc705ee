"""The content pipeline end to end: text, image (OCR -> text model) and audio (VAD) on the real mesh.

Inputs are made by the tests themselves: Pillow draws a phrase in a DejaVu
font, espeak-ng speaks a sentence that gets padded with silence.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from services.common.launch.mesh import Mesh
from tests import media
from tests.support import bearer, eventually, gateway_channel, http_json, metric, predict_inputs, read_spans

pytestmark = pytest.mark.integration

PHRASE = "LOOM SERVES MODELS"
SPORT = "The striker scored twice as the home team won the championship final in front of sixty thousand fans."


def squash(text: str) -> str:
    return "".join(text.split()).lower()


@pytest.fixture(scope="module")
def speech() -> tuple[bytes, float, float]:
    return media.speech_wav("The weather today is sunny with a light breeze.", lead_silence_s=1.0, tail_silence_s=1.0)


def test_text_about_sport_ranks_sports_first(mesh: Mesh) -> None:
    status, body = predict_inputs(mesh.gateway_http, "content", {"text": SPORT})
    assert status == 200, body
    assert body["outputs"]["text"]["labels"][0]["label"] == "sports"
    assert body["topics"][0]["label"] == "sports"
    assert body["degraded"] is False and body["missing"] == []


def test_image_phrase_comes_back_in_ocr_and_its_topics_through_the_chain(mesh: Mesh) -> None:
    status, body = predict_inputs(mesh.gateway_http, "content", {"image": media.text_image(PHRASE)})
    assert status == 200, body
    image = body["outputs"]["image"]
    assert squash(PHRASE) in squash(" ".join(line["text"] for line in image["ocr"])), image["ocr"]
    assert all(line["score"] > 0.5 for line in image["ocr"])
    for line in image["ocr"]:
        xs, ys = line["box"][0::2], line["box"][1::2]
        assert min(xs) >= 0 and max(xs) <= image["width"] + 1 and min(ys) >= 0 and max(ys) <= image["height"] + 1
    # The recognised text went on through the text model: topics of what the image says.
    assert image["topics"] and image["text"]
    assert body["topics"][0]["label"] == image["topics"][0]["label"]

    # One trace: the OCR call and then the text-model call, linked hop by hop.
    trace_id = body["trace_id"]

    def chain() -> list[dict[str, Any]]:
        spans = [s for s in read_spans(mesh.workdir / "traces") if s["trace_id"] == trace_id]
        names = {s["name"] for s in spans}
        assert {"triton infer ocr", "triton infer minilm", "process loom.post.ocr"} <= names, names
        # Services export in batches: wait until every parent has arrived, not only the named spans.
        ids = {s["span_id"] for s in spans}
        missing = {s["parent_id"] for s in spans if s["parent_id"] is not None} - ids
        assert not missing, f"parents not yet exported: {missing}"
        return spans

    spans = eventually(chain, timeout=15)
    by_id = {s["span_id"]: s for s in spans}

    def ancestors(span: dict[str, Any]) -> list[str]:
        names = []
        while span["parent_id"] is not None:
            span = by_id[span["parent_id"]]
            names.append(span["name"])
        return names

    minilm = next(s for s in spans if s["name"] == "triton infer minilm")
    path = ancestors(minilm)
    # minilm's call descends from OCR's post-processing, which descends from the OCR consumer.
    assert "process loom.post.ocr" in path and "process loom.infer.ocr" in path
    assert path.index("process loom.post.ocr") < path.index("process loom.infer.ocr")


def test_speech_segments_cover_the_speech_and_not_the_silence(mesh: Mesh, speech: tuple[bytes, float, float]) -> None:
    wav, start, end = speech
    status, body = predict_inputs(mesh.gateway_http, "content", {"audio": wav})
    assert status == 200, body
    audio = body["outputs"]["audio"]
    segments = audio["speech_segments"]
    assert segments, audio
    tolerance = 0.15
    assert segments[0]["start_s"] >= start - tolerance - 0.05  # nothing in the lead silence
    assert segments[-1]["end_s"] <= end + tolerance + 0.1  # nothing in the tail silence
    assert segments[0]["start_s"] <= start + tolerance and segments[-1]["end_s"] >= end - tolerance
    assert 0.3 < audio["speech_ratio"] < 0.9
    assert audio["duration_s"] == pytest.approx(end + 1.0, abs=0.1)


def test_content_with_all_three_and_with_subsets(mesh: Mesh, speech: tuple[bytes, float, float]) -> None:
    everything = {"text": SPORT, "image": media.text_image("FOOTBALL MATCH TONIGHT"), "audio": speech[0]}
    status, body = predict_inputs(mesh.gateway_http, "content", everything)
    assert status == 200, body
    assert set(body["outputs"]) == {"text", "image", "audio"}
    assert body["degraded"] is False and body["missing"] == []
    assert body["topics"][0]["label"] == "sports"
    assert len(body["topics"]) == 3

    status, body = predict_inputs(mesh.gateway_http, "content", {"audio": speech[0], "text": SPORT})
    assert status == 200 and set(body["outputs"]) == {"text", "audio"} and body["missing"] == []


def test_a_deadline_too_short_for_ocr_answers_degraded_in_time(mesh: Mesh) -> None:
    # A page of sixteen lines keeps OCR busy for well over a second; the text part takes tens of ms.
    lines = "\n".join(f"LINE {i} NATS MESH TRITON DEADLINE" for i in range(16))
    page = media.text_image(lines, size=(960, 960), font_size=34)
    timeout_ms = 400
    started = time.monotonic()
    status, body = predict_inputs(
        mesh.gateway_http, "content", {"text": SPORT, "image": page}, timeout_ms=timeout_ms, bypass_cache=True
    )
    elapsed_ms = (time.monotonic() - started) * 1000
    assert status == 200, body
    assert body["degraded"] is True and body["missing"] == ["image"]
    assert "text" in body["outputs"] and body["topics"]
    assert elapsed_ms < timeout_ms + 250, elapsed_ms  # answered at the deadline, not after OCR finished


def test_second_identical_request_is_a_cache_hit_and_bypass_skips_it(mesh: Mesh) -> None:
    image = media.text_image("CACHE ME IF YOU CAN")
    inference = mesh.http_url("inference")

    def hits() -> float:
        return metric(inference, "loom_inference_cache_requests_total", model="ocr", result="hit")

    before = hits()
    first = predict_inputs(mesh.gateway_http, "content", {"image": image})[1]
    second = predict_inputs(mesh.gateway_http, "content", {"image": image})[1]
    assert first["notes"]["image/inference.cache"] == "miss"
    assert second["notes"]["image/inference.cache"] == "hit"
    assert hits() >= before + 1
    assert second["outputs"]["image"]["ocr"] == first["outputs"]["image"]["ocr"]
    third = predict_inputs(mesh.gateway_http, "content", {"image": image}, bypass_cache=True)[1]
    assert third["notes"]["image/inference.cache"] == "bypass"
    assert third["outputs"]["image"]["ocr"] == first["outputs"]["image"]["ocr"]


def test_an_image_above_the_bus_payload_travels_by_claim_check(mesh: Mesh) -> None:
    import numpy as np
    from PIL import Image, ImageDraw

    # Noise does not compress: a PNG of a few MB, well above NATS's 1 MiB max payload.
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 40, size=(1400, 1400, 3), dtype=np.uint8) + 215
    img = Image.fromarray(pixels)
    ImageDraw.Draw(img).text((100, 600), "CLAIM CHECK", fill=(0, 0, 0), font_size=120, font=None)
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    data = buf.getvalue()
    assert len(data) > 2 * 1024 * 1024
    gateway = mesh.gateway_http
    before = metric(gateway, "loom_claim_check_total", service="gateway", op="put")
    status, body = predict_inputs(gateway, "content", {"image": data}, timeout_ms=20000)
    assert status == 200, body
    assert "claimcheck" in squash(body["outputs"]["image"]["text"]), body["outputs"]["image"]["ocr"]
    assert metric(gateway, "loom_claim_check_total", service="gateway", op="put") == before + 1


@pytest.mark.parametrize(
    ("inputs", "status", "says"),
    [
        ({"image": b"\x89PNG\r\n\x1a\n" + b"\x13" * 300}, 400, "image could not be decoded"),
        ({"audio": b"RIFF\x00\x00\x00\x00WAVEnot really"}, 400, "audio could not be decoded"),
        ({"audio": b"%PDF-1.7 this is a document"}, 400, "not a supported audio file"),
        ({"image": b""}, 400, "empty (0 bytes)"),
        ({"image": b"GIF89a" + b"\x00" * 64}, 400, "image/gif"),
        ({"image": b"BM" + b"\x00" * 64}, 400, "image/bmp"),
    ],
)
def test_bad_files_get_typed_errors(mesh: Mesh, inputs: dict[str, bytes], status: int, says: str) -> None:
    got, body = predict_inputs(mesh.gateway_http, "content", inputs)
    assert got == status, body
    assert says in body["error"]["message"], body


def test_a_50_mb_upload_is_refused_at_once_and_neighbours_are_served(mesh: Mesh) -> None:
    big = b"\x89PNG\r\n\x1a\n" + bytes(50 * 1024 * 1024)
    with ThreadPoolExecutor(8) as pool:
        good = [pool.submit(predict_inputs, mesh.gateway_http, "content", {"text": f"{SPORT} {i}"}) for i in range(6)]
        started = time.monotonic()
        status, body = predict_inputs(mesh.gateway_http, "content", {"image": big})
        refused_in = time.monotonic() - started
        assert status == 413, body
        assert body["error"]["code"] == "RESOURCE_EXHAUSTED" and "limit" in body["error"]["message"]
        assert refused_in < 10
        assert all(f.result()[0] == 200 for f in good)
    # The services are all still there.
    for service in ("gateway", "preprocess", "inference", "postprocess", "fusion"):
        assert http_json(f"{mesh.http_url(service)}/readyz")[0] == 200


async def test_multipart_upload_like_curl_dash_f(mesh: Mesh, speech: tuple[bytes, float, float]) -> None:
    import aiohttp

    form = aiohttp.FormData()
    form.add_field("text", SPORT)
    form.add_field("image", media.text_image(PHRASE), filename="phrase.png", content_type="image/png")
    form.add_field("audio", speech[0], filename="speech.wav", content_type="audio/wav")
    form.add_field("timeout_ms", "20000")
    async with (
        aiohttp.ClientSession(headers=bearer()) as session,
        session.post(f"{mesh.gateway_http}/v1/pipelines/content:predict", data=form) as resp,
    ):
        body = await resp.json()
    assert resp.status == 200, body
    assert set(body["outputs"]) == {"text", "image", "audio"} and not body["degraded"]
    assert squash(PHRASE) in squash(body["outputs"]["image"]["text"])


def test_grpc_predict_carries_files(mesh: Mesh) -> None:
    import grpc

    from services.common.pb.loom.v1 import gateway_pb2, gateway_pb2_grpc

    with gateway_channel(mesh.gateway_grpc) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        req = gateway_pb2.PredictRequest(pipeline="content")
        req.inputs["image"].data = media.text_image(PHRASE)
        resp = stub.Predict(req, timeout=30)
        assert squash(PHRASE) in squash(resp.outputs["image"].image.text)
        bad = gateway_pb2.PredictRequest(pipeline="content")
        bad.inputs["audio"].data = b"not audio"
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(bad, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a supported audio file" in (info.value.details() or "")


async def test_preprocessors_publish_input_statistics(mesh: Mesh, speech: tuple[bytes, float, float]) -> None:
    """The raw material for drift monitoring: each part's input statistics on loom.tel.preprocess."""
    import asyncio

    import nats

    from services.common import subjects
    from services.common.pb.loom.v1 import envelope_pb2 as pb

    events: list[pb.TelemetryEvent] = []
    nc = await nats.connect(mesh.nats_url)
    try:

        async def collect(msg: Any) -> None:
            events.append(pb.TelemetryEvent.FromString(msg.data))

        await nc.subscribe(subjects.telemetry("preprocess"), cb=collect)
        await nc.flush()
        inputs = {"text": SPORT, "image": media.text_image(PHRASE), "audio": speech[0]}
        status, body = await asyncio.to_thread(predict_inputs, mesh.gateway_http, "content", inputs)
        assert status == 200, body
        async with asyncio.timeout(10):
            while {e.stage for e in events} < {"loom.pre.text", "loom.pre.image", "loom.pre.audio"}:
                await asyncio.sleep(0.05)
    finally:
        await nc.close()
    # Keyed by stage and part: the image's OCR text passes pre.text too.
    stats = {e.stage: dict(e.stats) for e in events if e.part_id == e.stage.rsplit(".", 1)[-1]}
    assert stats["loom.pre.image"]["image_width"] == 640 and stats["loom.pre.image"]["image_height"] == 160
    assert 0.8 < stats["loom.pre.image"]["image_brightness"] <= 1.0  # black text on white
    assert stats["loom.pre.audio"]["audio_duration_s"] == pytest.approx(speech[2] + 1.0, abs=0.1)
    assert stats["loom.pre.text"]["text_tokens"] > 10
