"""Three network-namespace hosts, one cut off, killed and back: no accepted durable request lost or doubled.

Each host runs a NATS node (3-node cluster, R3 streams) and a replica of every stage service;
host 1 also Triton and the monitor (tools/multihost.py). Needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN)
for the namespaces; skips where they cannot be made.
"""

from __future__ import annotations

import os

import pytest

from tools import multihost, netns

pytestmark = pytest.mark.integration


def test_a_host_lost_and_back_loses_and_doubles_nothing() -> None:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if not os.path.exists(netns.IP):
        pytest.skip("iproute2's ip is not installed")
    try:
        report, left = multihost.run(batch=60, down_s=15.0, dead_s=15.0)
    except netns.NetnsUnavailable as exc:
        pytest.skip(str(exc))
    text = report.text()
    print("\n" + text)
    assert left == [], f"namespaces or links left behind: {left}"
    before = report.tables["before the cut"]
    for host in ("h1", "h2", "h3"):
        assert report.smoke[host] == "DONE", text  # Submit + GetResult through its own gateway
        assert before[host]["preprocess"] > 0 and before[host]["inference"] > 0, text  # work spread
        assert report.submits[host] > 0, text
    assert report.accepted_while_down > 0 and report.answered_while_down > 0, text  # hosts 1, 2 kept working
    assert report.smoke["h3 after rejoin"] == "DONE", text
    assert report.replicas and "NOT CURRENT" not in report.replicas, text  # every stream: 3 current replicas
    assert report.lost == 0 and report.duplicated == 0, text
    assert report.completed == report.accepted and report.failed == 0 and report.dead == 0 and report.refused == 0, text
    assert not [n for n in netns.namespaces() if n.startswith(f"{netns.PREFIX}-{os.getpid()}-")], "namespace left"
