"""SIGTERM drains a fusion replica: the requests it holds are answered at once with what arrived.

A ``content`` request (text and image) is held at fusion with its image part
outstanding: the text part is answered from the inference cache, the image
part waits on a frozen Triton (SIGSTOP). A second fusion replica owns the same
partitions, so both hold the request; the second one is sent SIGTERM. The
caller must get a degraded answer naming the missing part long before its
deadline, and the replica must exit cleanly.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from typing import Any

import pytest

from services.common.launch.mesh import Mesh
from tests import media
from tests.support import eventually, metric, predict_http, predict_inputs

pytestmark = pytest.mark.integration

TEXT = "The match went to extra time and the home team scored in the last minute."
DEADLINE_MS = 20_000


def test_sigterm_answers_the_requests_a_fusion_replica_holds_with_what_arrived(mesh: Mesh) -> None:
    # The text part's answer goes into the inference cache, so later it needs no Triton.
    warm = media.text_image("WARM THE CACHE")
    eventually(lambda: predict_inputs(mesh.gateway_http, "content", {"text": TEXT, "image": warm})[0] == 200, 60)
    extra, ports = mesh.start_replica("fusion", "fusion-drain", overrides={"LOOM_DURABLE": "false"})
    url = f"http://127.0.0.1:{ports['http']}"
    answers: list[tuple[float, tuple[int, Any]]] = []
    fresh = media.text_image(f"NEW {uuid.uuid4().hex[:8].upper()}")  # never seen: OCR must run on Triton

    def call() -> None:
        got = predict_inputs(mesh.gateway_http, "content", {"text": TEXT, "image": fresh}, timeout_ms=DEADLINE_MS)
        answers.append((time.monotonic(), got))

    assert mesh.triton is not None and mesh.triton.pid is not None
    triton = mesh.triton.pid
    caller = threading.Thread(target=call)
    os.kill(triton, signal.SIGSTOP)
    try:
        caller.start()
        # The replica holds the request: its text part came, its image part cannot.
        eventually(lambda: metric(url, "loom_inflight", service="fusion") >= 1, timeout=15)
        assert answers == [], answers
        assert extra.proc is not None
        signalled = time.monotonic()
        extra.proc.send_signal(signal.SIGTERM)
        caller.join(DEADLINE_MS / 2000)  # half the deadline at most
        code = extra.proc.wait(30)
    finally:
        os.kill(triton, signal.SIGCONT)
        caller.join(DEADLINE_MS / 1000 + 10)
        extra.stop()
        mesh.services.pop("fusion-drain", None)
    assert answers, "no answer before half the deadline: the draining replica kept the request"
    answered_at, (status, body) = answers[0]
    assert status == 200, body
    assert body["degraded"] is True and body["missing"] == ["image"], body
    assert "text" in body["outputs"] and "image" not in body["outputs"]
    assert "shutting down" in body["notes"]["fusion/early"], body["notes"]
    assert answered_at - signalled < DEADLINE_MS / 2000
    assert code == 0, extra.log_tail()  # a clean exit, not a kill
    # Leave the mesh as found: Triton thawed, breakers closed, answers flowing.
    eventually(lambda: predict_http(mesh.gateway_http, "is the mesh back?")[0] == 200, timeout=60, interval=0.5)
    print(f"\nanswered {answered_at - signalled:.2f} s after SIGTERM (deadline {DEADLINE_MS / 1000:.0f} s)")
