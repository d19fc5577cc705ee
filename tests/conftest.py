"""Fixtures: real nats-server, real tritonserver, real service processes.

Where a Docker engine answers, NATS comes from testcontainers; here there is
none, so the same fixture starts the local ``nats-server`` binary.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from services.common.launch.mesh import Mesh, free_ports
from tests.support import TEST_API_KEY, NatsHandle, auth_env, start_nats, write_keys_file

# The monitor evaluates every second and keeps shorter windows, so its tests run in seconds.
MONITOR_TEST_ENV = {
    "LOOM_MONITOR_EVAL_INTERVAL_S": "1",
    "LOOM_MONITOR_DRIFT_REFERENCE": "500",
    "LOOM_MONITOR_DRIFT_WINDOW": "500",
    "LOOM_MONITOR_ACCURACY_WINDOW": "50",
}


@pytest.fixture(scope="session")
def mesh(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """The whole mesh on free ports, every process writing its spans to a file.

    Its gateway takes the tests' admin key, the predict and viewer keys of a keys file, and HS256
    JWTs signed with the tests' secret (tests/support.py).
    """
    keys = write_keys_file(tmp_path_factory.mktemp("auth") / "keys.json")
    m = Mesh(ports=free_ports(), traces=True, env={**MONITOR_TEST_ENV, **auth_env(keys)}, api_key=TEST_API_KEY)
    violations: list[str] = []
    try:
        m.start(timeout=240)
        yield m
        # Each service logs in as itself (deploy/nats/loom.conf): whatever the server refused it is a
        # permission the configuration lacks, or a service doing what it should not.
        violations = m.permission_violations()
    finally:
        failed = request.session.testsfailed > 0 or bool(violations)
        m.stop(remove_workdir=not failed)
        if failed:
            print(f"\nmesh logs kept in {m.workdir / 'logs'}")
    if violations:
        pytest.fail("nats-server refused these (deploy/nats/loom.conf):\n" + "\n".join(violations[:30]))


@pytest.fixture
def nats_server() -> Iterator[NatsHandle]:
    """A fresh NATS server with JetStream for one test: ``url`` logs in as admin (deploy/nats/loom.conf)."""
    handle = start_nats()
    try:
        yield handle
        violations = handle.permission_violations()
    finally:
        handle.stop()
    assert not violations, "nats-server refused these:\n" + "\n".join(violations[:30])


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The fuzz counts (tests/fuzzlog.py, .artifacts/fuzz/*.json): one line per recorded fuzz test."""
    from tests.fuzzlog import summary_lines

    lines = summary_lines()
    if lines:
        terminalreporter.section("fuzz counts (.artifacts/fuzz)")
        for line in lines:
            terminalreporter.write_line(line)
