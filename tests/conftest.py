"""Fixtures: real nats-server, real tritonserver, real service processes.

Where a Docker engine answers, NATS comes from testcontainers; here there is
none, so the same fixture starts the local ``nats-server`` binary.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from services.common.launch.mesh import Mesh, free_ports
from tests.support import NatsHandle, start_nats

# The monitor evaluates every second and keeps shorter windows, so its tests run in seconds.
MONITOR_TEST_ENV = {
    "LOOM_MONITOR_EVAL_INTERVAL_S": "1",
    "LOOM_MONITOR_DRIFT_REFERENCE": "500",
    "LOOM_MONITOR_DRIFT_WINDOW": "500",
    "LOOM_MONITOR_ACCURACY_WINDOW": "50",
}


@pytest.fixture(scope="session")
def mesh(request: pytest.FixtureRequest) -> Iterator[Mesh]:
    """The whole mesh on free ports, every process writing its spans to a file."""
    m = Mesh(ports=free_ports(), traces=True, env=MONITOR_TEST_ENV)
    try:
        m.start(timeout=240)
        yield m
    finally:
        failed = request.session.testsfailed > 0
        m.stop(remove_workdir=not failed)
        if failed:
            print(f"\nmesh logs kept in {m.workdir / 'logs'}")


@pytest.fixture
def nats_server() -> Iterator[NatsHandle]:
    """A fresh NATS server with JetStream for one test."""
    handle = start_nats()
    try:
        yield handle
    finally:
        handle.stop()
