"""Pure text rendering for loomctl: aligned tables, relative times, compact JSON and the trace waterfall.

Every function takes the monitor's JSON (see the monitor's API) and returns lines; nothing here
does I/O or reads the clock, so the output is the same for the same input.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

MIN_WIDTH = 100
BAR = "█"
QUEUE = "·"
SEVERITY_ORDER = {"P1": 0, "P2": 1, "warning": 2}
BAND_ORDER = {"alert": 0, "watch": 1, "stable": 2, "capturing": 3}
NUM_W = 8  # each of the waterfall's three number columns
MIN_LABEL = 40  # the span column's width limit lies between these two
MAX_LABEL = 60


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"


def ms(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def ago(delta_ms: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``, ``4d03h``."""
    s = max(0, int(delta_ms // 1000))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def utc(unix_ms: float | None) -> str:
    if unix_ms is None:
        return "-"
    when = datetime.fromtimestamp(unix_ms / 1000, UTC)
    return when.strftime("%Y-%m-%d %H:%M:%S.") + f"{when.microsecond // 1000:03d} UTC"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], right: Iterable[int] = ()) -> list[str]:
    """Columns two spaces apart; the columns in ``right`` (numbers) are right-aligned."""
    body = [list(r) for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in body)]) for i, h in enumerate(headers)]
    align_right = set(right)

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in align_right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [line(headers), *(line(r) for r in body)]


def pretty_json(value: Any, level: int = 0) -> str:
    """Indented JSON, except that a list of plain values (an embedding, a box) stays on one line."""
    pad = "  " * level
    if isinstance(value, dict) and value:
        items = [f"{pad}  {json.dumps(k)}: {pretty_json(v, level + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list) and any(isinstance(v, dict | list) for v in value):
        items = [f"{pad}  {pretty_json(v, level + 1)}" for v in value]
        return "[\n" + ",\n".join(items) + f"\n{pad}]"
    return json.dumps(value, ensure_ascii=False)


# --- dashboard pieces ---------------------------------------------------------------------------


def pipelines_table(pipelines: Sequence[Mapping[str, Any]]) -> list[str]:
    rows = []
    for p in sorted(pipelines, key=lambda p: str(p.get("pipeline"))):
        slo = p.get("slo") or {}
        rows.append(
            [
                str(p.get("pipeline")),
                str(p.get("requests", 0)),
                f"{float(p.get('throughput_rps') or 0.0):.2f}",
                ms(p.get("p50_ms")),
                ms(p.get("p95_ms")),
                ms(slo.get("latency_p95_ms")),
                pct(p.get("error_rate")),
                pct(slo.get("success")),
                "met" if p.get("slo_met") else "MISSED",
            ]
        )
    headers = ["PIPELINE", "REQUESTS", "RPS", "P50 ms", "P95 ms", "SLO P95 ms", "ERRORS", "SLO SUCCESS", "SLO"]
    return table(headers, rows, right=range(1, 8))


def triton_line(triton: Mapping[str, Any] | None) -> str:
    t = triton or {}
    parts = ["triton " + ("up" if t.get("up") else "DOWN")]
    parts.append(f"cpu {pct(t.get('cpu_utilization'))}")
    parts.append(f"gpu {pct(t.get('gpu_utilization'))}")
    mem = t.get("gpu_memory_used_bytes")
    if mem is not None:
        parts.append(f"gpu memory {float(mem) / 2**30:.2f} GiB")
    return ", ".join(parts)


def models_table(versions: Sequence[Mapping[str, Any]]) -> list[str]:
    def ready(v: Any) -> str:
        return "?" if v is None else ("yes" if v else "NO")

    def rollout(r: Any) -> str:
        return f"{r.get('stage')} {float(r.get('percent') or 0):g}%" if isinstance(r, dict) else "-"

    rows = [
        [
            str(v.get("model")),
            str(v.get("version")),
            ready(v.get("ready")),
            str(v.get("requests", 0)),
            pct(v.get("share")),
            ms(v.get("p50_ms")),
            ms(v.get("p95_ms")),
            ms(v.get("queue_us_per_request"), 0),
            ms(v.get("compute_us_per_request"), 0),
            rollout(v.get("rollout")),
        ]
        for v in sorted(versions, key=lambda v: (str(v.get("model")), str(v.get("version"))))
    ]
    headers = ["MODEL", "VERSION", "READY", "REQUESTS", "SHARE", "P50 ms", "P95 ms", "QUEUE us", "COMPUTE us"]
    return table([*headers, "ROLLOUT"], rows, right=range(3, 9))


def alerts_table(alerts: Sequence[Mapping[str, Any]], now_ms: float) -> list[str]:
    """Firing first, then by severity (P1, P2, warning), newest first."""

    def key(a: Mapping[str, Any]) -> tuple[bool, int, float]:
        sev = SEVERITY_ORDER.get(str(a.get("severity")), 9)
        return (a.get("state") != "firing", sev, -float(a.get("started_unix_ms") or 0))

    rows = []
    for a in sorted(alerts, key=key):
        labels = ",".join(f"{k}={v}" for k, v in sorted((a.get("labels") or {}).items()))
        resolved = a.get("resolved_unix_ms")
        rows.append(
            [
                str(a.get("severity")),
                str(a.get("name")),
                str(a.get("state")),
                labels or "-",
                clip(str(a.get("summary") or ""), 70),
                ago(now_ms - float(a.get("started_unix_ms") or now_ms)) + " ago",
                "-" if resolved is None else ago(now_ms - float(resolved)) + " ago",
            ]
        )
    return table(["SEVERITY", "NAME", "STATE", "LABELS", "SUMMARY", "SINCE", "RESOLVED"], rows)


def drift_table(features: Sequence[Mapping[str, Any]]) -> list[str]:
    """Worst band first, then by pipeline, model, version and feature."""

    def key(f: Mapping[str, Any]) -> tuple[Any, ...]:
        band = BAND_ORDER.get(str(f.get("band")), 9)
        return (band, *(str(f.get(k)) for k in ("pipeline", "model", "version", "feature", "kind")))

    rows = [
        [
            str(f.get("pipeline")),
            str(f.get("model")),
            str(f.get("version")),
            str(f.get("feature")),
            str(f.get("kind")),
            ms(f.get("psi"), 3),
            str(f.get("band")),
            f"{f.get('window_samples', 0)}/{f.get('baseline_samples', 0)}",
        ]
        for f in sorted(features, key=key)
    ]
    headers = ["PIPELINE", "MODEL", "VERSION", "FEATURE", "KIND", "PSI", "BAND", "SAMPLES window/baseline"]
    return table(headers, rows, right=[5])


def accuracy_table(rows_in: Sequence[Mapping[str, Any]]) -> list[str]:
    rows = [
        [
            str(a.get("pipeline")),
            str(a.get("model")),
            str(a.get("version")),
            str(a.get("samples", 0)),
            pct(a.get("accuracy")),
            pct(a.get("precision")),
            pct(a.get("recall")),
            pct(a.get("reference_accuracy")),
            ms(a.get("drop_points")),
        ]
        for a in sorted(rows_in, key=lambda a: (str(a.get("pipeline")), str(a.get("model")), str(a.get("version"))))
    ]
    headers = ["PIPELINE", "MODEL", "VERSION", "SAMPLES", "ACCURACY", "PRECISION", "RECALL", "REFERENCE", "DROP pts"]
    return table(headers, rows, right=range(3, 9))


# --- the trace waterfall ------------------------------------------------------------------------


def bar(start: float, duration: float, wait: float, total: float, cells: int) -> str:
    """``cells`` characters: blank, then the queue wait as ``·``, then the span as ``█`` (at least one cell).

    The wait is drawn just before the span starts: it is the time the work sat in a queue
    (NATS, a batcher, Triton) before this span picked it up.
    """
    if cells <= 0:
        return ""
    scale = cells / total if total > 0 else 0.0

    def col(t: float) -> int:
        return min(cells, max(0, round(t * scale)))

    a = min(col(start), cells - 1)
    b = min(cells, max(a + 1, col(start + duration)))
    q = a
    if wait > 0:
        q = col(start - wait)
        if q == a and a > 0:
            q = a - 1  # a wait shorter than a cell still shows
    return " " * q + QUEUE * (a - q) + BAR * (b - a) + " " * (cells - b)


def _label(span: Mapping[str, Any], limit: int) -> str:
    """Indent, service, name; a failed span ends in ``[ERROR]``, which clipping a long name never hides."""
    text = "  " * int(span.get("depth") or 0) + f"{span.get('service', '?')}  {span.get('name', '')}"
    mark = " [ERROR]" if span.get("status") == "ERROR" else ""
    return clip(text, limit - len(mark)) + mark


def waterfall(trace: Mapping[str, Any], width: int = MIN_WIDTH) -> list[str]:
    """A header, then one line per span (in the order given, which is tree order), each line ``width`` long."""
    width = max(width, MIN_WIDTH)
    spans: list[Mapping[str, Any]] = list(trace.get("spans") or [])
    ends = [float(s.get("start_ms") or 0) + float(s.get("duration_ms") or 0) for s in spans]
    total = max([float(trace.get("duration_ms") or 0.0), *ends])
    errors = sum(1 for s in spans if s.get("status") == "ERROR")
    lines = [
        f"trace     {trace.get('trace_id', '?')}",
        f"request   {trace.get('request_id') or '-'}",
        f"pipeline  {trace.get('pipeline') or '-'}",
        f"total     {total:.2f} ms, {len(spans)} spans, {errors} failed, started {utc(trace.get('start_unix_ms'))}",
        f"services  {', '.join(str(s) for s in trace.get('services') or []) or '-'}",
        "",
    ]
    fixed = 3 * (NUM_W + 1) + 1 + 2  # the number columns, the space before the bar, its two borders
    limit = min(MAX_LABEL, max(MIN_LABEL, (width - fixed) // 2))  # the bar gets at least half of the rest
    labels = [_label(s, limit) for s in spans]
    label_w = max([len("SPAN"), *(len(x) for x in labels)])
    cells = width - fixed - label_w
    numbers = f"{'START ms':>{NUM_W}} {'DUR ms':>{NUM_W}} {'QUEUE ms':>{NUM_W}}"
    lines.append(f"{'SPAN':<{label_w}} {numbers} {_axis(total, cells)}")
    for span, label in zip(spans, labels, strict=True):
        start = float(span.get("start_ms") or 0.0)
        duration = float(span.get("duration_ms") or 0.0)
        wait = span.get("queue_wait_ms")
        queue = "" if wait is None else f"{float(wait):.2f}"
        cols = f"{start:>{NUM_W}.2f} {duration:>{NUM_W}.2f} {queue:>{NUM_W}}"
        drawn = bar(start, duration, float(wait or 0.0), total, cells)
        lines.append(f"{label:<{label_w}} {cols} |{drawn}|")
    return lines


def _axis(total: float, cells: int) -> str:
    """``|0 ms      <half>      <total> ms|``, as wide as a bar with its borders."""
    left, mid, right = "0 ms", f"{total / 2:.1f}", f"{total:.1f} ms"
    inner = list(left.ljust(cells))
    start = cells // 2 - len(mid) // 2
    if start > len(left) + 1 and start + len(mid) < cells - len(right) - 1:
        inner[start : start + len(mid)] = mid
    inner[cells - len(right) :] = right
    return "|" + "".join(inner)[:cells] + "|"


def _labels(labels: Any, n: int = 3) -> str:
    rows = [f"{lab.get('label', '?')} {float(lab.get('score', 0.0)):.2f}" for lab in (labels or [])[:n]]
    return ", ".join(rows) or "-"


def answer_summary(answer: dict[str, Any]) -> str:
    """A predict answer for people: ids, fused topics, and per output its model version, route and result."""
    lines = [f"request  {answer.get('request_id', '-')}   trace {answer.get('trace_id', '-')}"]
    if answer.get("degraded"):
        lines.append(f"DEGRADED: missing {', '.join(answer.get('missing') or []) or '-'}")
    if answer.get("topics"):
        lines.append(f"topics   {_labels(answer['topics'])}")
    notes = answer.get("notes") or {}
    for name, out in sorted((answer.get("outputs") or {}).items()):
        route = notes.get(f"{name}/inference.route")
        served = f"{out.get('model', '?')} v{out.get('model_version') or '?'}" + (f" ({route})" if route else "")
        if "ocr" in out:
            what = f"{len(out['ocr'])} lines: {str(out.get('text', ''))[:60]!r}; topics {_labels(out.get('topics'))}"
        elif "speech_segments" in out:
            what = f"{len(out['speech_segments'])} speech segments, speech {float(out.get('speech_ratio', 0)):.0%}"
        else:
            what = f"labels {_labels(out.get('labels'))}"
        lines.append(f"{name:<8} {served}  {what}")
    for name, err in sorted((answer.get("errors") or {}).items()):
        lines.append(f"{name:<8} error {err.get('code', '?')}: {err.get('message', '')}")
    total = (answer.get("timings_ms") or {}).get("gateway_total")
    if total is not None:
        lines.append(f"took     {float(total):.1f} ms")
    return "\n".join(lines)
