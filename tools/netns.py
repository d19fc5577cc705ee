"""Hosts made of Linux network namespaces (iproute2, root): a private /24 on a bridge, links that can be cut.

Layout for ``Network(3)`` with run tag ``T``::

    root ns ── lmTr ══ lmTrp ─┐
                              ├─ bridge lmTb (in the hub namespace ``loommh-<pid>-T-hub``)
    loommh-<pid>-T-h1 ── lmT1 ══ lmT1p ─┤   10.213.N.1
    loommh-<pid>-T-h2 ── lmT2 ══ lmT2p ─┤   10.213.N.2
    loommh-<pid>-T-h3 ── lmT3 ══ lmT3p ─┘   10.213.N.3    (the root end is 10.213.N.254)

The hosts have no default route: their traffic cannot leave the bridge. Cutting a host sets its
bridge-side end down (its carrier drops: a silent partition, no resets). Namespace names carry the
creating PID so :func:`sweep` can remove what a killed run left behind without touching a live one's.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field

IP = shutil.which("ip") or "/usr/sbin/ip"
PREFIX = "loommh"
#: The /24s tried, 10.213.<n>.0/24: private, and unlikely to be in use on a CI machine.
CANDIDATES = tuple(range(1, 255))
IFNAMSIZ = 15
_NS_NAME = re.compile(rf"^{PREFIX}-(\d+)-([0-9a-f]+)-(h\d+|hub)$")


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, or no CAP_SYS_ADMIN / CAP_NET_ADMIN)."""


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([IP, *args], capture_output=True, text=True, check=False, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def used_networks(addresses: list[dict], routes: list[dict]) -> list[ipaddress.IPv4Network]:
    """The IPv4 networks in use, from ``ip -j -4 addr`` and ``ip -j -4 route show table all``."""
    nets: list[ipaddress.IPv4Network] = []
    for link in addresses:
        for a in link.get("addr_info", []):
            if a.get("family", "inet") == "inet" and "local" in a:
                nets.append(ipaddress.IPv4Network(f"{a['local']}/{a.get('prefixlen', 32)}", strict=False))
    for r in routes:
        dst = r.get("dst", "")
        if dst and dst != "default":
            nets.append(ipaddress.IPv4Network(dst if "/" in dst else f"{dst}/32", strict=False))
    return nets


def free_subnet(used: Iterable[ipaddress.IPv4Network], pick: int | None = None) -> ipaddress.IPv4Network:
    """A 10.213.<n>.0/24 that overlaps nothing in ``used`` (the ``pick``-th free one, random if None)."""
    taken = list(used)
    free = [n for n in CANDIDATES if not any(ipaddress.IPv4Network(f"10.213.{n}.0/24").overlaps(u) for u in taken)]
    if not free:
        raise RuntimeError("no free 10.213.<n>.0/24 network")
    index = secrets.randbelow(len(free)) if pick is None else pick % len(free)
    return ipaddress.IPv4Network(f"10.213.{free[index]}.0/24")


def link_names(tag: str, hosts: int) -> dict[str, str]:
    """Interface names of one run; each at most IFNAMSIZ (15) characters."""
    names = {"bridge": f"lm{tag}b", "root": f"lm{tag}r", "root_peer": f"lm{tag}rp"}
    for i in range(1, hosts + 1):
        names[f"h{i}"] = f"lm{tag}{i}"
        names[f"h{i}_peer"] = f"lm{tag}{i}p"
    too_long = [n for n in names.values() if len(n) > IFNAMSIZ]
    if too_long:
        raise ValueError(f"interface names longer than {IFNAMSIZ} characters: {too_long}")
    return names


def stale(namespaces: Iterable[str], alive: Iterable[int]) -> list[str]:
    """Our namespaces whose creating process is gone (not in ``alive``)."""
    live = set(alive)
    out = []
    for name in namespaces:
        m = _NS_NAME.match(name)
        if m and int(m.group(1)) not in live:
            out.append(name)
    return out


def namespaces() -> list[str]:
    done = run("-j", "netns", "list", check=False)
    if done.returncode != 0 or not done.stdout.strip():
        return []
    return [entry["name"] for entry in json.loads(done.stdout)]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep() -> list[str]:
    """Delete the namespaces of runs whose process died (killed before its own teardown)."""
    ours = [n for n in namespaces() if _NS_NAME.match(n)]
    pids = {int(m.group(1)) for n in ours if (m := _NS_NAME.match(n))}
    gone = stale(ours, [p for p in pids if _pid_alive(p)])
    for name in gone:
        run("netns", "del", name, check=False)
    return gone


@dataclass
class Host:
    name: str  # h1, h2, ...
    ns: str
    ip: str
    link: str  # its end, inside ns
    peer: str  # the bridge's end, in the hub

    @property
    def prefix(self) -> list[str]:
        """Run a command in this host: ``[*host.prefix, argv...]`` (``ip netns exec`` execs, the PID stays)."""
        return [IP, "netns", "exec", self.ns]


@dataclass
class Network:
    size: int = 3
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    subnet: ipaddress.IPv4Network | None = None
    hosts: list[Host] = field(default_factory=list)
    hub: str = ""
    root_ip: str = ""
    made: list[str] = field(default_factory=list)  # namespaces made, for teardown
    cut_hosts: set[str] = field(default_factory=set)

    def ns_name(self, host: str) -> str:
        return f"{PREFIX}-{os.getpid()}-{self.tag}-{host}"

    def create(self) -> Network:
        """Make the hub with its bridge, the hosts and their links; raises NetnsUnavailable without the rights."""
        names = link_names(self.tag, self.size)
        sweep()
        if self.subnet is None:
            addrs = json.loads(run("-j", "-4", "addr").stdout or "[]")
            routes = json.loads(run("-j", "-4", "route", "show", "table", "all").stdout or "[]")
            self.subnet = free_subnet(used_networks(addrs, routes))
        base = self.subnet.network_address
        self.hub = self.ns_name("hub")
        done = run("netns", "add", self.hub, check=False)
        if done.returncode != 0:
            if "permitted" in done.stderr or "denied" in done.stderr:
                raise NetnsUnavailable(f"cannot make a network namespace: {done.stderr.strip()}")
            raise RuntimeError(f"ip netns add failed: {done.stderr.strip()}")
        self.made.append(self.hub)
        br = names["bridge"]
        run("-n", self.hub, "link", "add", br, "type", "bridge")
        run("-n", self.hub, "link", "set", br, "up")
        # The root namespace's way in: the test (outside every host) reaches the gateways through it.
        self.root_ip = str(base + 254)
        self._veth(names["root"], names["root_peer"], None, br)
        run("addr", "add", f"{self.root_ip}/24", "dev", names["root"])
        run("link", "set", names["root"], "up")
        for i in range(1, self.size + 1):
            ns = self.ns_name(f"h{i}")
            run("netns", "add", ns)
            self.made.append(ns)
            host = Host(f"h{i}", ns, str(base + i), names[f"h{i}"], names[f"h{i}_peer"])
            self._veth(host.link, host.peer, ns, br)
            run("-n", ns, "link", "set", "lo", "up")
            run("-n", ns, "addr", "add", f"{host.ip}/24", "dev", host.link)
            run("-n", ns, "link", "set", host.link, "up")
            self.hosts.append(host)
        return self

    def _veth(self, end: str, peer: str, ns: str | None, bridge: str) -> None:
        """A veth pair: ``end`` in ``ns`` (root when None), ``peer`` on the hub's bridge."""
        run("link", "add", end, "type", "veth", "peer", "name", peer, "netns", self.hub)
        if ns is not None:
            run("link", "set", end, "netns", ns)
        run("-n", self.hub, "link", "set", peer, "master", bridge)
        run("-n", self.hub, "link", "set", peer, "up")

    def host(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    def cut(self, name: str) -> None:
        """The host's cable pulled: its bridge port goes down, nothing reaches it or leaves it."""
        run("-n", self.hub, "link", "set", self.host(name).peer, "down")
        self.cut_hosts.add(name)

    def restore(self, name: str) -> None:
        run("-n", self.hub, "link", "set", self.host(name).peer, "up")
        self.cut_hosts.discard(name)

    def pids(self) -> list[int]:
        """Processes still inside any of our namespaces."""
        out: list[int] = []
        for ns in self.made:
            done = run("netns", "pids", ns, check=False)
            out += [int(p) for p in done.stdout.split()]
        return out

    def teardown(self) -> list[str]:
        """Delete the root link and every namespace made (their links go with them); returns what is left."""
        with contextlib.suppress(Exception):
            run("link", "del", link_names(self.tag, self.size)["root"], check=False)
        for ns in reversed(self.made):
            run("netns", "del", ns, check=False)
        return self.leftovers()

    def leftovers(self) -> list[str]:
        left = [n for n in namespaces() if f"-{self.tag}-" in n]
        links = json.loads(run("-j", "link", "show", check=False).stdout or "[]")
        left += [entry["ifname"] for entry in links if entry.get("ifname", "").startswith(f"lm{self.tag}")]
        return left
