"""``make bench``: Triton direct vs the same request through Loom's gateway.

One run starts the whole mesh (nats-server, tritonserver, six services) on free
127.0.0.1 ports, warms it up and then measures, per concurrency level, the same
text three ways:

* ``triton``       ``tritonclient.grpc.aio`` straight to Triton's ``minilm``
                   with the tensors the preprocess service would produce
                   (``TextTokenizer``) in the shape the inference service sends
                   (``[1, seq]`` int64, built by the same ``to_inputs``);
* ``gateway-grpc`` ``loom.v1.Gateway/Predict`` (pipeline ``embed``);
* ``gateway-http`` ``POST /v1/pipelines/embed:predict``.

The load generator copies perf_analyzer's concurrency mode: ``C`` closed-loop
workers, each sending its next request as soon as the previous answer arrives,
until ``N`` requests per level have been sent. Latency is taken per request
around the client call; throughput is answered requests / wall time of the
level. Results go to stdout and to a Markdown report (``BENCHMARKS.md``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import aiohttp
import grpc
import numpy as np
import tritonclient.grpc.aio as triton_aio

from services.common.launch.mesh import Mesh, free_ports
from services.common.launch.nats_server import nats_server_binary
from services.common.pb.loom.v1 import gateway_pb2, gateway_pb2_grpc
from services.inference.triton import to_inputs
from services.preprocess.text import TextTokenizer

MODEL = "minilm"
PIPELINE = "embed"
EMBED_DIM = 384
DEFAULT_TEXT = "The match ended in a draw after extra time, and both coaches praised the young goalkeepers."
TARGETS = ("triton", "gateway-grpc", "gateway-http")
TARGET_LABEL = {
    "triton": "(a) Triton direct, gRPC",
    "gateway-grpc": "(b) Loom gateway, gRPC",
    "gateway-http": "(c) Loom gateway, HTTP",
}

#: One request: returns the embedding it got back (raises on any failure).
Call = Callable[[], Awaitable[np.ndarray]]


class BadAnswer(Exception):
    """A reply that arrived but is not a complete, non-degraded embedding."""


# -- measurement --------------------------------------------------------------


@dataclass
class LevelResult:
    target: str
    concurrency: int
    requests: int
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    #: Mean batch size Triton executed during the level (its own counters), NaN if unknown.
    triton_batch: float = float("nan")
    #: Share of all CPUs used during the level by processes outside this benchmark's tree, in percent.
    foreign_cpu_pct: float = float("nan")

    @property
    def ok(self) -> int:
        return len(self.latencies_ms)

    def pct(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        return float(np.percentile(np.asarray(self.latencies_ms), q))

    @property
    def p50(self) -> float:
        return self.pct(50)

    @property
    def p90(self) -> float:
        return self.pct(90)

    @property
    def p99(self) -> float:
        return self.pct(99)

    @property
    def mean(self) -> float:
        return float(np.mean(self.latencies_ms)) if self.latencies_ms else float("nan")

    @property
    def throughput(self) -> float:
        return self.ok / self.wall_s if self.wall_s > 0 else float("nan")


async def closed_loop(call: Call, target: str, concurrency: int, requests: int) -> LevelResult:
    """``concurrency`` workers share a budget of ``requests``; each sends its next one on the last answer."""
    result = LevelResult(target, concurrency, requests)
    issued = 0

    async def worker() -> None:
        nonlocal issued
        while issued < requests:
            issued += 1
            t0 = time.perf_counter()
            try:
                await call()
            except Exception as exc:  # counted, never fatal: a benchmark reports its errors
                result.errors += 1
                if len(result.error_samples) < 3:
                    result.error_samples.append(f"{type(exc).__name__}: {str(exc)[:200]}")
                continue
            result.latencies_ms.append((time.perf_counter() - t0) * 1000.0)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.wall_s = time.perf_counter() - started
    return result


# -- the three clients ----------------------------------------------------------


def triton_call(client: triton_aio.InferenceServerClient, tensors: dict[str, np.ndarray]) -> Call:
    async def call() -> np.ndarray:
        # Built per request, exactly as the inference service does it.
        result = await client.infer(MODEL, to_inputs(tensors), client_timeout=30.0)
        out = result.as_numpy("embedding")
        if out is None or out.shape != (1, EMBED_DIM):
            raise BadAnswer(f"embedding shape {None if out is None else out.shape}")
        return np.asarray(out[0], dtype=np.float32)

    return call


def _check_embedding(values: list[float], degraded: bool, what: str) -> np.ndarray:
    if degraded:
        raise BadAnswer(f"degraded answer: {what}")
    if len(values) != EMBED_DIM:
        raise BadAnswer(f"embedding of length {len(values)}")
    return np.asarray(values, dtype=np.float32)


def grpc_call(stub: gateway_pb2_grpc.GatewayAsyncStub, text: str) -> Call:
    request = gateway_pb2.PredictRequest(pipeline=PIPELINE, inputs={"text": gateway_pb2.Input(text=text)})

    async def call() -> np.ndarray:
        resp = await stub.Predict(request, timeout=30.0)
        if "text" not in resp.outputs:
            raise BadAnswer(f"no 'text' output (errors: {dict(resp.errors)})")
        return _check_embedding(list(resp.outputs["text"].text.embedding), resp.degraded, str(dict(resp.errors)))

    return call


def http_call(session: aiohttp.ClientSession, url: str, text: str) -> Call:
    body = json.dumps({"inputs": {"text": text}}).encode()
    headers = {"content-type": "application/json"}

    async def call() -> np.ndarray:
        async with session.post(url, data=body, headers=headers) as resp:
            payload = await resp.read()
            if resp.status != 200:
                raise BadAnswer(f"HTTP {resp.status}: {payload[:200]!r}")
        doc = json.loads(payload)
        text_out = doc.get("outputs", {}).get("text")
        if not text_out:
            raise BadAnswer(f"no 'text' output: {str(doc)[:200]}")
        return _check_embedding(text_out.get("embedding", []), bool(doc.get("degraded")), str(doc.get("errors")))

    return call


def _cpu_busy_s() -> float:
    """Busy CPU seconds of the whole machine, summed over CPUs (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _tree_cpu_s(root: int) -> float:
    """CPU seconds used so far by ``root`` and all its descendants (the mesh is started by this process)."""
    children: dict[int, list[int]] = {}
    used: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            rest = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        pid = int(entry.name)
        children.setdefault(int(rest[1]), []).append(pid)  # ppid
        used[pid] = int(rest[11]) + int(rest[12])  # utime + stime
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += used.get(pid, 0)
        todo.extend(children.get(pid, ()))
    return total / os.sysconf("SC_CLK_TCK")


def cpu_snapshot() -> tuple[float, float]:
    """(machine busy CPU s, this benchmark's tree CPU s); their deltas tell how much else ran."""
    try:
        return _cpu_busy_s(), _tree_cpu_s(os.getpid())
    except (OSError, ValueError, IndexError):
        return float("nan"), float("nan")


async def triton_counters(session: aiohttp.ClientSession, url: str) -> tuple[float, float]:
    """(successful requests, executions) of ``minilm`` from Triton's /metrics; their ratio is the mean batch."""
    requests = executions = 0.0
    try:
        async with session.get(url) as resp:
            text = await resp.text()
    except aiohttp.ClientError:
        return float("nan"), float("nan")
    for line in text.splitlines():
        if f'model="{MODEL}"' not in line:
            continue
        if line.startswith("nv_inference_request_success{"):
            requests += float(line.rsplit(" ", 1)[1])
        elif line.startswith("nv_inference_exec_count{"):
            executions += float(line.rsplit(" ", 1)[1])
    return requests, executions


async def first_success(call: Call, what: str, timeout: float = 60.0) -> np.ndarray:
    """Retry until one request succeeds: the mesh's health checks do not prove the whole path is wired."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await call()
        except Exception as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} never answered: {type(exc).__name__}: {exc}") from exc
            await asyncio.sleep(0.25)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))


@dataclass
class BenchRun:
    results: list[LevelResult]
    versions: dict[str, str]
    tokens: int
    cosine_grpc: float
    cosine_http: float
    mesh_start_s: float
    duration_s: float
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]


async def measure(
    mesh: Mesh, text: str, levels: list[int], requests: int, warmup: int, versions: dict[str, str]
) -> tuple[list[LevelResult], int, float, float]:
    tokenizer = TextTokenizer()  # the preprocess service's defaults (max_tokens 256)
    tensors, _ = tokenizer.encode(text)
    tokens = int(tensors["input_ids"].shape[0])

    top = max(levels)
    tclient = triton_aio.InferenceServerClient(mesh.triton_grpc)
    channel = grpc.aio.insecure_channel(mesh.gateway_grpc)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=top))
    try:
        meta = await tclient.get_server_metadata()
        versions["tritonserver (running)"] = str(meta.version)
        # grpc.aio is untyped here, so mypy cannot pick the stub's async overload by itself.
        stub = cast("gateway_pb2_grpc.GatewayAsyncStub", gateway_pb2_grpc.GatewayStub(channel))
        calls: dict[str, Call] = {
            "triton": triton_call(tclient, tensors),
            "gateway-grpc": grpc_call(stub, text),
            "gateway-http": http_call(session, f"{mesh.gateway_http}/v1/pipelines/{PIPELINE}:predict", text),
        }
        # Readiness of the whole path, and a check that all three compute the same thing.
        first = {name: await first_success(call, name) for name, call in calls.items()}
        cos_grpc = cosine(first["triton"], first["gateway-grpc"])
        cos_http = cosine(first["triton"], first["gateway-http"])

        # Warm-up: every target at the highest concurrency (connections, Triton's
        # batcher, onnxruntime, the services' executors); results are discarded.
        for name in TARGETS:
            await closed_loop(calls[name], name, top, warmup)

        metrics_url = f"http://127.0.0.1:{mesh.ports['triton_metrics']}/metrics"
        results: list[LevelResult] = []
        for level in levels:
            for name in TARGETS:
                await closed_loop(calls[name], name, level, max(level, warmup // 4))  # short re-warm per level
                before = await triton_counters(session, metrics_url)
                cpu_before = cpu_snapshot()
                res = await closed_loop(calls[name], name, level, requests)
                cpu_after = cpu_snapshot()
                after = await triton_counters(session, metrics_url)
                foreign = (cpu_after[0] - cpu_before[0]) - (cpu_after[1] - cpu_before[1])
                res.foreign_cpu_pct = max(0.0, 100.0 * foreign / (res.wall_s * (os.cpu_count() or 1)))
                if after[1] > before[1]:
                    res.triton_batch = (after[0] - before[0]) / (after[1] - before[1])
                results.append(res)
                print(
                    f"  c={level:<3} {name:<13} p50 {res.p50:7.2f} ms  p99 {res.p99:7.2f} ms  "
                    f"{res.throughput:8.1f} req/s  Triton batch {res.triton_batch:5.1f}  "
                    f"other CPU {res.foreign_cpu_pct:3.0f}%  errors {res.errors}",
                    file=sys.stderr,
                    flush=True,
                )
        return results, tokens, cos_grpc, cos_http
    finally:
        await session.close()
        await channel.close()
        await tclient.close()


# -- the machine ------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_total() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                kib = int(line.split()[1])
                return f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return "unknown"


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def nats_server_version() -> str:
    try:
        out = subprocess.run([nats_server_binary(), "--version"], capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().removeprefix("nats-server:").strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def tool_versions() -> dict[str, str]:
    return {
        "nvidia-pytriton wheel": package_version("nvidia-pytriton"),
        "tritonclient": package_version("tritonclient"),
        "nats-server": nats_server_version(),
        "grpcio": package_version("grpcio"),
        "aiohttp": package_version("aiohttp"),
        "onnxruntime": package_version("onnxruntime"),
    }


# -- report -----------------------------------------------------------------------


def by_key(results: list[LevelResult]) -> dict[tuple[str, int], LevelResult]:
    return {(r.target, r.concurrency): r for r in results}


def results_table(results: list[LevelResult]) -> list[str]:
    lines = [
        "| path | concurrency | requests | p50 ms | p90 ms | p99 ms | mean ms | throughput req/s "
        "| Triton mean batch | other CPU % | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {TARGET_LABEL[r.target]} | {r.concurrency} | {r.requests} | {r.p50:.2f} | {r.p90:.2f} | "
            f"{r.p99:.2f} | {r.mean:.2f} | {r.throughput:.1f} | {r.triton_batch:.1f} | "
            f"{r.foreign_cpu_pct:.0f} | {r.errors} |"
        )
    return lines


def tax_table(results: list[LevelResult], levels: list[int]) -> list[str]:
    idx = by_key(results)
    lines = [
        "| concurrency | via | p50 tax ms | p99 tax ms | p50 ratio | throughput ratio (via / direct) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for level in levels:
        a = idx[("triton", level)]
        for via in ("gateway-grpc", "gateway-http"):
            b = idx[(via, level)]
            lines.append(
                f"| {level} | {via} | {b.p50 - a.p50:+.2f} | {b.p99 - a.p99:+.2f} | "
                f"{b.p50 / a.p50:.2f}x | {b.throughput / a.throughput:.2f} |"
            )
    return lines


def interpretation(run: BenchRun, levels: list[int]) -> list[str]:
    idx = by_key(run.results)
    lo, hi = min(levels), max(levels)
    a_lo, b_lo, c_lo = (idx[(t, lo)] for t in TARGETS)
    a_hi, b_hi = idx[("triton", hi)], idx[("gateway-grpc", hi)]
    lines = [
        f"- **Latency at concurrency {lo}.** Triton alone answers in {a_lo.p50:.2f} ms (p50); the same text "
        f"through the gateway takes {b_lo.p50:.2f} ms over gRPC and {c_lo.p50:.2f} ms over HTTP, so the mesh "
        f"adds {b_lo.p50 - a_lo.p50:.2f} ms at p50 and {b_lo.p99 - a_lo.p99:.2f} ms at p99 (gRPC). That is the "
        "cost of the gateway, tokenization in the preprocess service, five NATS messages through nats-server "
        "(gateway → preprocess → inference → postprocess → fusion → gateway), protobuf (de)serialisation in "
        "each Python process, postprocessing (L2 normalisation) and fusion, paid on every request; the "
        "model's own compute is in both numbers.",
        f"- **Load at concurrency {hi}.** Triton direct reaches {a_hi.throughput:.0f} req/s "
        f"(p50 {a_hi.p50:.1f} ms, p99 {a_hi.p99:.1f} ms, mean batch {a_hi.triton_batch:.1f}); through the "
        f"gateway {b_hi.throughput:.0f} req/s (p50 {b_hi.p50:.1f} ms, p99 {b_hi.p99:.1f} ms, mean batch "
        f"{b_hi.triton_batch:.1f}), i.e. {b_hi.throughput / a_hi.throughput:.0%} of direct. The mesh's extra "
        "work is CPU work on the same cores that run the model, so at saturation its tax shows up as lost "
        "throughput and longer queues rather than as a fixed per-request delay. "
        + (
            "Triton direct has the worse p99 here: 32 requests that all return together arrive together, "
            "and the dynamic batcher (preferred sizes 8/16/32, 2 ms queue delay, one model instance) splits "
            "them into batches that queue behind each other; the mesh spreads arrivals out."
            if b_hi.p99 < a_hi.p99
            else "Triton's dynamic batcher (preferred sizes 8/16/32, 2 ms queue delay, one instance) batches "
            "both paths; the mesh's processes add queueing of their own."
        ),
        f"- **Same answer.** Cosine similarity of the embedding from Triton direct and from the gateway: "
        f"{run.cosine_grpc:.6f} (gRPC), {run.cosine_http:.6f} (HTTP) — the gateway's embedding is the "
        "L2-normalised mean pooling of the same tensor, so the comparison is like for like.",
        f"- **Caveats.** The load generator (one Python process, one event loop) runs on the same "
        f"{os.cpu_count()} cores as the 8 processes under test (nats-server, tritonserver with its Python "
        "backend stub, six services), so at high concurrency every path is partly client-bound and the numbers "
        "are a lower bound on what the services can do with cores of their own. These are the numbers of one "
        f"run on a shared machine (load average {run.load_before[0]:.2f} before, {run.load_after[0]:.2f} "
        f"after; up to {max(r.foreign_cpu_pct for r in run.results):.0f}% of the CPUs went to other work during "
        "a level, see the *other CPU %* column). On the shared 2-core machine this tool was written on, "
        "repeated runs differed by up to 2x in throughput at concurrency 32 and by tens of percent at "
        "concurrency 1, p99 most of all. "
        "Re-run `make bench` on your machine before drawing conclusions.",
    ]
    return lines


def markdown(run: BenchRun, args: argparse.Namespace, levels: list[int]) -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    total_errors = sum(r.errors for r in run.results)
    v = run.versions
    out = [
        "# Loom benchmarks: Triton direct vs through the mesh",
        "",
        f"Date: {now}. Produced by `make bench` (`python -m tools.bench`) in {run.duration_s:.0f} s "
        f"(mesh start {run.mesh_start_s:.1f} s). **One run on a shared machine — re-run `make bench` for "
        "numbers on yours.**",
        "",
        "## Machine",
        "",
        f"- CPU: {cpu_model()}, {os.cpu_count()} cores (`os.cpu_count()`), no GPU used (Triton on CPU)",
        f"- Memory: {memory_total()}",
        f"- OS: {platform.platform()}",
        f"- Python {platform.python_version()}",
        f"- tritonserver {v.get('tritonserver (running)', '?')} (binary from the nvidia-pytriton "
        f"{v['nvidia-pytriton wheel']} wheel), python backend running onnxruntime {v['onnxruntime']}",
        f"- tritonclient {v['tritonclient']}, grpcio {v['grpcio']}, aiohttp {v['aiohttp']}",
        f"- nats-server {v['nats-server']}",
        "",
        "## Method",
        "",
        "- One run starts the whole mesh with `Mesh(ports=free_ports())` (nats-server, tritonserver and the six "
        "services as separate processes, traces off), all on 127.0.0.1, and stops it at the end.",
        f"- Model `{MODEL}` (all-MiniLM-L6-v2 int8 ONNX in Triton's python backend, dynamic batching). "
        f"Input text ({len(args.text)} characters, {run.tokens} tokens): “{args.text}”",
        "- Three paths, same text:",
        "  - **(a) Triton direct**: `tritonclient.grpc.aio` `infer()` on `minilm` with the tensors the preprocess "
        "service produces (`TextTokenizer`: `input_ids`, `attention_mask`, `token_type_ids`) in the shape the "
        "inference service sends (`[1, seq]` int64, built per request by the service's own `to_inputs`). "
        "Tokenization is done once, outside the timing.",
        '  - **(b) gateway gRPC**: `loom.v1.Gateway/Predict` (`pipeline="embed"`) with a `grpc.aio` channel.',
        "  - **(c) gateway HTTP**: `POST /v1/pipelines/embed:predict` with an `aiohttp` session "
        "(keep-alive, as many connections as workers).",
        "  Each path reuses one client (one gRPC channel / one connection pool) for all workers.",
        f"- Load: closed loop, like perf_analyzer's concurrency mode — C workers each send the next request as "
        f"soon as their previous answer arrives, until {args.requests} requests have been sent per path and "
        f"level. Levels: {', '.join(map(str, levels))}. Paths run one after another, never at the same time.",
        f"- Warm-up: one request per path until it succeeds, then {args.warmup} requests per path at concurrency "
        f"{max(levels)}, and {max(1, args.warmup // 4)} (at least C) more before each measured level; "
        "none of them is counted.",
        "- Measured: per-request latency on the client (`time.perf_counter()` around the awaited call, so it "
        "includes client serialisation and the answer's parsing); p50/p90/p99 by linear interpolation; "
        "throughput = answered requests / wall time of the level; Triton mean batch = Triton's own "
        "`nv_inference_request_success` / `nv_inference_exec_count` for `minilm` over the level; other CPU % = "
        "CPU used on the machine during the level by processes outside this benchmark and the mesh it started, "
        "as a share of all cores (/proc), a gauge of how disturbed the level was. "
        "An error is any exception, non-200, "
        "degraded answer or embedding that is not 384 floats.",
        "",
        "## Results",
        "",
        *results_table(run.results),
        "",
        "## Mesh tax",
        "",
        "Tax = latency through the gateway minus latency of Triton direct at the same concurrency "
        "(positive: the mesh is slower). Throughput ratio = gateway req/s ÷ direct req/s.",
        "",
        *tax_table(run.results, levels),
        "",
    ]
    if total_errors:
        out += ["## Errors", "", f"**{total_errors} requests failed.** Samples:", ""]
        for r in run.results:
            for sample in r.error_samples:
                out.append(f"- {r.target} c={r.concurrency}: `{sample}`")
        out.append("")
    out += ["## Interpretation", "", *interpretation(run, levels), ""]
    return "\n".join(out)


def print_summary(run: BenchRun, levels: list[int]) -> None:
    print()
    print(f"{'path':<14}{'conc':>5}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'req/s':>9}{'errors':>8}")
    for r in run.results:
        print(
            f"{r.target:<14}{r.concurrency:>5}{r.p50:>9.2f}{r.p90:>9.2f}{r.p99:>9.2f}{r.throughput:>9.1f}{r.errors:>8}"
        )
    print()
    idx = by_key(run.results)
    for level in levels:
        a = idx[("triton", level)]
        for via in ("gateway-grpc", "gateway-http"):
            b = idx[(via, level)]
            print(
                f"mesh tax c={level:<3} {via:<13} p50 {b.p50 - a.p50:+7.2f} ms  p99 {b.p99 - a.p99:+7.2f} ms  "
                f"throughput {b.throughput / a.throughput:.2f}x of direct"
            )
    print(f"cosine(direct, gateway): grpc {run.cosine_grpc:.6f}  http {run.cosine_http:.6f}")


# -- main -------------------------------------------------------------------------


def parse_levels(raw: str) -> list[int]:
    levels = [int(x) for x in raw.split(",") if x.strip()]
    if not levels or any(c < 1 for c in levels):
        raise argparse.ArgumentTypeError(f"bad concurrency list {raw!r}")
    return levels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400, help="measured requests per path and level")
    parser.add_argument("--concurrency", type=parse_levels, default=[1, 32], help="comma-separated levels")
    parser.add_argument("--warmup", type=int, default=100, help="warm-up requests per path (not measured)")
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"), help="Markdown report to write")
    parser.add_argument("--text", default=DEFAULT_TEXT, help="the text to embed")
    args = parser.parse_args(argv)
    levels: list[int] = args.concurrency
    if args.requests < 1:
        parser.error("--requests must be at least 1")

    started = time.monotonic()
    load_before = os.getloadavg()
    versions = tool_versions()
    mesh = Mesh(ports=free_ports())
    try:
        print(f"starting the mesh (logs in {mesh.workdir / 'logs'}) ...", file=sys.stderr, flush=True)
        mesh.start()
        mesh_start_s = time.monotonic() - started
        print(f"mesh ready in {mesh_start_s:.1f}s; measuring ...", file=sys.stderr, flush=True)
        results, tokens, cos_grpc, cos_http = asyncio.run(
            measure(mesh, args.text, levels, args.requests, args.warmup, versions)
        )
    finally:
        mesh.stop()
    run = BenchRun(
        results=results,
        versions=versions,
        tokens=tokens,
        cosine_grpc=cos_grpc,
        cosine_http=cos_http,
        mesh_start_s=mesh_start_s,
        duration_s=time.monotonic() - started,
        load_before=load_before,
        load_after=os.getloadavg(),
    )
    print_summary(run, levels)
    args.out.write_text(markdown(run, args, levels))
    print(f"\nwrote {args.out}")
    errors = sum(r.errors for r in results)
    if errors:
        print(f"{errors} requests failed; see {args.out}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
