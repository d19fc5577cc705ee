"""BENCHMARKS.md and the console summary: the common frame around each suite's section.

The document is: header, machine, the method both suites share, one section per
suite that ran (:mod:`tools.bench.report_text`, :mod:`tools.bench.report_image`),
errors if any, caveats. Only tables and numbers come from the run; the prose
around them says what was measured and how to read it.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
from dataclasses import dataclass

from tools.bench import report_image, report_text
from tools.bench.image_targets import ImageInput
from tools.bench.load import LevelResult
from tools.bench.runner import SuiteRun
from tools.bench.system import cpu_model, memory_total
from tools.bench.targets import VIA
from tools.bench.text_targets import TextInput


@dataclass
class BenchRun:
    """Everything the report says: the suites' results, their inputs and the conditions of the run."""

    suites: dict[str, SuiteRun]
    text: TextInput | None
    image: ImageInput | None
    versions: dict[str, str]
    mesh_start_s: float
    duration_s: float
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]

    @property
    def results(self) -> list[LevelResult]:
        return [r for suite in self.suites.values() for r in suite.results]


def machine(run: BenchRun) -> list[str]:
    v = run.versions
    return [
        "## Machine",
        "",
        f"- CPU: {cpu_model()}, {os.cpu_count()} cores (`os.cpu_count()`), no GPU used (Triton on CPU)",
        f"- Memory: {memory_total()}",
        f"- OS: {platform.platform()}",
        f"- Python {platform.python_version()}",
        f"- tritonserver {v.get('tritonserver (running)', '?')} (binary from the nvidia-pytriton "
        f"{v['nvidia-pytriton wheel']} wheel), python backend running onnxruntime {v['onnxruntime']} "
        f"(OCR: rapidocr_onnxruntime {v['rapidocr_onnxruntime']}'s PP-OCRv4 models)",
        f"- tritonclient {v['tritonclient']}, grpcio {v['grpcio']}, aiohttp {v['aiohttp']}, Pillow {v['Pillow']}",
        f"- nats-server {v['nats-server']}",
        "",
    ]


def common_method(suites: int) -> list[str]:
    return [
        "## Method (both suites)" if suites > 1 else "## Method",
        "",
        "- One run starts the whole mesh with `Mesh(ports=free_ports())` (nats-server, tritonserver and the six "
        "services as separate processes, traces off), all on 127.0.0.1, and stops it at the end.",
        "- Three paths per suite, same input: **(a) Triton direct** (`tritonclient.grpc.aio` `infer()` with the "
        "tensors the inference service would send, preprocessing done once outside the timing), **(b) gateway "
        "gRPC** (`loom.v1.Gateway/Predict`, one `grpc.aio` channel), **(c) gateway HTTP** "
        "(`POST /v1/pipelines/<name>:predict`, one `aiohttp` session, keep-alive, as many connections as "
        "workers). Each path reuses one client for all workers.",
        "- **Every gateway request sets `bypass_cache`**, and an answer counts only if its note "
        "`<part>/inference.cache` says `bypass`: the same input is sent over and over, and the inference "
        "service's result cache (JetStream KV) would otherwise answer from memory instead of running the model.",
        "- Load: closed loop, like perf_analyzer's concurrency mode — C workers each send the next request as soon "
        "as their previous answer arrives, until the level's request budget is spent. Paths and suites run one "
        "after another, never at the same time.",
        "- Measured: per-request latency on the client (`time.perf_counter()` around the awaited call, so it "
        "includes client serialisation and the answer's parsing); p50/p90/p99 by linear interpolation; "
        "throughput = answered requests / wall time of the level; Triton's own per-model statistics (its "
        "statistics extension, `get_inference_statistics`, the counters behind its `nv_inference_*` metrics), read "
        "before and after each level; other CPU % = CPU used on the machine during "
        "the level by processes outside this benchmark and the mesh it started, as a share of all cores (/proc), "
        "a gauge of how disturbed the level was. Any exception, error status or wrong answer counts as an error.",
        "",
    ]


def caveats(run: BenchRun) -> list[str]:
    worst = max((r.foreign_cpu_pct for r in run.results), default=float("nan"))
    return [
        "## Caveats",
        "",
        f"- The load generator (one Python process, one event loop) runs on the same {os.cpu_count()} cores as "
        "the 8 processes under test (nats-server, tritonserver with its Python backend stubs, six services), so "
        "at high concurrency every path is partly client-bound and the numbers are a lower bound on what the "
        "services can do with cores of their own.",
        f"- These are the numbers of one run on a shared machine (load average {run.load_before[0]:.2f} before, "
        f"{run.load_after[0]:.2f} after; up to {worst:.0f}% of the CPUs went to other work during a level, see "
        "the *other CPU %* columns). On the shared 2-core machine this tool was written on, repeated runs "
        "differed by up to 2x in throughput at high concurrency and by tens of percent at concurrency 1, p99 "
        "most of all. Re-run `make bench` on your machine before drawing conclusions.",
        "",
    ]


def errors(run: BenchRun) -> list[str]:
    total = sum(r.errors for r in run.results)
    if not total:
        return []
    out = ["## Errors", "", f"**{total} requests failed.** Samples:", ""]
    for name, suite in run.suites.items():
        for r in suite.results:
            out += [f"- {name} {r.target} c={r.concurrency}: `{sample}`" for sample in r.error_samples]
    return [*out, ""]


def markdown(run: BenchRun) -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "# Loom benchmarks: Triton direct vs through the mesh",
        "",
        f"Date: {now}. Produced by `make bench` (`python -m tools.bench`, suites: {', '.join(run.suites)}) in "
        f"{run.duration_s:.0f} s (mesh start {run.mesh_start_s:.1f} s). **One run on a shared machine — re-run "
        "`make bench` for numbers on yours.**",
        "",
        *machine(run),
        *common_method(len(run.suites)),
    ]
    if "text" in run.suites and run.text is not None:
        out += report_text.section(run.suites["text"], run.text)
    if "image" in run.suites and run.image is not None:
        out += report_image.section(run.suites["image"], run.image)
    out += [*errors(run), *caveats(run)]
    return "\n".join(out)


def print_summary(run: BenchRun) -> None:
    for name, suite in run.suites.items():
        print(f"\n{name} suite")
        print(f"{'path':<14}{'conc':>5}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'per s':>9}{'errors':>8}")
        for r in suite.results:
            print(
                f"{r.target:<14}{r.concurrency:>5}{r.p50:>9.2f}{r.p90:>9.2f}{r.p99:>9.2f}{r.mean:>9.2f}"
                f"{r.throughput:>9.1f}{r.errors:>8}"
            )
        for level in suite.levels:
            a = suite.at("triton", level)
            for via in VIA:
                b = suite.at(via, level)
                print(
                    f"mesh overhead c={level:<3} {via:<13} p50 {b.p50 - a.p50:+8.2f} ms  "
                    f"p99 {b.p99 - a.p99:+8.2f} ms  throughput {b.throughput / a.throughput:.2f}x of direct"
                )
