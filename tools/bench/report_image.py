"""The image suite's section of BENCHMARKS.md: ``ocr`` alone vs the whole ``content`` chain.

The two sides do not do the same work: (a) is the image model alone, (b) and
(c) also decode the PNG and run the text model on what OCR read. The section
therefore reports, next to the overhead, how much of the chain is OCR, from
Triton's own counters for ``ocr`` and ``minilm`` over each level.
"""

from __future__ import annotations

from tools.bench.image_targets import MODEL, PIPELINE, TEXT_MODEL, ImageInput
from tools.bench.load import LevelResult
from tools.bench.runner import SuiteRun
from tools.bench.tables import STAGE_LEGEND, between_stages_ms, outside_model_ms, stage_table, tax_table
from tools.bench.targets import TARGET_LABEL, TARGETS


def busy_pct(r: LevelResult) -> float:
    """Share of the level's wall time the ``ocr`` instance spent executing batches (Triton's batch_stats)."""
    return 100.0 * r.model(MODEL).busy_us / 1e6 / r.wall_s if r.wall_s > 0 else float("nan")


def results_table(suite: SuiteRun) -> list[str]:
    lines = [
        "| path | concurrency | requests | p50 ms | p90 ms | p99 ms | mean ms | images/s "
        f"| Triton `{MODEL}` ms/req | of which queue | `{MODEL}` ms/image | `{MODEL}` mean batch | `{MODEL}` busy % "
        f"| Triton `{TEXT_MODEL}` ms/req | other CPU % | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in suite.results:
        ocr, text = r.model(MODEL), r.model(TEXT_MODEL)
        text_ms = f"{text.request_ms:.2f}" if text.requests else "-"
        lines.append(
            f"| {TARGET_LABEL[r.target]} | {r.concurrency} | {r.requests} | {r.p50:.1f} | {r.p90:.1f} | "
            f"{r.p99:.1f} | {r.mean:.1f} | {r.throughput:.2f} | {ocr.request_ms:.1f} | {ocr.queue_ms:.1f} | "
            f"{ocr.busy_per_item_ms:.1f} | {ocr.mean_batch:.2f} | {busy_pct(r):.0f} | {text_ms} | "
            f"{r.foreign_cpu_pct:.0f} | {r.errors} |"
        )
    return lines


def method(suite: SuiteRun, item: ImageInput) -> list[str]:
    height, width = item.bgr.shape[:2]
    return [
        "### Method",
        "",
        f"- Input: the phrase “{item.phrase}” drawn black on white in DejaVu Sans {item.font_size} px by "
        f"`tests/media.py` `text_image()`, a {item.size[0]}x{item.size[1]} PNG of {len(item.png):,} bytes.",
        f"- **(a) image model alone**: `infer()` on `{MODEL}` (RapidOCR PP-OCRv4 detection + recognition, "
        "onnxruntime in Triton's python backend, one instance, dynamic batching up to 4, requests of a batch run "
        "one after another) with the array the preprocess service produces (`ImagePreprocessor.prepare`: decode, "
        f"orientation, longest side ≤ 960 → BGR uint8 {height}x{width}x3) and the batch dimension the inference "
        "service adds (`to_inputs`); decoding is done once, outside the timing.",
        f"- **(b)/(c) the whole `{PIPELINE}` chain**, image only (gRPC `data` = the PNG; HTTP "
        '`{"inputs": {"image": {"b64": ...}}, "bypass_cache": true}`): gateway → `pre.image` (PNG decode, '
        f"resize) → `infer.{MODEL}` → `post.ocr` (reading order, boxes) → `pre.text` (tokenize the recognised "
        f"text) → `infer.{TEXT_MODEL}` → `post.topics` → fusion → gateway. So this suite compares **the image "
        "model alone with the whole content chain**, not like with like: the chain also runs a second model.",
        f"- {suite.requests} measured requests per path and level; levels {', '.join(map(str, suite.levels))} "
        f"(OCR takes hundreds of ms per image on CPU, so the budget is small). Warm-up: one request per path "
        f"until it succeeds, then {suite.warmup} per path at concurrency {max(suite.levels)}, and {suite.rewarm} "
        "(at least C) more before each level; none is counted.",
        "- Triton's counters over each level: *ms/req* = `nv_inference_request_duration_us` per request "
        "(arrival to answer inside Triton), *of which queue* = `nv_inference_queue_duration_us` per request; "
        "*ms/image* = the OCR instance's execution time (the statistics' per-batch-size `batch_stats`) per image, "
        "what one image costs the model; *busy %* = that execution time / wall time of the level.",
        "- An answer counts only if the recognised text contains the phrase (case and spaces ignored); through "
        "the gateway it must also be HTTP 200 / no gRPC error, not degraded, uncached (`bypass`) and carry "
        "topics (the text model ran on the OCR text). Anything else is an error.",
        "",
    ]


def _cpu_or_idle(direct: LevelResult, chain: LevelResult) -> str:
    """Why the chain's throughput falls short of direct at the top level: slower OCR, or OCR waiting."""
    a_ms, b_ms = direct.model(MODEL).busy_per_item_ms, chain.model(MODEL).busy_per_item_ms
    if b_ms > 1.05 * a_ms:
        return (
            f"One image costs the OCR instance {a_ms:.0f} ms direct but {b_ms:.0f} ms in the chain: the chain's "
            "processes (decode, the text model, the services) take CPU from OCR on the same cores."
        )
    return (
        f"One image costs the OCR instance about the same ({a_ms:.0f} ms direct, {b_ms:.0f} ms in the chain), so "
        "what throughput the chain loses is time the OCR instance waits for the next image."
    )


def interpretation(suite: SuiteRun) -> list[str]:
    lo, hi = min(suite.levels), max(suite.levels)
    a, b, c = (suite.at(t, lo) for t in TARGETS)
    a_ocr, b_ocr, c_ocr = (r.model(MODEL) for r in (a, b, c))
    b_text = b.model(TEXT_MODEL)
    beyond_b = outside_model_ms(b, MODEL) - outside_model_ms(a, MODEL)
    beyond_c = outside_model_ms(c, MODEL) - outside_model_ms(a, MODEL)
    around = b.stage_mean_ms("inference") - b_ocr.request_ms - b_text.request_ms
    a_hi, b_hi, c_hi = (suite.at(t, hi) for t in TARGETS)
    return [
        f"- **Image model alone vs the whole content chain, concurrency {lo}.** `{MODEL}` alone answers in "
        f"{a.p50:.1f} ms at p50 (mean {a.mean:.1f} ms, {a.throughput:.2f} images/s), {a_ocr.request_ms:.1f} ms of "
        f"it inside Triton. The whole chain takes {b.p50:.1f} ms over gRPC and {c.p50:.1f} ms over HTTP (p50): "
        f"{b.p50 - a.p50:+.1f} ms at p50, {b.mean - a.mean:+.1f} ms in the mean and {b.p99 - a.p99:+.1f} ms at "
        f"p99 (gRPC; HTTP {c.p50 - a.p50:+.1f} ms at p50), a throughput ratio of {b.throughput / a.throughput:.2f} "
        f"(HTTP {c.throughput / a.throughput:.2f}).",
        f"- **The part that is OCR.** In the chain Triton spent {b_ocr.request_ms:.1f} ms per image in `{MODEL}`, "
        f"{b_ocr.request_ms / b.mean:.0%} of the gRPC path's mean {b.mean:.1f} ms, and {b_text.request_ms:.2f} ms "
        f"in `{TEXT_MODEL}` on the recognised text. OCR's own time differs between the levels (`{MODEL}` in "
        f"Triton: {a_ocr.request_ms:.1f} ms direct, {b_ocr.request_ms:.1f} ms gRPC, {c_ocr.request_ms:.1f} ms "
        "HTTP) by as much as the mesh costs, so the steadier measure of the chain's cost is the time outside "
        f"`{MODEL}`: {beyond_b:+.1f} ms per image over gRPC and {beyond_c:+.1f} ms over HTTP compared with "
        f"direct. Over gRPC that is `{TEXT_MODEL}` {b_text.request_ms:.1f} ms, the inference service around "
        f"Triton {around:.1f} ms (two Triton calls, tensor conversions, the text model's micro-batch wait; a lower "
        "bound, since Triton's request timer stops only after the answer has left), preprocess "
        f"{b.stage_mean_ms('preprocess'):.1f} ms (PNG decode, tokenizing), postprocess "
        f"{b.stage_mean_ms('postprocess'):.1f} ms, {between_stages_ms(b):.1f} ms between the services (eight "
        "NATS messages, the PNG and the image tensor among them, and fusion) and "
        f"{b.mean - b.stage_mean_ms('gateway_total'):.1f} ms outside the gateway.",
        f"- **Load at concurrency {hi}.** Direct: {a_hi.throughput:.2f} images/s (p50 {a_hi.p50:.0f} ms, "
        f"mean batch {a_hi.model(MODEL).mean_batch:.2f}); the chain: {b_hi.throughput:.2f} images/s over gRPC and "
        f"{c_hi.throughput:.2f} over HTTP (p50 {b_hi.p50:.0f} / {c_hi.p50:.0f} ms), "
        f"{b_hi.throughput / a_hi.throughput:.0%} and {c_hi.throughput / a_hi.throughput:.0%} of direct. One OCR "
        "instance runs the images of a batch one after another, so it is the bottleneck: direct keeps it "
        f"{busy_pct(a):.0f}% busy already at concurrency {lo} and more workers add queueing (p50 ≈ C times the "
        f"per-image time) more than throughput. The chain leaves it idle while an image is elsewhere "
        f"({busy_pct(b):.0f}% busy at concurrency {lo}); at {hi} it is {busy_pct(b_hi):.0f}% busy. "
        + _cpu_or_idle(a_hi, b_hi),
        "- **Same answer.** Recognised text: "
        + ", ".join(f"{name} “{text}”" for name, text in suite.first.items())
        + ".",
    ]


def section(suite: SuiteRun, item: ImageInput) -> list[str]:
    return [
        f"## Image suite: `{MODEL}` alone vs the whole pipeline `{PIPELINE}`",
        "",
        *method(suite, item),
        "### Results",
        "",
        *results_table(suite),
        "",
        "### Mesh overhead (image model alone vs the whole content chain)",
        "",
        "Overhead = latency of the whole chain through the gateway minus latency of `ocr` direct at the same "
        "concurrency; it includes the text model's run on the OCR text, not only the mesh. Throughput ratio = "
        "gateway images/s ÷ direct images/s. The last column compares the time outside `ocr` (client mean minus "
        "Triton's own time for `ocr` per image), which OCR's own ups and downs do not move.",
        "",
        *tax_table(suite, "images", MODEL),
        "",
        "### Where the time goes",
        "",
        STAGE_LEGEND,
        "",
        *stage_table(suite, (MODEL, TEXT_MODEL)),
        "",
        "### Interpretation",
        "",
        *interpretation(suite),
        "",
    ]
