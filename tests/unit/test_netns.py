"""Pure logic of the multi-host test: tools/netns.py (free /24, interface names, stale namespaces) and
tools/multihost_traffic.py's accounting."""

from __future__ import annotations

import ipaddress
from collections import Counter

import pytest

from tools import multihost_traffic as multihost
from tools import netns

pytestmark = pytest.mark.unit

ADDRS = [
    {"ifname": "lo", "addr_info": [{"family": "inet", "local": "127.0.0.1", "prefixlen": 8}]},
    {"ifname": "eth0", "addr_info": [{"family": "inet", "local": "10.213.7.20", "prefixlen": 24}]},
]
ROUTES = [
    {"dst": "default", "gateway": "192.0.2.1", "dev": "eth0"},
    {"dst": "10.213.0.0/22", "dev": "tun0"},  # covers 10.213.0-3
    {"dst": "10.213.9.9", "dev": "tun1"},  # a host route
]


def test_used_networks_reads_addresses_and_routes() -> None:
    used = netns.used_networks(ADDRS, ROUTES)
    assert ipaddress.IPv4Network("10.213.7.0/24") in used
    assert ipaddress.IPv4Network("10.213.0.0/22") in used
    assert ipaddress.IPv4Network("10.213.9.9/32") in used
    assert all(str(n) != "0.0.0.0/0" for n in used)  # the default route is not a network in use


def test_free_subnet_avoids_every_overlap() -> None:
    used = netns.used_networks(ADDRS, ROUTES)
    picks = {netns.free_subnet(used, pick=i) for i in range(300)}
    taken = {0, 1, 2, 3, 7, 9}
    assert {int(str(n).split(".")[2]) for n in picks}.isdisjoint(taken)
    assert all(n.prefixlen == 24 and str(n).startswith("10.213.") for n in picks)


def test_free_subnet_fails_when_all_are_taken() -> None:
    with pytest.raises(RuntimeError, match="no free"):
        netns.free_subnet([ipaddress.IPv4Network("10.213.0.0/16")])


def test_a_broken_overlap_check_would_be_caught() -> None:
    # The check can fail: the only free /24 is the one that comes back.
    used = [ipaddress.IPv4Network(f"10.213.{n}.0/24") for n in netns.CANDIDATES if n != 42]
    assert netns.free_subnet(used) == ipaddress.IPv4Network("10.213.42.0/24")


def test_link_names_fit_ifnamsiz() -> None:
    names = netns.link_names("a1b2c3", 3)
    assert len(set(names.values())) == len(names)
    assert max(len(n) for n in names.values()) <= netns.IFNAMSIZ
    with pytest.raises(ValueError, match="longer than 15"):
        netns.link_names("a" * 12, 3)


def test_stale_namespaces_are_those_of_dead_runs_only() -> None:
    names = ["loommh-100-abc123-h1", "loommh-100-abc123-hub", "loommh-200-def456-h2", "other-ns", "loommh-x-h1"]
    assert netns.stale(names, alive=[200]) == ["loommh-100-abc123-h1", "loommh-100-abc123-hub"]
    assert netns.stale(names, alive=[100, 200]) == []


def test_host_prefix_runs_in_its_namespace() -> None:
    host = netns.Host("h1", "loommh-1-ab-h1", "10.213.5.1", "lmab1", "lmab1p")
    assert host.prefix[-3:] == ["netns", "exec", "loommh-1-ab-h1"]


def _tally(accepted: dict[str, str], counts: dict[str, int]) -> tuple[multihost.Report, list[str]]:
    report = multihost.Report()
    lost = multihost.tally(report, accepted, Counter(counts))
    return report, lost


def test_tally_counts_every_accepted_answer_once() -> None:
    accepted = {"a": "h1", "b": "h2", "c": "h3"}
    report, lost = _tally(accepted, {"a|DONE": 1, "b|DONE": 1, "c|DONE": 1, "x|DONE": 1})
    assert (report.accepted, report.completed, report.failed, report.lost, report.duplicated) == (3, 3, 0, 0, 0)
    assert lost == []


def test_tally_finds_a_lost_and_a_doubled_answer() -> None:
    # A broken copy of a good run's answers: one dropped, one answered twice, one failed.
    accepted = {"a": "h1", "b": "h2", "c": "h3", "d": "h1"}
    report, lost = _tally(accepted, {"a|DONE": 2, "c|FAILED": 1, "d|DONE": 1})
    assert lost == ["b"]
    assert (report.lost, report.duplicated, report.failed, report.completed) == (1, 1, 1, 2)


def test_report_table_has_a_row_per_host_and_a_column_per_stage() -> None:
    report = multihost.Report()
    report.tables["t"] = {"h2": {"gateway": 5, "inference": 7}, "h1": {"fusion": 3}}
    lines = report.table("t").splitlines()
    assert lines[0].split() == ["host", *multihost.STAGES]
    assert lines[1].split() == ["h1", "0", "0", "0", "0", "3"]
    assert lines[2].split() == ["h2", "5", "0", "7", "0", "0"]
