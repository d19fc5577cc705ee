"""Chaos run of the durable lane (``make chaos N=...``): nothing accepted is lost or answered twice.

A 3-node NATS cluster (JetStream, every Loom stream and bucket R3) on
loopback ports, each node running deploy/nats/loom.conf's users and
permissions (every service logs in as itself, fresh passwords), one Triton,
and two replicas of every stage service. A client submits N durable requests
through both gateways, each with its own idempotency key, retrying a failed
Submit on the other gateway: most are one-part ``embed`` requests, a share
(``--content``) multi-part ``content`` requests (text + image, every other one
with audio too), whose parts meet in fusion's durable join. While the
requests flow, one service replica is SIGKILLed (and started again) every few
seconds, and one NATS node is restarted once. At the end every result on
``loom.res.>`` is counted:

    accepted   Submit returned OK (the request is stored R3)
    content    accepted multi-part content requests among them
    completed  accepted requests with a DONE answer
    failed     accepted requests answered with an error
    dead       messages in the dead-letter stream
    lost       accepted requests with no answer at all
    duplicated answers beyond the first for one request
    violations nats-server log lines refusing a publish or subscription (a permission
               loom.conf lacks on some path; the run fails on any)

Only loopback addresses are used; every process started here is stopped here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import nats

from services.common import durable
from services.common.auth import generate_api_key
from services.common.launch.mesh import Mesh, free_ports
from services.common.launch.nats_server import LOOM_CONF, NatsServer
from services.common.launch.procs import ManagedProcess, free_port
from services.common.pb.loom.v1 import gateway_pb2_grpc
from services.common.provision import plan
from services.common.provision import provision as provision_plan
from services.common.settings import CommonSettings
from tools.durable_load import (
    Media,
    account,
    content_request,
    count_results,
    stream_count,
    submit_request,
    wait_answers,
)
from tools.sections import put

STAGES = ("preprocess", "inference", "postprocess", "fusion", "gateway")


@dataclass
class Report:
    accepted: int = 0
    content: int = 0
    completed: int = 0
    failed: int = 0
    dead: int = 0
    lost: int = 0
    duplicated: int = 0
    refused: int = 0
    kills: int = 0
    nats_restarts: int = 0
    violations: int = 0
    seconds: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)

    def lines(self) -> list[str]:
        return [
            f"accepted {self.accepted}",
            f"content {self.content}",
            f"completed {self.completed}",
            f"failed {self.failed}",
            f"dead {self.dead}",
            f"lost {self.lost}",
            f"duplicated {self.duplicated}",
            f"refused {self.refused}",
            f"kills {self.kills}",
            f"nats_restarts {self.nats_restarts}",
            f"violations {self.violations}",
            f"seconds {self.seconds:.1f}",
        ]


class Cluster:
    """Three nats-server nodes routed to each other, JetStream on each.

    With ``passwords`` (user -> password) every node takes deploy/nats/loom.conf's users and
    permissions, as the session mesh's single server does: a permission missing on a fail-over
    path (a consumer re-created, a KV read after a leader change) shows as a violation in a log.
    """

    def __init__(self, workdir: Path, size: int = 3, passwords: dict[str, str] | None = None) -> None:
        self.nodes: list[NatsServer] = []
        self.passwords = dict(passwords or {})
        cluster_ports = [free_port() for _ in range(size)]
        routes = ", ".join(f"nats://127.0.0.1:{p}" for p in cluster_ports)
        if self.passwords:  # nats-server resolves an include beside the including file
            shutil.copyfile(LOOM_CONF, workdir / "loom.conf")
        for i, cport in enumerate(cluster_ports):
            conf = workdir / f"n{i}.conf"
            conf.write_text(
                f"server_name: n{i}\ncluster {{\n  name: loom\n  listen: 127.0.0.1:{cport}\n  routes: [{routes}]\n}}\n"
                + ("include ./loom.conf\n" if self.passwords else "")
            )
            self.nodes.append(
                NatsServer(
                    store_dir=workdir / f"n{i}-store",
                    log_path=workdir / "logs" / f"nats-n{i}.log",
                    config=conf,
                    passwords=self.passwords or None,
                )
            )

    @property
    def urls(self) -> str:
        """The nodes' addresses, no credentials: services log in with LOOM_NATS_USER and LOOM_NATS_PASSWORD."""
        return ",".join(n.url for n in self.nodes)

    @property
    def admin_urls(self) -> str:
        """The nodes' addresses logging in as admin (provisioning, counting answers)."""
        return ",".join(n.url_for("admin") for n in self.nodes)

    def permission_violations(self) -> list[str]:
        """Every node's log lines about refused publishes and subscriptions."""
        return [f"{n.log_path.name}: {line}" for n in self.nodes for line in n.permission_violations()]

    def start(self) -> None:
        for node in self.nodes:
            node.process.start()
        for node in self.nodes:
            node.wait_ready(60)

    def restart(self, index: int, down_s: float) -> None:
        node = self.nodes[index]
        node.process.stop(timeout=10)
        time.sleep(down_s)
        node.process.start()
        node.wait_ready(60)

    def stop(self) -> None:
        for node in self.nodes:
            node.process.stop(timeout=10)


async def provision(urls: str, replicas: int, timeout: float = 90.0) -> None:
    """Make every stream and bucket R3 before a service starts (a fresh cluster elects its leaders first)."""
    nc = await nats.connect(urls.split(","))
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + timeout
        while True:
            try:
                await provision_plan(js, plan(CommonSettings(js_replicas=replicas)))
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1.0)
    finally:
        await nc.close()


async def submit_all(
    targets: list[str],
    key: str,
    n: int,
    run: str,
    concurrency: int,
    report: Report,
    min_kills: int = 0,
    content: float = 0.0,
) -> dict[str, str]:
    """Submit ``n`` requests, each retried (same idempotency key) until a gateway accepts it.

    With ``min_kills``, the traffic is cut into ``min_kills + 1`` slices and each slice waits for
    one more SIGKILL, so that however fast this machine is, that many kills land among the requests.
    A ``content`` share of them (spread evenly) are multi-part content requests.
    """
    metadata = (("authorization", f"Bearer {key}"),)
    channels = [grpc.aio.insecure_channel(t) for t in targets]
    stubs = [gateway_pb2_grpc.GatewayStub(c) for c in channels]
    accepted: dict[str, str] = {}
    limit = asyncio.Semaphore(concurrency)
    rng = random.Random(7)
    media = Media.make() if content > 0 else None
    multi = {i for i in range(n) if int((i + 1) * content) > int(i * content)}

    async def one(i: int) -> None:
        kills_first = i * (min_kills + 1) // n
        waited = 0.0
        while report.kills < kills_first and waited < 600.0:  # bounded: a kill comes every few seconds
            await asyncio.sleep(0.05)
            waited += 0.05
        many = media is not None and i in multi
        if many:
            assert media is not None
            sub = content_request(rng, f"{run}-{i}", media, audio=i % 2 == 0)
        else:
            sub = submit_request(rng, f"{run}-{i}")
        async with limit:
            for attempt in range(40):
                stub = stubs[(i + attempt) % len(stubs)]
                try:
                    reply = await stub.Submit(sub, timeout=10, metadata=metadata)
                except grpc.aio.AioRpcError as exc:
                    report.errors[exc.code().name] += 1
                    await asyncio.sleep(min(2.0, 0.1 * 2**attempt) * random.random())
                    continue
                accepted[reply.request_id] = sub.idempotency_key
                report.content += many
                return
            report.refused += 1

    await asyncio.gather(*(one(i) for i in range(n)))
    for channel in channels:
        await channel.close()
    return accepted


class Chaos(threading.Thread):
    """SIGKILL one random replica every ``every_s`` and start it again; restart one NATS node once."""

    def __init__(self, replicas: list[ManagedProcess], cluster: Cluster, every_s: float, report: Report) -> None:
        super().__init__(daemon=True)
        self.replicas = replicas
        self.cluster = cluster
        self.every_s = every_s
        self.report = report
        self.halt = threading.Event()
        self.log: list[str] = []

    def run(self) -> None:
        rng = random.Random(11)
        tick = 0
        while not self.halt.wait(self.every_s):
            tick += 1
            victim = rng.choice(self.replicas)
            victim.kill()
            self.report.kills += 1
            self.log.append(f"{time.strftime('%H:%M:%S')} SIGKILL {victim.name}")
            victim.start()
            if tick == 1 and self.report.nats_restarts == 0:  # early, so even a short run has it
                self.log.append(f"{time.strftime('%H:%M:%S')} restart NATS node n1")
                self.cluster.restart(1, down_s=3.0)
                self.report.nats_restarts += 1


def run(
    n: int,
    *,
    every_s: float = 5.0,
    concurrency: int = 32,
    settle_s: float = 600.0,
    keep: bool = False,
    min_kills: int = 0,
    content: float = 0.2,
) -> Report:
    workdir = Path(tempfile.mkdtemp(prefix="loom-chaos-"))
    (workdir / "logs").mkdir()
    report = Report()
    api_key = generate_api_key()
    mesh = Mesh(workdir=workdir, ports=free_ports(), api_key=api_key)
    # Every node runs loom.conf with the mesh's passwords: each service logs in as itself.
    cluster = Cluster(workdir, passwords=mesh.nats_passwords)
    admin = cluster.admin_urls
    env = {
        "LOOM_JS_REPLICAS": "3",
        "LOOM_DURABLE_ACK_WAIT_S": "6",  # a killed replica's messages come back after 6 s
        "LOOM_LOG_LEVEL": "WARNING",
    }
    chaos: Chaos | None = None
    started = time.monotonic()
    ok = False
    try:
        cluster.start()
        asyncio.run(provision(admin, replicas=3))
        mesh.env.update(env)
        replicas: list[ManagedProcess] = []
        gateways: list[str] = []
        mesh.start_triton(180)
        for stage in STAGES:
            for i in range(2):
                overrides = {"LOOM_NATS_URL": cluster.urls, "LOOM_OTLP_ENDPOINT": ""}
                if stage == "fusion":
                    overrides |= {"LOOM_FUSION_REPLICA_INDEX": str(i), "LOOM_FUSION_REPLICA_COUNT": "2"}
                proc, ports = mesh.start_replica(stage, f"{stage}-{i}", timeout=180, overrides=overrides)
                replicas.append(proc)
                if stage == "gateway":
                    gateways.append(f"127.0.0.1:{ports['grpc']}")
        chaos = Chaos(replicas, cluster, every_s, report)
        chaos.start()
        began = time.monotonic()
        run_id = f"chaos{int(began)}"
        accepted = asyncio.run(submit_all(gateways, api_key, n, run_id, concurrency, report, min_kills, content))
        report.accepted = len(accepted)
        wait_answers(admin, report.accepted, settle_s)
        chaos.halt.set()
        chaos.join(timeout=90)
        # The faults have stopped: what is still unanswered now gets a last while to finish.
        wait_answers(admin, report.accepted, 120.0)
        report.seconds = time.monotonic() - began
        tally = account(accepted, asyncio.run(count_results(admin)))
        report.completed, report.failed, report.duplicated = tally.completed, tally.failed, tally.duplicated
        report.lost = len(tally.lost)
        report.dead = asyncio.run(stream_count(admin, durable.DLQ_STREAM))
        violations = cluster.permission_violations()
        report.violations = len(violations)
        ok = report.lost == 0 and report.duplicated == 0 and not violations
        (workdir / "chaos.log").write_text("\n".join(chaos.log + violations) + "\n")
        for line in violations[:20]:
            print(f"permission violation: {line}", file=sys.stderr)
        return report
    finally:
        if chaos is not None:
            chaos.halt.set()
        mesh.stop(remove_workdir=False)
        cluster.stop()
        if ok and not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"chaos work folder kept: {workdir}", file=sys.stderr)
        _ = started


def commit() -> str:
    """The checkout's commit (``git rev-parse --short HEAD``), ``+dirty`` with uncommitted changes."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def markdown(report: Report, n: int, every_s: float, content: float = 0.2) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = "\n".join(f"| {line.split()[0]} | {line.split()[1]} |" for line in report.lines())
    retried = ", ".join(f"{k} {v}" for k, v in sorted(report.errors.items())) or "none"
    return f"""## Chaos: the durable lane under SIGKILLs (`make chaos N={n}`)

Date: {when}. Commit: `{commit()}`. Produced by `python -m tools.chaos -n {n} --record BENCHMARKS.md`; one run
on this machine.

Set-up: a 3-node NATS cluster on loopback ports (JetStream; every Loom stream and bucket R3; each node runs
`deploy/nats/loom.conf`, so every service logs in as itself with only its own permissions), one Triton, two
replicas of each of gateway, preprocess, inference, postprocess and fusion. A client submits {n} durable
requests through both gateways (32 Submits in flight, each with its own idempotency key; a failed Submit is
retried on the other gateway with the same key): {content:.0%} of them multi-part `content` requests (text +
image, every other one with audio too, joined by fusion), the rest one-part `embed` requests. Every
{every_s:g} s one random service replica is SIGKILLed and started again; once, a NATS node is stopped for 3 s
and restarted. At the end every answer in the `LOOM_RES` stream is counted.

| | |
|---|---|
{rows}

Submit errors the client retried (gateways being killed): {retried}. `lost` = accepted requests without an
answer; `duplicated` = answers beyond the first for one request; `dead` = messages in `LOOM_DLQ`;
`violations` = publishes or subscriptions a NATS node refused (the run fails on any).
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=10_000, help="durable requests to submit")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between SIGKILLs")
    parser.add_argument("--concurrency", type=int, default=32, help="Submits in flight")
    parser.add_argument("--content", type=float, default=0.2, help="share of multi-part content requests")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, stores)")
    parser.add_argument("--record", type=Path, help="write the report as a section of this file (BENCHMARKS.md)")
    args = parser.parse_args(argv)
    report = run(args.n, every_s=args.every, concurrency=args.concurrency, keep=args.keep, content=args.content)
    if args.record:
        put(args.record, "chaos", markdown(report, args.n, args.every, args.content))
    if args.json:
        print(json.dumps({k: v for k, v in vars(report).items() if k != "errors"} | {"errors": dict(report.errors)}))
    else:
        print("\n".join(report.lines()))
        if report.errors:
            print("submit errors retried: " + ", ".join(f"{k} {v}" for k, v in sorted(report.errors.items())))
    return 0 if report.lost == 0 and report.duplicated == 0 and report.violations == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
