"""Chaos on the durable lane, small: `make chaos N=10000` is the full run (BENCHMARKS.md).

A 3-node NATS cluster with R3 streams, each node on deploy/nats/loom.conf (every
service logs in as itself), two replicas of every stage service, one Triton;
replicas are SIGKILLed while durable requests flow (a fifth of them multi-part
``content`` requests, joined by fusion) and one NATS node restarts. Every
accepted request is answered exactly once, and no node refused a permission.
"""

from __future__ import annotations

import pytest

from tools import chaos

pytestmark = pytest.mark.integration

SETTLE_S = 300


# Start-up (Triton, 10 replicas) and the last 120 s wait come on top of the settle budget.
@pytest.mark.timeout(SETTLE_S + 900)
def test_sigkills_and_a_nats_restart_lose_and_duplicate_nothing() -> None:
    # Kills come faster than the full run's 5 s, and the traffic waits for them: a third of the
    # requests go in before the first SIGKILL, a third after it, a third after the second one.
    report = chaos.run(600, every_s=2.5, concurrency=16, settle_s=SETTLE_S, min_kills=2, content=0.2)
    print("\n" + "\n".join(report.lines()))
    assert report.accepted == 600, report
    assert report.content == 120, report
    assert report.kills >= 2 and report.nats_restarts == 1, report
    assert report.violations == 0, report  # the lines are in the kept work folder's chaos.log
    assert report.lost == 0 and report.duplicated == 0, report
    assert report.completed == report.accepted and report.failed == 0 and report.dead == 0, report
