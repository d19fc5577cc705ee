"""The multi-host scenario's client side: durable Submits over the hosts' gateways, and the accounting.

Used by tools/multihost.py; counted as tools/chaos.py counts (every answer in LOOM_RES).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import threading
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import nats

from services.common import durable
from services.common.pb.loom.v1 import gateway_pb2, gateway_pb2_grpc
from services.monitor.capacity import STAGE_SERVICES
from tools.durable_load import account, submit_request

STAGES = STAGE_SERVICES
T = TypeVar("T")


@dataclass
class Report:
    accepted: int = 0
    completed: int = 0
    failed: int = 0
    lost: int = 0
    duplicated: int = 0
    dead: int = 0
    refused: int = 0
    answered_while_down: int = 0
    accepted_while_down: int = 0
    submits: Counter[str] = field(default_factory=Counter)  # Submit OK, by the host whose gateway took it
    smoke: dict[str, str] = field(default_factory=dict)  # host -> state answered through its own gateway
    tables: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)  # phase -> host -> service -> n
    replicas: str = ""
    errors: Counter[str] = field(default_factory=Counter)
    timings: dict[str, float] = field(default_factory=dict)
    restarts: list[str] = field(default_factory=list)
    lost_detail: list[str] = field(default_factory=list)

    def table(self, phase: str) -> str:
        rows = self.tables.get(phase, {})
        head = f"{'host':<5}" + "".join(f"{s:>12}" for s in STAGES)
        lines = [head] + [f"{h:<5}" + "".join(f"{rows[h].get(s, 0):>12}" for s in STAGES) for h in sorted(rows)]
        return "\n".join(lines)

    def text(self) -> str:
        out = [
            f"accepted {self.accepted}  completed {self.completed}  failed {self.failed}  lost {self.lost}  "
            f"duplicated {self.duplicated}  dead {self.dead}  refused {self.refused}",
            f"while host 3 was away: {self.accepted_while_down} accepted, {self.answered_while_down} answered",
            "Submits accepted per gateway: " + ", ".join(f"{h} {n}" for h, n in sorted(self.submits.items())),
            "answered through each host's own gateway: " + ", ".join(f"{h} {s}" for h, s in self.smoke.items()),
            f"JetStream after rejoin: {self.replicas}",
        ]
        for phase, rows in self.tables.items():
            if rows:
                out += [f"messages handled per host and service ({phase}):", self.table(phase)]
        if self.lost_detail:
            out += ["lost (no answer in LOOM_RES):"] + [f"  {line}" for line in self.lost_detail]
        if self.restarts:
            out.append(f"services restarted after exiting while starting ({len(self.restarts)}):")
            out += [f"  {line}" for line in self.restarts]
        if self.errors:
            out.append("Submit errors retried: " + ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items())))
        out.append("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in self.timings.items()))
        return "\n".join(out)


async def kv_states(urls: str, ids: list[str]) -> dict[str, str]:
    """The state ``loom_results`` holds for each id (what GetResult would say), for lost ones' diagnosis."""
    nc = await nats.connect(urls.split(","))
    out: dict[str, str] = {}
    try:
        kv = await nc.jetstream().key_value(durable.RESULTS_BUCKET)
        for rid in ids:
            try:
                entry = await kv.get(rid)
                out[rid] = gateway_pb2.Result.State.Name(gateway_pb2.Result.FromString(entry.value or b"").state)
            except Exception as exc:
                out[rid] = type(exc).__name__
    finally:
        await nc.close()
    return out


class Traffic:
    """Durable Submits through the gateways in ``self.hosts`` (changed as hosts go and come), on its own loop."""

    def __init__(
        self,
        targets: dict[str, str],
        api_key: str,
        report: Report,
        accepted: dict[str, str],
        run: str,
        workers: int = 4,
    ) -> None:
        self.targets = dict(targets)  # host name -> its gateway's gRPC address
        self.hosts = list(self.targets)
        self.meta = (("authorization", f"Bearer {api_key}"),)
        self.report, self.accepted, self.run, self.workers = report, accepted, run, workers
        self.halt = threading.Event()
        self.phase = "all up"  # noted with each accepted request
        self.count = 0
        self.rng = random.Random(5)
        # One event loop for every gRPC call (grpc.aio wants a single loop), on a thread of its own.
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.stubs = self.call(self._stubs())
        self.background: concurrent.futures.Future[list[None]] | None = None

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def _stubs(self) -> dict[str, gateway_pb2_grpc.GatewayStub]:
        self.channels = {h: grpc.aio.insecure_channel(t) for h, t in self.targets.items()}
        return {h: gateway_pb2_grpc.GatewayStub(c) for h, c in self.channels.items()}

    async def submit(self, sub: gateway_pb2.SubmitRequest, first: int, hosts: list[str] | None = None) -> str | None:
        """Submit until a gateway takes it (the same key each time); returns the request id."""
        for attempt in range(30):
            pool = hosts or self.hosts
            host = pool[(first + attempt) % len(pool)]
            try:
                reply = await self.stubs[host].Submit(sub, timeout=5, metadata=self.meta)
            except grpc.aio.AioRpcError as exc:
                self.report.errors[exc.code().name] += 1
                await asyncio.sleep(min(2.0, 0.1 * 2**attempt) * random.random())
                continue
            self.accepted[reply.request_id] = f"{host} ({self.phase})"
            self.report.submits[host] += 1
            return str(reply.request_id)
        self.report.refused += 1
        return None

    async def _worker(self) -> None:
        while not self.halt.is_set():
            i = self.count
            self.count += 1
            await self.submit(submit_request(self.rng, f"{self.run}-bg-{i}"), i)
            await asyncio.sleep(0.4)  # a few requests a second per worker: two cores run all of this

    def start(self) -> None:
        async def workers() -> list[None]:
            return await asyncio.gather(*(self._worker() for _ in range(self.workers)))

        self.background = asyncio.run_coroutine_threadsafe(workers(), self.loop)

    def stop(self) -> None:
        self.halt.set()
        if self.background is not None:
            self.background.result(timeout=120)
        for channel in self.channels.values():
            self.call(channel.close())
        self.loop.call_soon_threadsafe(self.loop.stop)

    def through(self, host: str, tag: str) -> str:
        """One request through ``host``'s gateway only, read back there with GetResult; its final state."""
        return self.call(self._through(host, tag))

    async def _through(self, host: str, tag: str) -> str:
        rid = await self.submit(submit_request(random.Random(tag), f"{self.run}-{tag}"), 0, [host])
        if rid is None:
            return "REFUSED"
        state = "PENDING"
        for _ in range(240):
            res = await self.stubs[host].GetResult(
                gateway_pb2.GetResultRequest(request_id=rid), timeout=5, metadata=self.meta
            )
            state = gateway_pb2.Result.State.Name(res.state)
            if state != "PENDING":
                break
            await asyncio.sleep(0.25)
        return state


def tally(report: Report, accepted: dict[str, str], counts: Counter[str]) -> list[str]:
    """Fill in the report from the answers (``count_results``: "id|STATE" -> n); returns the lost ids."""
    t = account(accepted, counts)
    report.accepted, report.completed, report.failed = len(accepted), t.completed, t.failed
    report.lost, report.duplicated = len(t.lost), t.duplicated
    return t.lost
