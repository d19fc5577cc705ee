"""Durable answers in the monitor: fusion's ``loom.res`` event makes them joinable with feedback,
and keeps them out of the SLOs and the capacity signal (their duration is a stay in the lane)."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from services.common.answers import DURABLE_ANSWER_STAGE, answer_models, top_label
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.pb.loom.v1 import gateway_pb2
from services.common.pii import mask
from services.monitor.service import Monitor
from services.monitor.settings import MonitorSettings

pytestmark = pytest.mark.unit


def _answer() -> gateway_pb2.PredictResponse:
    response = gateway_pb2.PredictResponse()
    text = response.outputs["text"].text
    text.model, text.model_version = "minilm", "2"
    text.labels.add(label="sports", score=0.9)
    image = response.outputs["image"].image
    image.model, image.model_version = "ocr", "1"
    return response


def test_an_answer_names_its_models_and_its_best_label() -> None:
    response = _answer()
    assert answer_models(response) == ("minilm+ocr", "2+1")
    assert top_label(response) == "sports"
    response.topics.add(label="football", score=0.8)  # fused topics win over an output's own labels
    assert top_label(response) == "football"
    assert answer_models(gateway_pb2.PredictResponse()) == ("", "") and top_label(gateway_pb2.PredictResponse()) == ""


def test_feedback_joins_a_durable_answer_which_stays_out_of_slos_and_capacity() -> None:
    m = Monitor(MonitorSettings())
    try:
        event = pb.TelemetryEvent(
            service="fusion",
            stage=DURABLE_ANSWER_STAGE,
            pipeline="embed",
            request_id=mask("durable-1"),  # as TelemetryPublisher sends it
            duration_ms=45_000.0,  # a minute in the lane is no SLO breach
            code="OK",
            outcome="sports",
            model="minilm",
            model_version="2",
        )
        m.record(event)
        failed = {"service": "fusion", "stage": DURABLE_ANSWER_STAGE, "pipeline": "embed", "code": "INTERNAL"}
        m.record(pb.TelemetryEvent(**failed, request_id=mask("durable-2")))  # a failed answer is nothing to judge

        assert m.accuracy.feedback("embed", mask("durable-1"), "sports", None, 1) == "joined"
        assert m.accuracy.feedback("embed", mask("durable-2"), "sports", None, 1) == "unknown_request"
        assert "embed" not in m.slo.series
        assert all(load.items == 0 for load in m.capacity.loads(m.capacity.started_ms + 10_000))
    finally:
        REGISTRY.unregister(m.triton)
