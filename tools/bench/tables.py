"""Tables both suite sections use: the mesh overhead and where a gateway request's time goes."""

from __future__ import annotations

from tools.bench.load import LevelResult
from tools.bench.runner import SuiteRun
from tools.bench.targets import TARGET_LABEL, VIA

#: The gateway's own stage timings (``timings_ms``), summed per service over a part's whole chain.
STAGES = ("preprocess", "inference", "postprocess")


def between_stages_ms(r: LevelResult) -> float:
    """Mean gateway time not spent inside a service: NATS hops, fusion, waiting for a worker."""
    return r.stage_mean_ms("gateway_total") - sum(r.stage_mean_ms(s) for s in STAGES)


def outside_model_ms(r: LevelResult, model: str) -> float:
    """Mean client latency not spent inside Triton on ``model``."""
    return r.mean - r.model(model).request_ms


def tax_table(run: SuiteRun, unit: str, model: str) -> list[str]:
    """Gateway minus direct at each level; ratios of latency and of throughput (``unit``/s).

    The last column compares the time *outside* ``model`` (client latency minus Triton's own time
    for it): the model's time moves from level to level by more than the mesh costs, and this
    difference does not move with it.
    """
    lines = [
        "| concurrency | via | p50 overhead ms | mean overhead ms | p99 overhead ms | p50 ratio "
        f"| throughput ratio (via / direct, {unit}/s) | mean overhead outside `{model}` ms |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for level in run.levels:
        a = run.at("triton", level)
        for via in VIA:
            b = run.at(via, level)
            lines.append(
                f"| {level} | {via} | {b.p50 - a.p50:+.2f} | {b.mean - a.mean:+.2f} | {b.p99 - a.p99:+.2f} | "
                f"{b.p50 / a.p50:.2f}x | {b.throughput / a.throughput:.2f} | "
                f"{outside_model_ms(b, model) - outside_model_ms(a, model):+.2f} |"
            )
    return lines


def stage_table(run: SuiteRun, models: tuple[str, ...]) -> list[str]:
    """Where a gateway request's mean latency goes, from the gateway's timings and Triton's counters."""
    triton_cols = " | ".join(f"Triton `{m}`" for m in models)
    lines = [
        f"| path | concurrency | client mean | gateway total | preprocess | inference service | {triton_cols} "
        "| postprocess | between stages | outside the gateway |",
        "|---|---:|" + "---:|" * (7 + len(models)),
    ]
    for level in run.levels:
        for via in VIA:
            r = run.at(via, level)
            total = r.stage_mean_ms("gateway_total")
            pre, inf, post = (r.stage_mean_ms(s) for s in STAGES)
            triton = " | ".join(f"{r.model(m).request_ms:.2f}" for m in models)
            lines.append(
                f"| {TARGET_LABEL[via]} | {level} | {r.mean:.2f} | {total:.2f} | {pre:.2f} | {inf:.2f} | {triton} "
                f"| {post:.2f} | {between_stages_ms(r):.2f} | {r.mean - total:.2f} |"
            )
    return lines


STAGE_LEGEND = (
    "All in ms, means per answered request. *gateway total*, *preprocess*, *inference service* and "
    "*postprocess* are the answer's own `timings_ms` (each service's handling time, summed over every stage of "
    "that service on the part's slip); *Triton* is Triton's `nv_inference_request_duration_us` per request "
    "(queue + compute, inside the inference service's time); *between stages* = gateway total - the three "
    "services (NATS hops, fusion, waiting for a free worker); *outside the gateway* = client mean - gateway "
    "total (client, HTTP/gRPC transport and the gateway's own edges)."
)
