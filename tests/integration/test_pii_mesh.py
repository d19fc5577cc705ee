"""PII on the real mesh: requests full of it leave none in logs, spans, telemetry or the audit log.

A phone number, an e-mail address and a PRC resident ID go in through every
door a caller has: the text input, the request id, the route-key header, an
image (OCR), the pipeline name in the path, a feedback, an admin action (audit)
and a pipeline spec that every service refuses and logs. Then every log file,
every span file, every telemetry event seen on ``loom.tel.>`` and the whole
audit stream are searched for the raw values; the masked forms must show up
where each path leaves a trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from nats.aio.msg import Msg

from services.common.audit import AuditLog
from services.common.bus import Bus
from services.common.launch.mesh import Mesh
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.settings import CommonSettings
from tests import media
from tests.support import http_json, predict_http, predict_inputs, read_spans

pytestmark = pytest.mark.integration

PHONE = "13812345678"
EMAIL = "john.doe@example.com"
RESIDENT_ID = "11010519491231002X"  # region 110105, born 1949-12-31, a valid check character
RAW = (PHONE, EMAIL, RESIDENT_ID)
PHONE_MASKED = "138****5678"
EMAIL_MASKED = "j***@example.com"
ID_MASKED = "110105********002X"

PIPELINE = "content_masked"
TEXT_ID = f"pii-{PHONE}"
IMAGE_ID = f"pii-img-{PHONE}"
ROUTE_KEY = "x-loom-route-key"
BAD_SPEC = "pii_refused"  # stored straight into KV, so every service refuses and logs it
NO_MODEL = "pii_nomodel"  # an admin action on it is refused, and audited


def leaks(text: str) -> list[str]:
    return [raw for raw in RAW if raw in text]


def put_spec(mesh: Mesh, name: str, spec: Any) -> tuple[int, Any]:
    return http_json(f"{mesh.gateway_http}/v1/pipelines/{name}", raw=yaml.safe_dump(spec).encode(), method="PUT")


def event_strings(event: pb.TelemetryEvent) -> list[str]:
    fields = [event.service, event.stage, event.pipeline, event.model, event.model_version, event.request_id]
    return [*fields, event.part_id, event.code, event.outcome, *event.stats]


async def wait_for(check: Any, what: str, timeout: float = 20.0) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not check():
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"not within {timeout:.0f}s: {what}") from None


async def send_everything(mesh: Mesh, bus: Bus, events: list[pb.TelemetryEvent]) -> dict[str, Any]:
    """Every request of the test; returns the answers worth checking."""
    gw = mesh.gateway_http
    answers: dict[str, Any] = {}

    # A pipeline that masks its answers: the shipped content spec with mask_pii on.
    status, content = await asyncio.to_thread(http_json, f"{gw}/v1/pipelines/content")
    assert status == 200, content
    masked = copy.deepcopy(content)
    masked.update(name=PIPELINE, mask_pii=True)
    status, body = await asyncio.to_thread(put_spec, mesh, PIPELINE, masked)
    assert status == 200, body

    # Text, request id and route key.
    text = f"Call {PHONE} or write to {EMAIL}; my ID is {RESIDENT_ID}."
    route_key = f"{EMAIL}/{RESIDENT_ID}"
    status, answers["text"] = await asyncio.to_thread(
        predict_http, gw, text, PIPELINE, headers={ROUTE_KEY: route_key}, request_id=TEXT_ID, bypass_cache=True
    )
    assert status == 200, answers["text"]

    # An image that says it (OCR -> text model). The spec reached postprocess through the KV
    # watch; the first answer normally shows it already, a second try covers a slow watch.
    image = media.text_image(f"TEL {PHONE}", size=(720, 160))
    for _ in range(3):
        status, answers["image"] = await asyncio.to_thread(
            predict_inputs, gw, PIPELINE, {"image": image}, request_id=IMAGE_ID, bypass_cache=True
        )
        assert status == 200, answers["image"]
        if PHONE_MASKED in answers["image"]["outputs"]["image"]["text"]:
            break
        await asyncio.sleep(0.5)

    # A pipeline name that is a phone number: 404, but the path is in a span and the name in telemetry.
    status, answers["unknown"] = await asyncio.to_thread(predict_http, gw, "hello", PHONE)
    assert status == 404, answers["unknown"]

    # Feedback on the text answer, once its telemetry is out (it travels separately from feedback).
    await wait_for(lambda: any(e.request_id == f"pii-{PHONE_MASKED}" for e in events), "gateway telemetry")
    await asyncio.sleep(0.5)
    feedback = {"pipeline": PIPELINE, "request_id": TEXT_ID, "label": "finance", "source": f"agent {EMAIL}"}
    status, answers["feedback"] = await asyncio.to_thread(http_json, f"{gw}/v1/feedback", feedback)
    assert status == 202, answers["feedback"]

    # An admin action, refused (no such model) and audited with its actor and reason.
    status, answers["admin"] = await asyncio.to_thread(
        http_json,
        f"{gw}/v1/admin/models/{NO_MODEL}/rollout:pause",
        {"reason": f"asked by {PHONE}, ID {RESIDENT_ID}"},
        headers={"x-loom-actor": EMAIL},
    )
    assert 400 <= status < 500, answers["admin"]

    # A spec every service refuses from KV and logs, quoting the offending values.
    refused = {"inputs": {"text": {"modality": "text", "stages": [f"bad.{PHONE}", f"bad.{RESIDENT_ID.lower()}"]}}}
    refused[EMAIL] = True
    kv = await bus.nc.jetstream().key_value(CommonSettings().pipelines_bucket)
    await kv.put(BAD_SPEC, yaml.safe_dump(refused).encode())
    return answers


def logs_text(mesh: Mesh) -> dict[str, str]:
    return {p.name: p.read_text(errors="replace") for p in sorted((mesh.workdir / "logs").glob("*"))}


async def test_pii_is_masked_everywhere_it_leaves_a_trace(mesh: Mesh) -> None:
    events: list[pb.TelemetryEvent] = []

    async def collect(msg: Msg) -> None:
        events.append(pb.TelemetryEvent.FromString(msg.data))

    bus = Bus("pii-test")
    await bus.connect(mesh.nats_url, timeout=10)
    try:
        await bus.nc.subscribe("loom.tel.>", cb=collect)
        await bus.nc.flush()
        answers = await send_everything(mesh, bus, events)

        # --- answers: the masked pipeline's OCR text is masked, lines and joined text alike.
        image = answers["image"]["outputs"]["image"]
        assert PHONE_MASKED in image["text"], image
        assert any(PHONE_MASKED in line["text"] for line in image["ocr"]), image["ocr"]
        assert not leaks(str(answers["image"]["outputs"])), image
        assert answers["text"]["request_id"] == TEXT_ID  # the caller's own id comes back as sent

        # --- logs: every service refused the spec and logged it, masked.
        def all_logged() -> bool:
            texts = logs_text(mesh)
            logged = [name for name, text in texts.items() if f"bad.{PHONE_MASKED}" in text]
            return len(logged) >= 6

        await wait_for(all_logged, "every service logs the refused spec, masked")

        # --- feedback still joins its answer although the telemetry carried the id masked.
        def joined() -> bool:
            status, body = http_json(f"{mesh.monitor_http}/v1/accuracy")
            return status == 200 and any(row["pipeline"] == PIPELINE for row in body["accuracy"])

        await wait_for(joined, "feedback joined through the masked request id")

        # --- audit: the refused pause is there, masked; nothing in the stream is raw.
        audit = await AuditLog(bus, service="pii-test").list(limit=1000)
        mine = [e for e in audit if e.get("target") == NO_MODEL]
        assert mine, audit[-3:]
        details = mine[-1]["details"]
        assert isinstance(details, dict) and details["reason"] == f"asked by {PHONE_MASKED}, ID {ID_MASKED}", mine
        assert mine[-1]["actor"] != EMAIL
        leaked = [e for e in audit if leaks(str(e))]
        assert not leaked, leaked
        status, body = await asyncio.to_thread(http_json, f"{mesh.gateway_http}/v1/admin/audit?limit=1000")
        assert status == 200 and not leaks(str(body)), body

        # --- spans: flushed within a second (file exporter every 200 ms), masked.
        traces = mesh.workdir / "traces"

        def span_seen() -> bool:
            return any(s["attributes"].get("loom.request_id") == f"pii-{PHONE_MASKED}" for s in read_spans(traces))

        await wait_for(span_seen, "the gateway span with the masked request id")
        await asyncio.sleep(1.0)  # the last batches of every process
        spans = read_spans(traces)
        leaked_spans = [s for s in spans if leaks(str(s["attributes"]))]
        assert not leaked_spans, leaked_spans[:3]
        paths = {s["attributes"].get("url.path") for s in spans}
        assert f"/v1/pipelines/{PHONE_MASKED}:predict" in paths
        assert all(not leaks(p.read_text()) for p in Path(traces).glob("*.jsonl"))

        # --- telemetry: every event, every string field.
        leaked_events = [e for e in events if any(leaks(s) for s in event_strings(e))]
        assert not leaked_events, leaked_events[:3]
        request_ids = {e.request_id for e in events}
        assert {f"pii-{PHONE_MASKED}", f"pii-img-{PHONE_MASKED}"} <= request_ids
        # The phone sent as a pipeline name is no pipeline: telemetry names it `_unknown`, not even masked.
        assert "_unknown" in {e.pipeline for e in events}

        # --- logs, last: everything above has been written by now.
        for name, text in logs_text(mesh).items():
            assert not leaks(text), (name, [line for line in text.splitlines() if leaks(line)][:3])
    finally:
        kv = await bus.nc.jetstream().key_value(CommonSettings().pipelines_bucket)
        for key in (BAD_SPEC, PIPELINE):
            with contextlib.suppress(Exception):
                await kv.delete(key)
        await bus.close()
