"""``python -m tools.bench``: options, the mesh's lifetime, and the report.

The mesh is started once for all suites and stopped whatever happens; the
suites run one after another against it (text first, then image).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

from services.common.launch.mesh import Mesh, free_ports
from tools.bench.image_targets import DEFAULT_FONT_SIZE, DEFAULT_PHRASE, DEFAULT_SIZE, ImageInput, image_suite
from tools.bench.report import BenchRun, markdown, print_summary
from tools.bench.runner import SuiteRun, run_suite
from tools.bench.system import tool_versions
from tools.bench.targets import Clients
from tools.bench.text_targets import DEFAULT_TEXT, TextInput, text_suite
from tools.sections import keep_others

SUITES = {"text": ("text",), "image": ("image",), "all": ("text", "image")}


def parse_levels(raw: str) -> list[int]:
    try:
        levels = [int(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        levels = []
    if not levels or any(c < 1 for c in levels):
        raise argparse.ArgumentTypeError(f"bad concurrency list {raw!r}")
    return levels


def parse_size(raw: str) -> tuple[int, int]:
    try:
        width, height = (int(x) for x in raw.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {raw!r}, expected WIDTHxHEIGHT") from None
    if width < 8 or height < 8:
        raise argparse.ArgumentTypeError(f"size {raw!r} is below the preprocess service's 8 px minimum")
    return width, height


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.bench",
        description="Triton direct vs the same request through Loom's gateway; writes a Markdown report.",
    )
    p.add_argument("--suite", choices=sorted(SUITES), default="all", help="which suites to run (default: all)")
    p.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"), help="Markdown report to write")
    text = p.add_argument_group("text suite (minilm vs pipeline embed)")
    text.add_argument("--requests", type=int, default=400, help="measured requests per path and level")
    text.add_argument("--concurrency", type=parse_levels, default=[1, 32], help="comma-separated levels")
    text.add_argument("--warmup", type=int, default=100, help="warm-up requests per path (not measured)")
    text.add_argument("--text", default=DEFAULT_TEXT, help="the text to embed")
    image = p.add_argument_group("image suite (ocr vs pipeline content)")
    image.add_argument("--image-requests", type=int, default=40, help="measured requests per path and level")
    image.add_argument("--image-concurrency", type=parse_levels, default=[1, 4], help="comma-separated levels")
    image.add_argument("--image-warmup", type=int, default=8, help="warm-up requests per path (not measured)")
    image.add_argument("--phrase", default=DEFAULT_PHRASE, help="the phrase drawn in the image")
    image.add_argument("--image-size", type=parse_size, default=DEFAULT_SIZE, help="WIDTHxHEIGHT of the image")
    image.add_argument("--font-size", type=int, default=DEFAULT_FONT_SIZE, help="font size of the phrase, px")
    return p


async def measure(
    mesh: Mesh, args: argparse.Namespace, text: TextInput | None, image: ImageInput | None, versions: dict[str, str]
) -> dict[str, SuiteRun]:
    levels = [*(args.concurrency if text else []), *(args.image_concurrency if image else [])]
    clients = Clients.open(mesh, connections=max(levels))
    try:
        meta = await clients.triton.get_server_metadata()
        versions["tritonserver (running)"] = str(meta.version)
        runs: dict[str, SuiteRun] = {}
        if text is not None:
            suite = text_suite(clients, text, args.concurrency, args.requests, args.warmup)
            runs["text"] = await run_suite(suite, clients)
        if image is not None:
            suite = image_suite(clients, image, args.image_concurrency, args.image_requests, args.image_warmup)
            runs["image"] = await run_suite(suite, clients)
        return runs
    finally:
        await clients.close()


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.requests < 1 or args.image_requests < 1:
        p.error("--requests and --image-requests must be at least 1")
    suites = SUITES[args.suite]
    # Inputs are prepared before the mesh starts: a missing font or tokenizer fails fast.
    text = TextInput.make(args.text) if "text" in suites else None
    image = ImageInput.make(args.phrase, args.image_size, args.font_size) if "image" in suites else None

    started = time.monotonic()
    load_before = os.getloadavg()
    versions = tool_versions()
    # One tenant drives the whole benchmark: no per-tenant rate limit (LOOM_GATEWAY_TENANT_RATE).
    mesh = Mesh(ports=free_ports(), env={"LOOM_GATEWAY_TENANT_RATE": ""})
    try:
        print(f"starting the mesh (logs in {mesh.workdir / 'logs'}) ...", file=sys.stderr, flush=True)
        mesh.start()
        mesh_start_s = time.monotonic() - started
        print(f"mesh ready in {mesh_start_s:.1f}s; measuring {', '.join(suites)} ...", file=sys.stderr, flush=True)
        runs = asyncio.run(measure(mesh, args, text, image, versions))
    finally:
        mesh.stop()
    run = BenchRun(
        suites=runs,
        text=text,
        image=image,
        versions=versions,
        mesh_start_s=mesh_start_s,
        duration_s=time.monotonic() - started,
        load_before=load_before,
        load_after=os.getloadavg(),
    )
    print_summary(run)
    args.out.write_text(keep_others(args.out, markdown(run)))  # the chaos run's section stays
    print(f"\nwrote {args.out}")
    errors = sum(r.errors for r in run.results)
    if errors:
        print(f"{errors} requests failed; see {args.out}", file=sys.stderr)
        return 1
    return 0
