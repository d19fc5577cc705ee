"""The text suite's section of BENCHMARKS.md: ``minilm`` direct vs the ``embed`` pipeline."""

from __future__ import annotations

from tools.bench.runner import SuiteRun
from tools.bench.tables import STAGE_LEGEND, between_stages_ms, stage_table, tax_table
from tools.bench.targets import TARGET_LABEL, TARGETS
from tools.bench.text_targets import EMBED_DIM, MODEL, TextInput, cosine


def results_table(suite: SuiteRun) -> list[str]:
    lines = [
        "| path | concurrency | requests | p50 ms | p90 ms | p99 ms | mean ms | throughput req/s "
        "| Triton mean batch | other CPU % | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in suite.results:
        lines.append(
            f"| {TARGET_LABEL[r.target]} | {r.concurrency} | {r.requests} | {r.p50:.2f} | {r.p90:.2f} | "
            f"{r.p99:.2f} | {r.mean:.2f} | {r.throughput:.1f} | {r.model(MODEL).mean_batch:.1f} | "
            f"{r.foreign_cpu_pct:.0f} | {r.errors} |"
        )
    return lines


def method(suite: SuiteRun, item: TextInput) -> list[str]:
    return [
        "### Method",
        "",
        f"- Model `{MODEL}` (all-MiniLM-L6-v2 int8 ONNX in Triton's python backend, dynamic batching). "
        f"Input text ({len(item.text)} characters, {item.tokens} tokens): “{item.text}”",
        "- **(a)** gets the tensors the preprocess service produces (`TextTokenizer`: `input_ids`, "
        "`attention_mask`, `token_type_ids`) in the shape the inference service sends (`[1, seq]` int64, built per "
        "request by the service's own `to_inputs`); tokenization is done once, outside the timing. **(b)** and "
        '**(c)** send the text to pipeline `embed` (`pipeline="embed"`, `POST /v1/pipelines/embed:predict`): '
        "tokenize → `minilm` → L2 normalisation and topic labels → fusion.",
        f"- {suite.requests} measured requests per path and level; levels {', '.join(map(str, suite.levels))}. "
        f"Warm-up: one request per path until it succeeds, then {suite.warmup} per path at concurrency "
        f"{max(suite.levels)}, and {suite.rewarm} (at least C) more before each level; none is counted.",
        f"- Triton mean batch = `nv_inference_count` / `nv_inference_exec_count` for `{MODEL}` over the level: "
        "items per model execution (the inference service's micro-batches and Triton's dynamic batcher "
        "together). An error is any exception, non-200, degraded or cached answer, or an embedding that is not "
        f"{EMBED_DIM} floats.",
        "",
    ]


def interpretation(suite: SuiteRun) -> list[str]:
    lo, hi = min(suite.levels), max(suite.levels)
    a_lo, b_lo, c_lo = (suite.at(t, lo) for t in TARGETS)
    a_hi, b_hi = suite.at("triton", hi), suite.at("gateway-grpc", hi)
    lines = [
        f"- **Latency at concurrency {lo}.** Triton alone answers in {a_lo.p50:.2f} ms (p50); the same text "
        f"through the gateway takes {b_lo.p50:.2f} ms over gRPC and {c_lo.p50:.2f} ms over HTTP, so the mesh "
        f"adds {b_lo.p50 - a_lo.p50:.2f} ms at p50 and {b_lo.p99 - a_lo.p99:.2f} ms at p99 (gRPC). That is the "
        "cost of the gateway, tokenization in the preprocess service, five NATS messages through nats-server "
        "(gateway → preprocess → inference → postprocess → fusion → gateway), protobuf (de)serialisation in "
        "each Python process, postprocessing (L2 normalisation, topics) and fusion, paid on every request; the "
        f"model's own compute is in both numbers. Of the gRPC path's mean {b_lo.mean:.2f} ms, Triton's own time "
        f"for `{MODEL}` is {b_lo.model(MODEL).request_ms:.2f} ms; the inference service adds "
        f"{b_lo.stage_mean_ms('inference') - b_lo.model(MODEL).request_ms:.2f} ms around it (at concurrency 1 "
        "each part also waits out the micro-batcher's delay, 2 ms by default, for company that never comes), "
        f"{between_stages_ms(b_lo):.2f} ms pass between the services (NATS hops, fusion), preprocess and "
        f"postprocess take {b_lo.stage_mean_ms('preprocess') + b_lo.stage_mean_ms('postprocess'):.2f} ms and "
        f"{b_lo.mean - b_lo.stage_mean_ms('gateway_total'):.2f} ms are outside the gateway (client, transport).",
        f"- **Load at concurrency {hi}.** Triton direct reaches {a_hi.throughput:.0f} req/s "
        f"(p50 {a_hi.p50:.1f} ms, p99 {a_hi.p99:.1f} ms, mean batch {a_hi.model(MODEL).mean_batch:.1f}); through "
        f"the gateway {b_hi.throughput:.0f} req/s (p50 {b_hi.p50:.1f} ms, p99 {b_hi.p99:.1f} ms, mean batch "
        f"{b_hi.model(MODEL).mean_batch:.1f}), i.e. {b_hi.throughput / a_hi.throughput:.0%} of direct. The "
        "mesh's extra work is CPU work on the same cores that run the model, so at saturation its cost shows up "
        "as lost throughput and longer queues rather than as a fixed per-request delay. "
        + (
            "Triton direct has the worse p99 here: requests that all return together arrive together, and the "
            "dynamic batcher (preferred sizes 8/16/32, 2 ms queue delay, one model instance) splits them into "
            "batches that queue behind each other; the mesh spreads arrivals out."
            if b_hi.p99 < a_hi.p99
            else "Triton's dynamic batcher (preferred sizes 8/16/32, 2 ms queue delay, one instance) batches "
            "both paths; the mesh's processes add queueing of their own."
        ),
        f"- **Same answer.** Cosine similarity of the embedding from Triton direct and from the gateway: "
        f"{cosine(suite.first['triton'], suite.first['gateway-grpc']):.6f} (gRPC), "
        f"{cosine(suite.first['triton'], suite.first['gateway-http']):.6f} (HTTP) — the gateway's embedding is "
        "the L2-normalised mean pooling of the same tensor, so the comparison is like for like.",
    ]
    return lines


def section(suite: SuiteRun, item: TextInput) -> list[str]:
    return [
        f"## Text suite: `{MODEL}` direct vs pipeline `embed`",
        "",
        *method(suite, item),
        "### Results",
        "",
        *results_table(suite),
        "",
        "### Mesh overhead",
        "",
        "Overhead = latency through the gateway minus latency of Triton direct at the same concurrency "
        "(positive: the mesh is slower). Throughput ratio = gateway req/s ÷ direct req/s. The last column "
        f"compares the time outside `{MODEL}`: client mean minus Triton's own time for `{MODEL}` per request.",
        "",
        *tax_table(suite, "req", MODEL),
        "",
        "### Where the time goes",
        "",
        STAGE_LEGEND,
        "",
        *stage_table(suite, (MODEL,)),
        "",
        "### Interpretation",
        "",
        *interpretation(suite),
        "",
    ]
