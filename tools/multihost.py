"""Three hosts (network namespaces), one lost and back: ``python -m tools.multihost`` prints the report.

Each host (tools/netns.py) runs a node of a 3-node NATS cluster (JetStream; every Loom stream and
bucket R3, Loom's per-service logins from deploy/nats/loom.conf) and one replica of gateway,
preprocess, inference, postprocess and fusion; host 1 also runs Triton and the monitor. The
scenario, durable ``embed`` requests throughout (gRPC Submit with an idempotency key, retried on
another gateway):

1. all up: one request through each host's gateway (Submit + GetResult there), then a batch
   spread over the three gateways; every service's /metrics is read (the "before the cut" table);
2. host 3's link goes down while traffic flows through hosts 1 and 2; later all of host 3's
   processes (its NATS node too) are SIGKILLed; answers keep coming;
3. the link comes back, host 3's NATS node and services start again, JetStream reports every
   stream's three replicas current, and a request through host 3's gateway is answered;
4. every answer in LOOM_RES is counted (as tools/chaos.py does): no accepted request lost, none twice.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import shutil
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import nats
from prometheus_client.parser import text_string_to_metric_families

from services.common import durable
from services.common.auth import generate_api_key
from services.common.launch.mesh import DEFAULT_PORTS, Mesh, grpc_serving
from services.common.launch.nats_server import LOOM_CONF, NatsServer, login_env, new_passwords
from services.common.launch.procs import ManagedProcess, ProcessExited, wait_until
from services.common.triton_server import TritonServer, repository_models
from tools.chaos import provision
from tools.durable_load import count_results, count_stream, wait_answers
from tools.multihost_traffic import STAGES, Report, Traffic, kv_states, tally
from tools.netns import Host, Network

#: The loom_durable_messages_total outcome that means "this replica did the work".
DONE_OUTCOME = {"gateway": "accepted", "fusion": "answered"}
RESTARTS = 3
PORTS = dict(DEFAULT_PORTS)  # every host has its own port space: the defaults everywhere


class NsTriton(TritonServer):
    """Triton inside a host: its command behind ``ip netns exec``."""

    def __init__(self, prefix: list[str], *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.prefix = prefix

    def command(self, backend_directory: Path | None = None) -> list[str]:
        return [*self.prefix, *super().command(backend_directory)]


@dataclass
class Site:
    """One host: its NATS node and its Loom processes (a Mesh per host gives each service its wiring)."""

    host: Host
    mesh: Mesh
    nats: NatsServer
    procs: dict[str, ManagedProcess] = field(default_factory=dict)

    def target(self, service: str = "gateway") -> str:
        return f"{self.host.ip}:{PORTS[f'{service}_grpc']}"


class MultiHost:
    def __init__(self, workdir: Path, *, nats_urls: str = "all") -> None:
        self.workdir = workdir
        self.nats_urls = nats_urls
        self.net = Network(3)
        self.passwords = new_passwords()
        self.api_key = generate_api_key()
        self.sites: list[Site] = []
        self.triton: NsTriton | None = None
        self.restarts: list[str] = []  # services that exited while starting, and why

    # -- set-up -----------------------------------------------------------------------------------
    def create(self) -> None:
        self.net.create()
        hosts = self.net.hosts
        routes = ", ".join(f"nats://{h.ip}:6222" for h in hosts)
        shutil.copy(LOOM_CONF, self.workdir / "loom.conf")
        for i, host in enumerate(hosts):
            conf = self.workdir / f"n{i + 1}.conf"
            conf.write_text(
                f"server_name: n{i + 1}\ncluster {{\n  name: loom\n  listen: {host.ip}:6222\n  routes: [{routes}]\n}}\n"
                "include ./loom.conf\n"
            )
            node = NatsServer(
                PORTS["nats"],
                monitor_port=PORTS["nats_monitor"],
                host=host.ip,
                store_dir=self.workdir / host.name / "jetstream",
                log_path=self.workdir / host.name / "logs" / "nats-server.log",
                config=conf,
                passwords=self.passwords,
            )
            node.process.argv = [*host.prefix, *node.process.argv]  # the node runs inside its host
            mesh = Mesh(
                workdir=self.workdir / host.name, ports=dict(PORTS), api_key=self.api_key, nats_passwords=self.passwords
            )
            mesh.env.update(
                {
                    "LOOM_JS_REPLICAS": "3",
                    "LOOM_DURABLE_ACK_WAIT_S": "6",  # a lost replica's messages come back after 6 s
                    "LOOM_LOG_LEVEL": "WARNING",
                    "LOOM_DRAIN_GRACE_S": "3",
                }
            )
            self.sites.append(Site(host, mesh, node))

    def admin_urls(self, hosts: list[str] | None = None) -> str:
        return ",".join(
            login_env(s.host.ip, PORTS["nats"], "admin", self.passwords)["LOOM_NATS_URL"]
            for s in self.sites
            if hosts is None or s.host.name in hosts
        )

    def service_urls(self, site: Site, user: str) -> str:
        # "local": a host's services use their own node only. With all three, nats-py picks one at random
        # and a client left on a silently cut node moves after LOOM_NATS_PING_INTERVAL_S x _MAX_OUTSTANDING_PINGS.
        sites = [site] if self.nats_urls == "local" else [site] + [s for s in self.sites if s is not site]
        return ",".join(login_env(s.host.ip, PORTS["nats"], user, self.passwords)["LOOM_NATS_URL"] for s in sites)

    def start_nats(self, sites: list[Site]) -> None:
        for site in sites:
            site.nats.process.start()
        for site in sites:
            site.nats.wait_ready(60)

    def start_triton(self) -> None:
        h1 = self.sites[0]
        self.triton = NsTriton(
            h1.host.prefix,
            h1.mesh.model_repository,
            http_port=PORTS["triton_http"],
            grpc_port=PORTS["triton_grpc"],
            metrics_port=PORTS["triton_metrics"],
            host=h1.host.ip,
            workdir=h1.mesh.workdir / "triton",
            log_file=h1.mesh.workdir / "logs" / "tritonserver.log",
            model_control_mode="explicit",
            load_models=repository_models(h1.mesh.model_repository),
        )
        self.triton.start()

    def services(self, site: Site) -> list[str]:
        return [*STAGES, "monitor"] if site is self.sites[0] else list(STAGES)

    def wait_caught_up(self, site: Site, timeout: float) -> None:
        """nats-server's full /healthz: JetStream has a meta leader and this node's streams are current."""
        url = f"http://{site.host.ip}:{PORTS['nats_monitor']}/healthz"

        def healthy() -> bool:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return bool(resp.status == 200)

        wait_until(healthy, timeout, interval=0.5, what=f"NATS node on {site.host.name} to catch up")

    def start_services(self, site: Site) -> None:
        h1 = self.sites[0].host.ip
        for name in self.services(site):
            replica = f"{name}-{site.host.name}"
            overrides = {
                "LOOM_NATS_URL": self.service_urls(site, name),
                "LOOM_BIND_HOST": "0.0.0.0",
                "LOOM_OTLP_ENDPOINT": "",
                "LOOM_INFERENCE_TRITON_URL": f"{h1}:{PORTS['triton_grpc']}",
                "LOOM_MONITOR_TRITON_URL": f"{h1}:{PORTS['triton_http']}",
                "LOOM_MONITOR_TRITON_METRICS_URL": f"http://{h1}:{PORTS['triton_metrics']}/metrics",
            }
            if name == "fusion":  # its core-NATS lane's share; the durable lane needs none
                overrides |= {
                    "LOOM_FUSION_REPLICA_INDEX": str(self.sites.index(site)),
                    "LOOM_FUSION_REPLICA_COUNT": "3",
                }
            proc = ManagedProcess(
                replica,
                [*site.host.prefix, sys.executable, "-m", f"services.{name}"],
                env=site.mesh.service_env(name, replica, overrides),
                log_path=site.mesh.workdir / "logs" / f"{replica}.log",
                cwd=Path(__file__).resolve().parents[1],
            ).start()
            site.procs[name] = site.mesh.services[replica] = proc

    def wait_serving(self, site: Site, timeout: float) -> None:
        """Wait until each service serves; one that exits while starting is started again (a pod's
        restart policy), at most ``RESTARTS`` times, each noted in ``self.restarts``."""
        deadline = time.monotonic() + timeout
        for name, proc in site.procs.items():
            for _ in range(RESTARTS + 1):

                def ok(proc: ManagedProcess = proc, target: str = site.target(name)) -> bool:
                    if not proc.running():
                        raise ProcessExited(f"{proc.name} exited:\n{proc.log_tail(3)}")
                    return grpc_serving(target)

                try:
                    wait_until(ok, max(1.0, deadline - time.monotonic()), interval=0.5, what=f"{proc.name} to serve")
                    break
                except ProcessExited as exc:
                    self.restarts.append(str(exc).splitlines()[-1][-160:])
                    time.sleep(2.0)
                    proc.start()
                except TimeoutError as exc:
                    raise TimeoutError(f"{exc}\n{proc.log_tail()}") from None
            else:
                raise ProcessExited(f"{proc.name} kept exiting:\n{proc.log_tail()}")

    def kill(self, site: Site) -> None:
        """SIGKILL every process of the host, as a power cut would."""
        for proc in site.procs.values():
            proc.kill()
        site.nats.process.kill()

    def stop(self) -> list[str]:
        """Stop everything started here (by PID), then delete the namespaces; returns what is left of them."""
        procs = [p for s in self.sites for p in [*s.procs.values(), s.nats.process]]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda p: p.stop(timeout=5), procs))
        if self.triton is not None:
            self.triton.stop()
        return self.net.teardown()

    # -- observations -----------------------------------------------------------------------------
    def metrics(self, sites: list[Site]) -> dict[str, dict[str, int]]:
        """Durable-lane messages each replica handled (its own counters, since it started)."""
        table: dict[str, dict[str, int]] = {}
        for site in sites:
            row = table.setdefault(site.host.name, {})
            for name in STAGES:
                url = f"http://{site.host.ip}:{PORTS[f'{name}_http']}/metrics"
                req = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.api_key}"})
                with urllib.request.urlopen(req, timeout=5) as resp:
                    text = resp.read().decode()
                want = DONE_OUTCOME.get(name, "forwarded")
                row[name] = int(
                    sum(
                        s.value
                        for fam in text_string_to_metric_families(text)
                        for s in fam.samples
                        if s.name == "loom_durable_messages_total" and s.labels.get("outcome") == want
                    )
                )
        return table

    async def replicas_current(self, timeout: float) -> str:
        """Wait until every stream has a leader and two current, online followers; describe the state."""
        nc = await nats.connect(self.admin_urls().split(","))
        try:
            js = nc.jetstream()
            deadline = time.monotonic() + timeout
            while True:
                lagging = []
                infos = await js.streams_info()
                for info in infos:
                    peers = info.cluster.replicas if info.cluster and info.cluster.replicas else []
                    good = [p for p in peers if p.current and not p.offline]
                    if not (info.cluster and info.cluster.leader) or len(good) < 2:
                        lagging.append(
                            f"{info.config.name}: leader {info.cluster and info.cluster.leader}, "
                            f"current {[p.name for p in good]}"
                        )
                if not lagging:
                    return f"{len(infos)} streams, each with a leader and 2 current replicas"
                if time.monotonic() > deadline:
                    return "NOT CURRENT: " + "; ".join(lagging)
                await asyncio.sleep(1.0)
        finally:
            await nc.close()


def run(
    *,
    batch: int = 60,
    down_s: float = 15.0,
    dead_s: float = 15.0,
    after_s: float = 10.0,
    nats_urls: str = "all",
    keep: bool = False,
) -> tuple[Report, list[str]]:
    """The whole scenario; returns the report and whatever of the namespaces teardown could not remove."""
    workdir = Path(tempfile.mkdtemp(prefix="loom-multihost-"))
    report, accepted = Report(), dict[str, str]()
    mh = MultiHost(workdir, nats_urls=nats_urls)
    left: list[str] = []
    traffic: Traffic | None = None
    ok = False
    t0 = time.monotonic()
    try:
        mh.create()
        h1, h2, h3 = mh.sites
        mh.start_nats(mh.sites)
        asyncio.run(provision(mh.admin_urls(), replicas=3))
        for site in mh.sites:
            mh.wait_caught_up(site, 60)
        mh.start_triton()
        for site in mh.sites:
            mh.start_services(site)
        assert mh.triton is not None
        mh.triton.wait_ready(240)
        for site in mh.sites:
            mh.wait_serving(site, 240)
        report.timings["start"] = time.monotonic() - t0
        traffic = Traffic(
            {s.host.name: s.target() for s in mh.sites}, mh.api_key, report, accepted, f"mh{int(time.time())}"
        )
        # 1. all up: one answer through each gateway, then a batch over all three.
        for site in mh.sites:
            report.smoke[site.host.name] = traffic.through(site.host.name, f"smoke-{site.host.name}")
        traffic.start()
        while traffic.count < batch:
            time.sleep(0.2)
        wait_answers(mh.admin_urls(), len(accepted), 90)
        report.tables["before the cut"] = mh.metrics(mh.sites)
        report.timings["all up"] = time.monotonic() - t0
        # 2. host 3 cut off, then killed; traffic only through hosts 1 and 2.
        traffic.hosts = [h1.host.name, h2.host.name]
        answers_at_cut, accepted_at_cut = count_stream(mh.admin_urls(), durable.RES_STREAM), len(accepted)
        mh.net.cut(h3.host.name)
        traffic.phase = "h3 cut off"
        up_urls = mh.admin_urls([h1.host.name, h2.host.name])
        time.sleep(down_s)
        mh.kill(h3)
        traffic.phase = "h3 killed"
        time.sleep(dead_s)
        report.answered_while_down = count_stream(up_urls, durable.RES_STREAM) - answers_at_cut
        report.accepted_while_down = len(accepted) - accepted_at_cut
        report.timings["host 3 away"] = down_s + dead_s
        # 3. back: link up, NATS node and services restarted (same JetStream store), then through its gateway.
        mh.net.restore(h3.host.name)
        traffic.phase = "h3 back"
        h3.procs.clear()
        mh.start_nats([h3])
        mh.wait_caught_up(h3, 120)  # services started sooner fail on "JetStream system temporarily unavailable"
        mh.start_services(h3)
        mh.wait_serving(h3, 180)
        report.replicas = asyncio.run(mh.replicas_current(90))
        traffic.hosts = [s.host.name for s in mh.sites]
        report.smoke["h3 after rejoin"] = traffic.through(h3.host.name, "rejoin")
        report.timings["rejoin"] = time.monotonic() - t0
        time.sleep(after_s)  # traffic through all three again: host 3 takes its share
        traffic.stop()
        # 4. every accepted request answered exactly once.
        wait_answers(mh.admin_urls(), len(accepted), 180)
        report.tables["at the end; h3 counts since its restart"] = mh.metrics(mh.sites)
        counts = asyncio.run(count_results(mh.admin_urls()))
        lost = tally(report, accepted, counts)
        if lost:  # where they went in: which gateway took them, and what the results bucket says
            kv = asyncio.run(kv_states(mh.admin_urls(), lost[:20]))
            report.lost_detail = [f"{rid} via {accepted[rid]}: loom_results {kv.get(rid, '?')}" for rid in lost[:20]]
        report.dead = count_stream(mh.admin_urls(), durable.DLQ_STREAM)
        report.timings["total"] = time.monotonic() - t0
        report.restarts = mh.restarts
        ok = report.lost == 0 and report.duplicated == 0
        return report, left
    finally:
        if traffic is not None:
            traffic.halt.set()
        left += mh.stop()  # the list returned above: filled in here
        if ok and not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"multihost work folder kept: {workdir}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=60, help="requests sent with all hosts up")
    parser.add_argument("--down", type=float, default=15.0, help="seconds host 3 is cut off before it is killed")
    parser.add_argument("--dead", type=float, default=15.0, help="seconds host 3 stays dead before it comes back")
    parser.add_argument("--after", type=float, default=10.0, help="seconds of traffic once host 3 is back")
    parser.add_argument("--nats-urls", choices=("local", "all"), default="all", help="NATS nodes a service knows")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, stores)")
    args = parser.parse_args(argv)
    report, left = run(
        batch=args.batch,
        down_s=args.down,
        dead_s=args.dead,
        after_s=args.after,
        nats_urls=args.nats_urls,
        keep=args.keep,
    )
    print(report.text())
    if left:
        print(f"left behind: {left}")
    return 0 if report.lost == 0 and report.duplicated == 0 and not left else 1


if __name__ == "__main__":
    sys.exit(main())
