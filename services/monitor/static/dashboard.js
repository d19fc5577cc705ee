/* Loom monitor dashboard.
 *
 * Every API call carries the caller's key (role viewer) as Authorization: Bearer. The page takes
 * it from the URL fragment (#key=..., dropped from the address bar at once) or asks for it, and
 * keeps it in sessionStorage: this tab only, gone when the tab closes, never a cookie.
 *
 * Polls v1/dashboard every 2 s and redraws each panel whose data changed, with plain DOM
 * nodes and inline SVG (no innerHTML: every API string lands in a text node or attribute).
 * Numbers a test may read sit in elements with data-value="<name>"; data-raw holds the
 * unformatted number (fractions stay fractions even where the text shows a percentage).
 */
(function () {
  "use strict";

  const POLL_MS = 2000;
  const FETCH_TIMEOUT_MS = 5000;
  const SVG_NS = "http://www.w3.org/2000/svg";
  // The script lives at <base>/static/dashboard.js; the API sits at <base>/v1/... . Resolving
  // from the script's own URL keeps working behind a proxy path prefix.
  const BASE = document.currentScript && document.currentScript.src
    ? new URL("../", document.currentScript.src)
    : new URL("./", window.location.href);

  const LINE = { p50: "#2f6fdb", p95: "#e0861b", p99: "#cf3c3c", rps: "#17917f", err: "#cf3c3c" };
  const PALETTE = ["#2f6fdb", "#e0861b", "#2b9a57", "#8a57cf", "#cf3c3c", "#17917f", "#c2478f", "#6b7280"];
  const SERVICE_COLORS = {
    gateway: "#2f6fdb", preprocess: "#17917f", inference: "#8a57cf", triton: "#5f9e0f",
    postprocess: "#e0861b", fusion: "#c2478f", monitor: "#6b7280",
  };
  const SEVERITY_ORDER = { P1: 0, P2: 1, warning: 2 };
  const BAND_ORDER = { alert: 0, watch: 1, stable: 2, capturing: 3 };
  const BAND_TEXT = { stable: "stable", watch: "watch", alert: "alert", capturing: "capturing" };

  const state = { lastOk: 0, failing: false, keys: {}, selected: null, traceRequest: 0, data: null, timer: 0 };

  // ---------------------------------------------------------------- DOM helpers

  function build(el, attrs, children) {
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "style") {
        for (const [prop, v] of Object.entries(value)) el.style.setProperty(prop, String(v));
      } else if (key.startsWith("on")) {
        el.addEventListener(key.slice(2), value);
      } else {
        el.setAttribute(key, value === true ? "" : String(value));
      }
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : String(child));
    }
    return el;
  }
  const h = (tag, attrs, ...children) => build(document.createElement(tag), attrs, children);
  const s = (tag, attrs, ...children) => build(document.createElementNS(SVG_NS, tag), attrs, children);
  const empty = (text) => h("p", { class: "empty" }, text);

  // ---------------------------------------------------------------- formatting

  const isNum = (v) => typeof v === "number" && Number.isFinite(v);
  const DASH = "—";

  function scaled(v, a, b, c) {
    // Fewer decimals as the number grows: <10 -> a, <100 -> b, else c.
    if (!isNum(v)) return DASH;
    const abs = Math.abs(v);
    return v.toFixed(abs < 10 ? a : abs < 100 ? b : c);
  }
  const fmtMs = (v) => scaled(v, 2, 1, 0);
  const fmtRps = (v) => scaled(v, 2, 1, 0);
  const fmtUs = (v) => (isNum(v) && Math.abs(v) >= 1000 ? Math.round(v).toLocaleString("en-US") : scaled(v, 2, 1, 0));
  const fmtPct = (fraction, digits = 1) => (isNum(fraction) ? (fraction * 100).toFixed(digits) : DASH);
  const fmtInt = (v) => (isNum(v) ? Math.round(v).toLocaleString("en-US") : DASH);
  const fmtFixed = (v, digits) => (isNum(v) ? v.toFixed(digits) : DASH);

  function fmtBytes(v) {
    if (!isNum(v)) return [DASH, ""];
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
    return [scaled(v, 2, 1, 0), units[i]];
  }

  const pad = (n) => String(n).padStart(2, "0");
  function fmtClock(ms) {
    if (!isNum(ms)) return DASH;
    const d = new Date(ms);
    return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }
  function fmtAgo(ms) {
    const sec = Math.max(0, Math.round(ms / 1000));
    if (sec < 60) return `${sec}s`;
    const min = Math.floor(sec / 60);
    if (min < 60) return `${min}m ${pad(sec % 60)}s`;
    const hr = Math.floor(min / 60);
    if (hr < 24) return `${hr}h ${pad(min % 60)}m`;
    return `${Math.floor(hr / 24)}d ${hr % 24}h`;
  }
  function trimNum(v) {
    const abs = Math.abs(v);
    const text = v.toFixed(abs >= 100 ? 0 : abs >= 10 ? 1 : abs >= 1 ? 2 : 3);
    return text.includes(".") ? text.replace(/\.?0+$/, "") : text;
  }

  /* A readable number: <span data-value=name data-raw=raw>text</span> plus an optional unit. */
  function num(name, raw, text, unit, cls) {
    const rawText = raw === null || raw === undefined ? "" : String(raw);
    return h("span", { class: "num" + (cls ? " " + cls : "") },
      h("span", { "data-value": name, "data-raw": rawText }, text),
      unit && text !== DASH ? h("span", { class: "unit" }, unit) : null);
  }
  const tile = (label, ...value) => h("div", { class: "tile" },
    h("div", { class: "tile-label" }, label), h("div", { class: "tile-value" }, value));

  const serviceColor = (name) => SERVICE_COLORS[name] || PALETTE[hash(String(name)) % PALETTE.length];
  function hash(text) {
    let x = 0;
    for (let i = 0; i < text.length; i += 1) x = (x * 31 + text.charCodeAt(i)) >>> 0;
    return x;
  }
  const burnClass = (v) => (!isNum(v) ? "" : v > 14.4 ? "bad" : v > 1 ? "warn" : "");

  // ---------------------------------------------------------------- charts

  function niceStep(range, count) {
    const raw = Math.max(range, 1e-9) / Math.max(1, count);
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    for (const m of [1, 2, 2.5, 5, 10]) if (raw <= m * mag + 1e-12) return m * mag;
    return 10 * mag;
  }

  /* Domain and ticks for values: from 0 (or just below the data with autoFloor) to a round top. */
  function yAxis(values, opts) {
    const finite = values.filter(isNum);
    let lo = 0;
    let hi = finite.length ? Math.max(...finite) : 1;
    if (opts.autoFloor && finite.length) {
      const min = Math.min(...finite);
      lo = Math.max(0, min - Math.max((hi - min) * 0.5, hi * 0.02));
      if (hi === min) {  // one point, or a flat line: centre it rather than pin it to the top edge
        const pad = Math.max(Math.abs(min) * 0.1, 0.01);
        lo = Math.max(0, min - pad);
        hi = min + pad;
      }
    }
    if (hi <= lo) hi = lo + (lo ? Math.abs(lo) * 0.1 : 1);
    const step = niceStep(hi - lo, 4);
    lo = Math.floor(lo / step + 1e-9) * step;
    hi = Math.ceil(hi / step - 1e-9) * step;
    if (opts.ceil !== undefined) hi = Math.min(hi, opts.ceil);
    if (hi <= lo) hi = lo + step;
    const ticks = [];
    for (let v = lo; v <= hi + step * 1e-6; v += step) ticks.push(v);
    return { lo, hi, ticks };
  }

  function pathFor(points, x, y) {
    let d = "";
    let pen = false;
    for (const p of points) {
      if (!isNum(p.v)) { pen = false; continue; }
      d += `${pen ? "L" : "M"}${x(p.t).toFixed(1)} ${y(p.v).toFixed(1)}`;
      pen = true;
    }
    return d;
  }

  const lastValue = (points) => {
    for (let i = points.length - 1; i >= 0; i -= 1) if (isNum(points[i].v)) return points[i].v;
    return null;
  };

  /* A line chart: figure > figcaption (title + legend) + svg.chart with one .series element per line: a
   * path.series from two points on, a circle.series (a dot) while a line has only one point.
   * opts: {key, title, series:[{key,name,color,points:[{t,v}]}], fmt(v)->text, scale, unit,
   *        refLines:[{v,label}], autoFloor, ceil, empty, width, height} */
  function lineChart(opts) {
    const W = opts.width || 440;
    const H = opts.height || 150;
    const m = { l: 50, r: 10, t: 8, b: 20 };
    const pw = W - m.l - m.r;
    const ph = H - m.t - m.b;
    const scale = opts.scale || 1;
    const fmt = opts.fmt || ((v) => trimNum(v * scale));
    const series = opts.series.map((sr) => ({ ...sr, points: (sr.points || []).filter((p) => isNum(p.t)) }));
    const drawable = series.filter((sr) => sr.points.some((p) => isNum(p.v)));

    const times = [...new Set(series.flatMap((sr) => sr.points.map((p) => p.t)))].sort((a, b) => a - b);
    let t0 = times.length ? times[0] : Date.now() - 60000;
    let t1 = times.length ? times[times.length - 1] : Date.now();
    if (t1 <= t0) { t0 -= 5000; t1 += 5000; }
    const axis = yAxis(drawable.flatMap((sr) => sr.points.map((p) => p.v)), opts);
    const x = (t) => m.l + ((t - t0) / (t1 - t0)) * pw;
    const y = (v) => m.t + ph - ((Math.min(Math.max(v, axis.lo), axis.hi) - axis.lo) / (axis.hi - axis.lo)) * ph;

    const root = s("svg", {
      class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": opts.title, "data-chart": opts.key,
    });
    axis.ticks.forEach((v, i) => {
      const top = i === axis.ticks.length - 1;
      root.append(
        s("line", { class: "grid", x1: m.l, x2: W - m.r, y1: y(v), y2: y(v) }),
        s("text", { class: "tick", x: m.l - 6, y: y(v) + 3.5, "text-anchor": "end" },
          trimNum(v * scale) + (top && opts.unit ? " " + opts.unit : "")),
      );
    });
    root.append(s("line", { class: "axis", x1: m.l, x2: W - m.r, y1: m.t + ph, y2: m.t + ph }));
    if (times.length) {
      for (let i = 0; i < 4; i += 1) {
        const t = t0 + ((t1 - t0) * i) / 3;
        const anchor = i === 0 ? "start" : i === 3 ? "end" : "middle";
        root.append(s("text", { class: "tick", x: x(t), y: H - 5, "text-anchor": anchor }, fmtClock(t)));
      }
    }
    if (!drawable.length) {
      root.append(s("text", { class: "chart-empty", x: m.l + pw / 2, y: m.t + ph / 2 + 4, "text-anchor": "middle" },
        opts.empty || "no traffic yet"));
    }
    for (const ref of opts.refLines || []) {
      if (!isNum(ref.v) || ref.v < axis.lo || ref.v > axis.hi) continue;
      root.append(
        s("line", { class: "ref", x1: m.l, x2: W - m.r, y1: y(ref.v), y2: y(ref.v) }),
        s("text", { class: "ref-label", x: W - m.r - 2, y: y(ref.v) - 3, "text-anchor": "end" }, ref.label),
      );
    }
    for (const sr of drawable) {
      const last = [...sr.points].reverse().find((p) => isNum(p.v));
      if (sr.points.filter((p) => isNum(p.v)).length === 1) {
        root.append(s("circle", { class: "series dot", "data-series": sr.key, cx: x(last.t), cy: y(last.v), r: 3.2, fill: sr.color }));
        continue;
      }
      root.append(s("path", { class: "series", "data-series": sr.key, d: pathFor(sr.points, x, y), stroke: sr.color }));
      root.append(s("circle", { class: "last", cx: x(last.t), cy: y(last.v), r: 2.6, fill: sr.color }));
    }
    // Invisible columns, one per time, whose tooltip lists every series' value at that time.
    if (drawable.length) {
      times.forEach((t, i) => {
        const left = i === 0 ? x(t) : (x(times[i - 1]) + x(t)) / 2;
        const right = i === times.length - 1 ? x(t) : (x(t) + x(times[i + 1])) / 2;
        const lines = [fmtClock(t)];
        for (const sr of drawable) {
          const p = sr.points.find((q) => q.t === t);
          if (p) lines.push(`${sr.name}: ${isNum(p.v) ? fmt(p.v) : DASH}${opts.unit ? " " + opts.unit : ""}`);
        }
        root.append(s("rect", { class: "hover-col", x: left, y: m.t, width: Math.max(right - left, 1), height: ph },
          s("title", null, lines.join("\n"))));
      });
    }

    const legend = h("span", { class: "legend" }, series.map((sr) => {
      const v = lastValue(sr.points);
      return h("span", { class: "legend-item" },
        h("span", { class: "swatch", style: { background: sr.color } }), sr.name,
        isNum(v) ? h("span", { class: "legend-value" }, fmt(v) + (opts.unit ? " " + opts.unit : "")) : null);
    }));
    return h("figure", { class: "chart-box" }, h("figcaption", null, h("span", { class: "chart-title" }, opts.title), legend), root);
  }

  /* PSI history with the 0.1 / 0.2 band lines over faint stable/watch/alert bands. */
  function sparkline(history) {
    const W = 150;
    const H = 34;
    const pts = (history || []).filter((p) => isNum(p.t) && isNum(p.psi));
    const top = Math.max(0.3, ...pts.map((p) => p.psi * 1.15));
    const y = (v) => H - 2 - (Math.min(v, top) / top) * (H - 4);
    const root = s("svg", { class: "chart spark", viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img", "aria-label": "PSI history" },
      s("rect", { class: "band-bg alert", x: 0, y: 0, width: W, height: y(0.2) }),
      s("rect", { class: "band-bg watch", x: 0, y: y(0.2), width: W, height: y(0.1) - y(0.2) }),
      s("rect", { class: "band-bg stable", x: 0, y: y(0.1), width: W, height: H - y(0.1) }),
      s("line", { class: "band-line", "data-band": "0.2", x1: 0, x2: W, y1: y(0.2), y2: y(0.2) }),
      s("line", { class: "band-line", "data-band": "0.1", x1: 0, x2: W, y1: y(0.1), y2: y(0.1) }));
    if (pts.length === 1) {
      root.append(s("circle", { class: "series dot", "data-series": "psi", cx: W / 2, cy: y(pts[0].psi), r: 2.6 }));
      root.append(s("title", null, `${fmtClock(pts[0].t)}  PSI ${pts[0].psi.toFixed(3)}`));
    } else if (pts.length >= 2) {
      const t0 = pts[0].t;
      const t1 = pts[pts.length - 1].t;
      const x = (t) => 2 + ((t - t0) / Math.max(t1 - t0, 1)) * (W - 6);
      root.append(s("path", { class: "series", "data-series": "psi", d: pathFor(pts.map((p) => ({ t: p.t, v: p.psi })), x, y) }));
      const last = pts[pts.length - 1];
      root.append(s("circle", { class: "last", cx: x(last.t), cy: y(last.psi), r: 2.2 }));
      root.append(s("title", null, pts.map((p) => `${fmtClock(p.t)}  PSI ${p.psi.toFixed(3)}`).slice(-8).join("\n")));
    } else {
      root.append(s("text", { class: "chart-empty", x: W / 2, y: H / 2 + 4, "text-anchor": "middle" }, "no history yet"));
    }
    return root;
  }

  /* Horizontal p50 (solid) over p95 (light) bars, one row per stage, shared scale. */
  function stageBars(rows) {
    const W = 600;
    const rowH = 24;
    const labelW = 230;
    const valueW = 140;
    const barW = W - labelW - valueW;
    const H = rows.length * rowH + 20;
    const axis = yAxis(rows.flatMap((r) => [r.p95_ms, r.p50_ms]), {});
    const x = (v) => labelW + (Math.min(Math.max(v, 0), axis.hi) / axis.hi) * barW;
    const root = s("svg", { class: "chart bars", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "stage latency" });
    for (const v of axis.ticks) {
      root.append(s("line", { class: "grid", x1: x(v), x2: x(v), y1: 0, y2: H - 16 }),
        s("text", { class: "tick", x: x(v), y: H - 4, "text-anchor": "middle" }, trimNum(v) + (v === axis.hi ? " ms" : "")));
    }
    rows.forEach((r, i) => {
      const top = i * rowH;
      const color = serviceColor(r.service);
      const label = `${r.service} · ${r.stage}`;
      const short = label.length > 34 ? label.slice(0, 33) + "…" : label;
      const tip = `${label}\ncount ${fmtInt(r.count)} · errors ${fmtInt(r.errors)}\n` +
        `mean ${fmtMs(r.mean_ms)} · p50 ${fmtMs(r.p50_ms)} · p95 ${fmtMs(r.p95_ms)} · p99 ${fmtMs(r.p99_ms)} ms`;
      root.append(s("g", { class: "stage-row", "data-service": r.service, "data-stage": r.stage },
        s("title", null, tip),
        s("circle", { cx: 6, cy: top + rowH / 2, r: 4, fill: color }),
        s("text", { class: "bar-label", x: 16, y: top + rowH / 2 + 4 }, short),
        s("rect", { class: "bar-track", x: labelW, y: top + 5, width: barW, height: rowH - 10, rx: 2 }),
        isNum(r.p95_ms) ? s("rect", { class: "bar p95", x: labelW, y: top + 5, width: x(r.p95_ms) - labelW, height: rowH - 10, rx: 2, fill: color }) : null,
        isNum(r.p50_ms) ? s("rect", { class: "bar p50", x: labelW, y: top + 5, width: x(r.p50_ms) - labelW, height: rowH - 10, rx: 2, fill: color }) : null,
        s("text", { class: "bar-value", x: W - valueW + 8, y: top + rowH / 2 + 4 },
          s("tspan", { "data-value": "p50_ms", "data-raw": r.p50_ms ?? "" }, fmtMs(r.p50_ms)),
          s("tspan", { class: "muted" }, " / "),
          s("tspan", { "data-value": "p95_ms", "data-raw": r.p95_ms ?? "" }, fmtMs(r.p95_ms)),
          s("tspan", { class: "muted" }, " ms"),
          r.errors ? s("tspan", { class: "err", "data-value": "errors", "data-raw": r.errors }, `  ${fmtInt(r.errors)} err`) : null)));
    });
    return root;
  }

  // ---------------------------------------------------------------- panels

  function renderSummary(doc) {
    const pipelines = doc.pipelines || [];
    const alerts = doc.alerts || [];
    const versions = (doc.models && doc.models.versions) || [];
    const totalRps = pipelines.reduce((acc, p) => acc + (isNum(p.throughput_rps) ? p.throughput_rps : 0), 0);
    const worst = alerts.map((a) => a.severity).sort((a, b) => (SEVERITY_ORDER[a] ?? 9) - (SEVERITY_ORDER[b] ?? 9))[0];
    const ready = versions.filter((v) => v.ready === true).length;
    document.getElementById("summary").replaceChildren(
      h("span", { class: "chip" }, num("pipeline_count", pipelines.length, String(pipelines.length)), " pipelines"),
      h("span", { class: "chip" }, num("total_rps", totalRps, fmtRps(totalRps), "rps")),
      h("span", { class: "chip" }, num("models_ready", ready, String(ready)), ` / ${versions.length} models ready`),
      h("a", { class: "chip alerts-chip" + (worst ? " sev-" + worst : ""), href: "#alerts" },
        num("active_alerts", alerts.length, String(alerts.length)), alerts.length === 1 ? " alert" : " alerts"));
  }

  function renderAlerts(body, doc, meta) {
    const now = isNum(doc.generated_unix_ms) ? doc.generated_unix_ms : Date.now();
    const alerts = [...(doc.alerts || [])].sort((a, b) =>
      (SEVERITY_ORDER[a.severity] ?? 9) - (SEVERITY_ORDER[b.severity] ?? 9) || a.started_unix_ms - b.started_unix_ms);
    const counts = {};
    for (const a of alerts) counts[a.severity] = (counts[a.severity] || 0) + 1;
    meta.replaceChildren(num("alert_count", alerts.length, String(alerts.length)), " firing",
      ...Object.keys(counts).map((sev) => h("span", { class: "sev sev-" + sev }, `${sev} × ${counts[sev]}`)));
    if (!alerts.length) {
      body.replaceChildren(h("p", { class: "empty all-clear" }, "no active alerts — all clear"));
      return;
    }
    body.replaceChildren(h("div", { class: "alert-list" }, alerts.map((a) => {
      const since = isNum(a.started_unix_ms) ? now - a.started_unix_ms : null;
      return h("div", { class: "alert sev-" + a.severity, "data-alert-id": a.id, "data-name": a.name, "data-severity": a.severity },
        h("span", { class: "sev sev-" + a.severity }, a.severity),
        h("div", { class: "alert-main" },
          h("div", { class: "alert-title" }, h("strong", null, a.name),
            Object.entries(a.labels || {}).map(([k, v]) => h("span", { class: "label" }, h("span", { class: "label-key" }, k + "="), v))),
          h("div", { class: "alert-summary" }, a.summary || "")),
        h("div", { class: "alert-side" },
          h("div", null, "value ", num("value", a.value, isNum(a.value) ? trimNum(a.value) : DASH)),
          h("div", { title: "since " + new Date(a.started_unix_ms).toLocaleString() }, "since ", fmtClock(a.started_unix_ms), " · ",
            num("since_s", since === null ? null : Math.round(since / 1000), since === null ? DASH : fmtAgo(since)), " ago")));
    })));
  }

  function pipelineCard(p) {
    const slo = p.slo || {};
    const burn = p.burn_rate || {};
    const avail = burn.availability || {};
    const lat = burn.latency || {};
    const series = p.series || [];
    const pts = (key) => series.map((pt) => ({ t: pt.t, v: pt[key] }));
    const overSlo = isNum(p.p95_ms) && isNum(slo.latency_p95_ms) && p.p95_ms > slo.latency_p95_ms;
    const noTraffic = !p.requests && !series.some((pt) => pt.rps > 0);
    const budget = isNum(slo.success) ? 1 - slo.success : null;
    return h("article", { class: "card pipeline", "data-pipeline": p.pipeline },
      h("header", { class: "card-head" },
        h("h3", null, p.pipeline),
        h("span", { class: "pill " + (p.slo_met ? "ok" : "bad"), "data-value": "slo_met", "data-raw": String(!!p.slo_met) },
          p.slo_met ? "SLO met" : "SLO breached"),
        h("span", { class: "muted slo-target" }, "target p95 ≤ ",
          num("slo_latency_p95_ms", slo.latency_p95_ms, fmtMs(slo.latency_p95_ms), "ms"), " · success ≥ ",
          num("slo_success", slo.success, fmtPct(slo.success, 2), "%"), ` · window ${isNum(p.window_s) ? p.window_s + " s" : DASH}`)),
      h("div", { class: "tiles" },
        tile("throughput", num("rps", p.throughput_rps, fmtRps(p.throughput_rps), "rps")),
        tile("p50", num("p50_ms", p.p50_ms, fmtMs(p.p50_ms), "ms")),
        tile("p95", num("p95_ms", p.p95_ms, fmtMs(p.p95_ms), "ms", overSlo ? "bad" : "")),
        tile("p99", num("p99_ms", p.p99_ms, fmtMs(p.p99_ms), "ms")),
        tile("error rate", num("error_rate", p.error_rate, fmtPct(p.error_rate, 2), "%",
          isNum(budget) && p.error_rate > budget ? "bad" : "")),
        tile("requests · errors", num("requests", p.requests, fmtInt(p.requests)), h("span", { class: "sep" }, "·"),
          num("errors", p.errors, fmtInt(p.errors), null, p.errors ? "warn" : "")),
        tile("availability burn 5m / 1h",
          num("burn_availability_short", avail.short, fmtFixed(avail.short, 1), null, burnClass(avail.short)), h("span", { class: "sep" }, "/"),
          num("burn_availability_long", avail.long, fmtFixed(avail.long, 1), null, burnClass(avail.long))),
        tile("latency burn 5m / 1h",
          num("burn_latency_short", lat.short, fmtFixed(lat.short, 1), null, burnClass(lat.short)), h("span", { class: "sep" }, "/"),
          num("burn_latency_long", lat.long, fmtFixed(lat.long, 1), null, burnClass(lat.long)))),
      h("div", { class: "charts3" },
        lineChart({ key: "throughput", title: "Throughput", unit: "rps", fmt: fmtRps,
          series: [{ key: "rps", name: "rps", color: LINE.rps, points: pts("rps") }], empty: noTraffic ? "no traffic yet" : "not enough points yet" }),
        lineChart({ key: "latency", title: "Latency", unit: "ms", fmt: fmtMs,
          refLines: [{ v: slo.latency_p95_ms, label: "SLO p95" }],
          series: [
            { key: "p50", name: "p50", color: LINE.p50, points: pts("p50_ms") },
            { key: "p95", name: "p95", color: LINE.p95, points: pts("p95_ms") },
            { key: "p99", name: "p99", color: LINE.p99, points: pts("p99_ms") },
          ], empty: noTraffic ? "no traffic yet" : "not enough points yet" }),
        lineChart({ key: "error_rate", title: "Error rate", unit: "%", scale: 100, fmt: (v) => fmtPct(v, 2),
          refLines: [{ v: budget, label: "budget" }],
          series: [{ key: "error_rate", name: "errors", color: LINE.err, points: pts("error_rate") }],
          empty: noTraffic ? "no traffic yet" : "not enough points yet" })));
  }

  function renderPipelines(body, doc, meta) {
    const list = doc.pipelines || [];
    meta.replaceChildren(list.length ? `${list.length} pipeline${list.length === 1 ? "" : "s"} · 10 s buckets` : "");
    body.replaceChildren(list.length ? h("div", { class: "cards" }, list.map(pipelineCard))
      : empty("no traffic yet — no pipeline has served a request"));
  }

  function renderStages(body, doc, meta) {
    const groups = new Map();
    for (const st of doc.stages || []) {
      const key = st.pipeline || "(no pipeline)";
      if (!groups.has(key)) groups.set(key, []);
      groups.get(key).push(st);
    }
    meta.replaceChildren(h("span", { class: "key-solid" }), "p50 ", h("span", { class: "key-light" }, ""), "p95");
    if (!groups.size) {
      body.replaceChildren(empty("no traffic yet — no stage has reported timings"));
      return;
    }
    body.replaceChildren(...[...groups].map(([pipeline, rows]) =>
      h("div", { class: "stage-group", "data-pipeline": pipeline }, h("h3", null, pipeline), stageBars(rows))));
  }

  function tritonBox(t, now) {
    const [memText, memUnit] = fmtBytes(t.gpu_memory_used_bytes);
    return h("div", { class: "triton" },
      h("div", { class: "triton-name" }, h("strong", null, "Triton"),
        h("span", { class: "pill " + (t.up ? "ok" : "bad"), "data-value": "triton_up", "data-raw": String(!!t.up) }, t.up ? "up" : "down")),
      isNum(t.cpu_utilization) ? tile("CPU", num("cpu_utilization", t.cpu_utilization, fmtPct(t.cpu_utilization), "%"),
        meter(t.cpu_utilization)) : null,
      isNum(t.gpu_utilization) ? tile("GPU", num("gpu_utilization", t.gpu_utilization, fmtPct(t.gpu_utilization), "%"),
        meter(t.gpu_utilization)) : null,
      isNum(t.gpu_memory_used_bytes) ? tile("GPU memory", num("gpu_memory_used_bytes", t.gpu_memory_used_bytes, memText, memUnit)) : null,
      !isNum(t.gpu_utilization) && !isNum(t.gpu_memory_used_bytes) ? h("span", { class: "muted" }, "no GPU metrics") : null,
      h("span", { class: "muted scraped" }, isNum(t.scraped_unix_ms) ? `scraped ${fmtClock(t.scraped_unix_ms)}` : "not scraped yet"));
  }
  const meter = (fraction) => h("div", { class: "meter" + (fraction > 0.8 ? " hot" : "") },
    h("div", { class: "meter-fill", style: { width: `${Math.min(100, Math.max(0, fraction * 100))}%` } }));

  function renderModels(body, doc, meta) {
    const models = doc.models || {};
    const versions = [...(models.versions || [])].sort((a, b) =>
      String(a.model).localeCompare(String(b.model)) || String(a.version).localeCompare(String(b.version), undefined, { numeric: true }));
    const byModel = new Map();
    for (const v of versions) {
      if (!byModel.has(v.model)) byModel.set(v.model, []);
      byModel.get(v.model).push(v);
    }
    meta.replaceChildren(`${byModel.size} model${byModel.size === 1 ? "" : "s"} · ${versions.length} version${versions.length === 1 ? "" : "s"}`);
    const parts = [tritonBox(models.triton || {})];
    if (!versions.length) {
      parts.push(empty("no models reported yet"));
      body.replaceChildren(...parts);
      return;
    }
    const rows = [];
    for (const [model, list] of byModel) {
      const total = list.reduce((acc, v) => acc + (v.requests || 0), 0);
      rows.push(h("tr", { class: "group-row", "data-model": model },
        h("th", { colspan: 2 }, model),
        h("td", { colspan: 7 }, h("div", { class: "group-split" },
          h("div", { class: "split", title: "traffic split" }, list.map((v, i) => h("div", {
            class: "split-seg", style: { width: `${Math.max(0, (v.share || 0) * 100)}%`, background: PALETTE[i % PALETTE.length] },
            title: `v${v.version}: ${fmtPct(v.share)} %`,
          }, (v.share || 0) >= 0.08 ? `v${v.version} ${fmtPct(v.share, 0)}%` : ""))),
          h("span", { class: "muted" }, `${fmtInt(total)} requests`)))));
      list.forEach((v, i) => {
        const ready = v.ready === true ? "ok" : v.ready === false ? "bad" : "unknown";
        const rollout = v.rollout;
        rows.push(h("tr", { class: "version-row", "data-model": v.model, "data-version": v.version },
          h("td", { class: "version" }, h("span", { class: "swatch", style: { background: PALETTE[i % PALETTE.length] } }), `v${v.version}`),
          h("td", { class: "nowrap" }, h("span", { class: "dot " + ready, "data-value": "ready", "data-raw": v.ready === null || v.ready === undefined ? "" : String(v.ready),
            title: ready === "ok" ? "ready" : ready === "bad" ? "not ready" : "readiness unknown" }),
          h("span", { class: "dot-text" }, ready === "ok" ? "ready" : ready === "bad" ? "not ready" : "unknown")),
          h("td", null, h("div", { class: "share-wrap" }, h("div", { class: "share-bar" },
            h("div", { class: "share-fill", style: { width: `${Math.min(100, Math.max(0, (v.share || 0) * 100))}%`, background: PALETTE[i % PALETTE.length] } })),
          num("share", v.share, fmtPct(v.share), "%"))),
          h("td", { class: "r" }, num("requests", v.requests, fmtInt(v.requests))),
          h("td", { class: "r" }, num("p50_ms", v.p50_ms, fmtMs(v.p50_ms), "ms")),
          h("td", { class: "r" }, num("p95_ms", v.p95_ms, fmtMs(v.p95_ms), "ms")),
          h("td", { class: "r" }, num("queue_us", v.queue_us_per_request, fmtUs(v.queue_us_per_request), "µs")),
          h("td", { class: "r" }, num("compute_us", v.compute_us_per_request, fmtUs(v.compute_us_per_request), "µs")),
          h("td", null, rollout ? h("div", { class: "rollout", title: `rollout ${rollout.stage}: ${fmtFixed(rollout.percent, 1)} %` },
            h("span", { class: "rollout-stage" }, rollout.stage),
            h("div", { class: "progress" }, h("div", { class: "progress-fill", style: { width: `${Math.min(100, Math.max(0, rollout.percent || 0))}%` } })),
            num("rollout_percent", rollout.percent, fmtFixed(rollout.percent, 0), "%")) : h("span", { class: "muted" }, DASH))));
      });
    }
    parts.push(h("table", { class: "table models-table" },
      h("thead", null, h("tr", null, ["version", "ready", "traffic split", "requests", "p50", "p95", "queue", "compute", "rollout"]
        .map((c, i) => h("th", { class: i >= 3 && i <= 7 ? "r" : null }, c)))),
      h("tbody", null, rows)));
    body.replaceChildren(...parts);
  }

  function renderDrift(body, doc, meta) {
    const rows = [...(doc.drift || [])].sort((a, b) =>
      (BAND_ORDER[a.band] ?? 9) - (BAND_ORDER[b.band] ?? 9) || (b.psi ?? -1) - (a.psi ?? -1));
    meta.replaceChildren(h("span", { class: "pill band-stable" }, "stable < 0.1"), h("span", { class: "pill band-watch" }, "watch 0.1–0.2"),
      h("span", { class: "pill band-alert" }, "alert > 0.2"));
    if (!rows.length) {
      body.replaceChildren(empty("no drift data yet — capture a baseline with POST /v1/drift/baseline"));
      return;
    }
    body.replaceChildren(h("table", { class: "table drift-table" },
      h("thead", null, h("tr", null, h("th", null, "feature"), h("th", { class: "r" }, "PSI"),
        h("th", null, "band"), h("th", null, "history"), h("th", { class: "r" }, "window / baseline"))),
      h("tbody", null, rows.map((d) => h("tr", {
        class: "drift-row", "data-pipeline": d.pipeline, "data-model": d.model, "data-version": d.version, "data-feature": d.feature, "data-kind": d.kind,
      },
      h("td", null, h("div", { class: "nowrap" }, h("strong", null, d.feature), h("span", { class: "kind kind-" + d.kind }, d.kind)),
        h("div", { class: "muted small nowrap" }, `${d.pipeline} · ${d.model} v${d.version}`)),
      h("td", { class: "r" }, num("psi", d.psi, fmtFixed(d.psi, 3))),
      h("td", null, h("span", { class: "pill band-" + d.band, "data-band": d.band }, BAND_TEXT[d.band] || d.band)),
      h("td", null, sparkline(d.history)),
      h("td", { class: "r" }, num("window_samples", d.window_samples, fmtInt(d.window_samples)), h("span", { class: "muted" }, " / "),
        num("baseline_samples", d.baseline_samples, fmtInt(d.baseline_samples))))))));
  }

  function renderAccuracy(body, doc, meta) {
    const list = doc.accuracy || [];
    const groups = new Map();
    for (const a of list) {
      if (!groups.has(a.pipeline)) groups.set(a.pipeline, []);
      groups.get(a.pipeline).push(a);
    }
    const samples = list.reduce((acc, a) => acc + (a.samples || 0), 0);
    meta.replaceChildren(...(samples ? [num("feedback_samples", samples, fmtInt(samples)), " labelled answers"] : []));
    if (!samples) {
      body.replaceChildren(empty("no feedback yet — send ground truth with POST /v1/feedback on the gateway"));
      return;
    }
    body.replaceChildren(...[...groups].map(([pipeline, rows]) => {
      const refs = [...new Set(rows.map((r) => r.reference_accuracy).filter(isNum))];
      return h("div", { class: "acc-group", "data-pipeline": pipeline },
        h("h3", null, pipeline),
        h("table", { class: "table acc-table" },
          h("thead", null, h("tr", null, ["model", "samples", "accuracy", "precision", "recall", "reference", "drop"]
            .map((c, i) => h("th", { class: i ? "r" : null }, c)))),
          h("tbody", null, rows.map((a, i) => h("tr", { class: "acc-row", "data-pipeline": a.pipeline, "data-model": a.model, "data-version": a.version },
            h("td", null, h("span", { class: "swatch", style: { background: PALETTE[i % PALETTE.length] } }), `${a.model} v${a.version}`),
            h("td", { class: "r" }, num("samples", a.samples, fmtInt(a.samples))),
            h("td", { class: "r big" }, num("accuracy", a.accuracy, fmtPct(a.accuracy), "%")),
            h("td", { class: "r" }, num("precision", a.precision, fmtPct(a.precision), "%")),
            h("td", { class: "r" }, num("recall", a.recall, fmtPct(a.recall), "%")),
            h("td", { class: "r" }, num("reference_accuracy", a.reference_accuracy, fmtPct(a.reference_accuracy), "%")),
            h("td", { class: "r" }, num("drop_points", a.drop_points, fmtFixed(a.drop_points, 1), "pts",
              a.drop_points > 5 ? "bad" : a.drop_points > 2 ? "warn" : "")))))),
        lineChart({
          key: "accuracy", title: "Accuracy over time", unit: "%", scale: 100, fmt: (v) => fmtPct(v), autoFloor: true, ceil: 1,
          width: 600, height: 160, empty: "no judged answers over time yet",
          refLines: refs.map((v) => ({ v, label: `reference ${fmtPct(v)} %` })),
          series: rows.map((a, i) => ({
            key: `v${a.version}`, name: `${a.model} v${a.version}`, color: PALETTE[i % PALETTE.length],
            points: (a.series || []).map((p) => ({ t: p.t, v: p.accuracy })),
          })),
        }));
    }));
  }

  function renderTraces(body, doc, meta) {
    const list = doc.traces || [];
    const holder = body.querySelector(".trace-list");
    meta.replaceChildren(list.length ? `${list.length} most recent · click one for its waterfall` : "");
    if (!list.length) {
      holder.replaceChildren(empty("no traces yet"));
      return;
    }
    const longest = Math.max(...list.map((t) => (isNum(t.duration_ms) ? t.duration_ms : 0)), 1e-9);
    holder.replaceChildren(h("table", { class: "table trace-table" },
      h("thead", null, h("tr", null, ["time", "request", "pipeline", "services", "spans", "duration", "status"]
        .map((c, i) => h("th", { class: i === 4 || i === 5 ? "r" : null }, c)))),
      h("tbody", null, list.map((t) => h("tr", {
        class: "trace-row" + (t.trace_id === state.selected ? " selected" : ""), tabindex: 0,
        "data-trace-id": t.trace_id, "data-request-id": t.request_id, title: `trace ${t.trace_id}`,
        onclick: () => selectTrace(t.trace_id),
        onkeydown: (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); selectTrace(t.trace_id); } },
      },
      h("td", { class: "muted mono" }, fmtClock(t.start_unix_ms)),
      h("td", { class: "mono nowrap" }, t.request_id || DASH),
      h("td", null, t.pipeline || DASH),
      h("td", { class: "svc-squares", title: (t.services || []).join(", ") },
        (t.services || []).map((sv) => h("span", { class: "svc-sq", style: { background: serviceColor(sv) } })),
        h("span", { class: "muted small" }, ` ${(t.services || []).length}`)),
      h("td", { class: "r" }, num("span_count", t.span_count, fmtInt(t.span_count))),
      h("td", { class: "r dur-cell" }, h("div", { class: "dur-bar", style: { width: `${Math.max(2, ((t.duration_ms || 0) / longest) * 100)}%` } }),
        num("duration_ms", t.duration_ms, fmtMs(t.duration_ms), "ms")),
      h("td", null, h("span", { class: "pill " + (t.status === "ERROR" ? "bad" : "ok") }, t.status || DASH)))))));
  }

  // ---------------------------------------------------------------- trace waterfall

  async function selectTrace(id) {
    state.selected = id;
    const ticket = ++state.traceRequest;
    for (const row of document.querySelectorAll(".trace-row")) row.classList.toggle("selected", row.dataset.traceId === id);
    const box = document.getElementById("waterfall");
    box.replaceChildren(empty(`loading trace ${id}…`));
    try {
      const trace = await fetchJson(new URL("v1/traces/" + encodeURIComponent(id), BASE));
      if (ticket === state.traceRequest) box.replaceChildren(waterfall(trace));
    } catch (err) {
      if (ticket !== state.traceRequest) return;
      box.replaceChildren(h("p", { class: "empty error" }, err.status === 404
        ? `trace ${id} is no longer held by the monitor` : `could not load trace ${id}: ${err.message}`));
    }
  }

  function waterfall(trace) {
    const spans = trace.spans || [];
    const total = Math.max(isNum(trace.duration_ms) ? trace.duration_ms : 0,
      ...spans.map((sp) => (sp.start_ms || 0) + (sp.duration_ms || 0)), 1e-6);
    const pct = (v) => `${Math.min(100, Math.max(0, (v / total) * 100)).toFixed(3)}%`;
    const services = trace.services && trace.services.length ? trace.services : [...new Set(spans.map((sp) => sp.service))];
    const step = niceStep(total, 4);
    const ticks = [];
    for (let v = 0; v <= total + 1e-9; v += step) ticks.push(v);
    const close = () => {
      state.selected = null;
      state.traceRequest += 1;
      for (const row of document.querySelectorAll(".trace-row.selected")) row.classList.remove("selected");
      document.getElementById("waterfall").replaceChildren(empty("Select a trace to see its waterfall."));
    };
    return h("div", { class: "wf", "data-trace-id": trace.trace_id },
      h("div", { class: "wf-head" },
        h("div", null, h("strong", null, trace.request_id || trace.trace_id), " · ", trace.pipeline || DASH, " · ",
          num("trace_duration_ms", trace.duration_ms, fmtMs(trace.duration_ms), "ms"), " · ",
          num("trace_span_count", spans.length, String(spans.length)), " spans",
          h("div", { class: "muted mono small" }, `trace ${trace.trace_id}`),
          h("div", { class: "muted small" }, `started ${fmtClock(trace.start_unix_ms)}`)),
        h("div", { class: "wf-legend" }, services.map((sv) => h("span", { class: "svc", style: { "--c": serviceColor(sv) } }, sv)),
          h("span", { class: "legend-item" }, h("span", { class: "swatch hatched" }), "queue wait")),
        h("button", { class: "close", type: "button", title: "close", onclick: close }, "×")),
      h("div", { class: "wf-row wf-axis" }, h("div", { class: "wf-name" }, "span"),
        h("div", { class: "wf-track" }, ticks.map((v) => h("span", { class: "wf-tick", style: { left: pct(v) } }, `${trimNum(v)} ms`))),
        h("div", { class: "wf-dur" }, "duration")),
      spans.map((sp) => {
        const q = isNum(sp.queue_wait_ms) && sp.queue_wait_ms > 0 ? sp.queue_wait_ms : 0;
        const start = sp.start_ms || 0;
        const attrs = Object.entries(sp.attributes || {}).map(([k, v]) => `${k} = ${v}`);
        const tip = [`${sp.name}`, `${sp.service} · ${sp.kind} · ${sp.status}`,
          `start ${fmtMs(start)} ms · duration ${fmtMs(sp.duration_ms)} ms` + (q ? ` · queue ${fmtMs(q)} ms` : ""), ...attrs].join("\n");
        const color = serviceColor(sp.service);
        return h("div", {
          class: "wf-row" + (sp.status === "ERROR" ? " error" : ""), "data-span-id": sp.span_id, "data-depth": sp.depth,
          "data-service": sp.service, title: tip, style: { "--c": color },
        },
        h("div", { class: "wf-name", style: { "padding-left": `${6 + (sp.depth || 0) * 14}px` } },
          h("span", { class: "svc-dot" }), h("span", { class: "wf-svc" }, sp.service), h("span", { class: "wf-op" }, sp.name)),
        h("div", { class: "wf-track" },
          ticks.map((v) => h("span", { class: "wf-grid", style: { left: pct(v) } })),
          q ? h("div", { class: "wf-queue", "data-value": "queue_wait_ms", "data-raw": q, style: { left: pct(Math.max(0, start - q)), width: pct(Math.min(q, start)) } }) : null,
          h("div", { class: "wf-bar", "data-value": "start_ms", "data-raw": start, style: { left: pct(start), width: pct(sp.duration_ms || 0) } })),
        h("div", { class: "wf-dur" }, num("duration_ms", sp.duration_ms, fmtMs(sp.duration_ms), "ms")));
      }),
      spans.length ? null : empty("this trace has no spans"));
  }

  // ---------------------------------------------------------------- credentials

  const KEY_ITEM = "loom.monitor.key";

  function apiKey() {
    try { return sessionStorage.getItem(KEY_ITEM) || ""; } catch (_) { return ""; }
  }

  function setApiKey(key) {
    try {
      if (key) sessionStorage.setItem(KEY_ITEM, key); else sessionStorage.removeItem(KEY_ITEM);
    } catch (_) { /* storage off: the key lives until the next refusal */ }
  }

  function keyFromFragment() {
    // #key=<key> lets a link or a test open the page signed in; the key leaves the address bar
    // (and the history entry) before the first request.
    const found = /^#key=([^&]+)/.exec(window.location.hash);
    if (!found) return;
    setApiKey(decodeURIComponent(found[1]).trim());
    history.replaceState(null, "", window.location.pathname + window.location.search);
  }

  function askForKey(err) {
    // A refused or missing key stops the polling until a key is entered: no refusal every 2 s.
    const live = document.getElementById("live");
    const banner = document.getElementById("api-error");
    live.dataset.state = "auth";
    document.getElementById("live-text").textContent = "needs a key";
    if (document.getElementById("key-form")) return; // already asking: keep what is being typed
    const input = h("input", { type: "password", id: "api-key", name: "key", autocomplete: "off", spellcheck: "false",
      placeholder: "API key or JWT", "aria-label": "API key or JWT with the role viewer" });
    const submit = (ev) => {
      ev.preventDefault();
      const key = input.value.trim();
      if (!key) return;
      setApiKey(key);
      banner.hidden = true;
      banner.replaceChildren();
      schedule(0);
    };
    const why = err.status === 403 ? "This key may not read the monitor (it needs the role viewer)."
      : apiKey() ? "The key was refused." : "The monitor needs an API key or a JWT with the role viewer.";
    setApiKey("");
    banner.hidden = false;
    banner.replaceChildren(h("form", { class: "key-form", id: "key-form", onsubmit: submit },
      h("strong", null, why), " ", h("span", { class: "muted small" }, err.message), input,
      h("button", { type: "submit" }, "Use key")));
    input.focus();
  }

  // ---------------------------------------------------------------- polling

  async function fetchJson(url) {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), FETCH_TIMEOUT_MS);
    const headers = { Accept: "application/json" };
    const key = apiKey();
    if (key) headers.Authorization = `Bearer ${key}`;
    try {
      const resp = await fetch(url, { cache: "no-store", signal: ctl.signal, headers });
      if (!resp.ok) {
        let message = `HTTP ${resp.status}`;
        try {
          const body = await resp.json();
          if (body && body.error && body.error.message) message += `: ${body.error.message}`;
        } catch (_) { /* not JSON: the status says enough */ }
        const err = new Error(message);
        err.status = resp.status;
        throw err;
      }
      return await resp.json();
    } catch (err) {
      if (err.name === "AbortError") throw new Error(`no answer in ${FETCH_TIMEOUT_MS / 1000} s`);
      throw err;
    } finally {
      clearTimeout(timer);
    }
  }

  const PANELS = {
    alerts: [renderAlerts, (d) => [d.alerts, d.generated_unix_ms]],
    pipelines: [renderPipelines, (d) => d.pipelines],
    stages: [renderStages, (d) => d.stages],
    models: [renderModels, (d) => d.models],
    drift: [renderDrift, (d) => d.drift],
    accuracy: [renderAccuracy, (d) => d.accuracy],
    traces: [renderTraces, (d) => d.traces],
  };

  function render(doc) {
    renderSummary(doc);
    for (const [name, [draw, pick]] of Object.entries(PANELS)) {
      const section = document.querySelector(`section[data-panel="${name}"]`);
      const key = JSON.stringify(pick(doc) ?? null);
      if (!section || state.keys[name] === key) continue; // unchanged: keep the DOM (and open tooltips)
      const scrolls = [...section.querySelectorAll("[data-scroll-key]")].map((el) => [el, el.scrollTop]);
      try {
        draw(section.querySelector(".panel-body"), doc, section.querySelector(".panel-meta"));
        state.keys[name] = key;
        section.classList.remove("failed");
      } catch (err) {
        console.error(`dashboard: drawing panel ${name} failed`, err);
        section.classList.add("failed");
        section.querySelector(".panel-body").replaceChildren(h("p", { class: "empty error" }, `could not draw this panel: ${err.message}`));
        delete state.keys[name];
      }
      for (const [el, top] of scrolls) el.scrollTop = top;
    }
  }

  function setLive(ok, err) {
    const live = document.getElementById("live");
    const banner = document.getElementById("api-error");
    const last = state.lastOk ? fmtClock(state.lastOk) : null;
    state.failing = !ok;
    live.dataset.state = ok ? "live" : "error";
    document.body.classList.toggle("stale", !ok && !!state.lastOk);
    document.getElementById("live-text").textContent = ok ? `live · updated ${last}` : last ? `offline · last update ${last}` : "offline";
    if (ok) {
      banner.hidden = true;
      banner.replaceChildren();
      return;
    }
    banner.hidden = false;
    banner.replaceChildren(h("strong", null, "Monitor API unreachable"), ` — GET v1/dashboard failed: ${err && err.message ? err.message : err}. `,
      last ? `Showing the data received at ${last}; ` : "No data received yet; ", `retrying every ${POLL_MS / 1000} s.`);
  }

  function schedule(ms) {
    window.clearTimeout(state.timer);
    state.timer = window.setTimeout(poll, ms);
  }

  async function poll() {
    let doc = null;
    try {
      doc = await fetchJson(new URL("v1/dashboard", BASE));
      if (!doc || typeof doc !== "object") throw new Error("the answer is not a JSON object");
    } catch (err) {
      if (err.status === 401 || err.status === 403) {
        askForKey(err);
        return;
      }
      setLive(false, err);
      schedule(POLL_MS);
      return;
    }
    state.lastOk = Date.now();
    state.data = doc;
    try {
      render(doc);
      document.body.dataset.ready = "1";
    } catch (err) {
      console.error("dashboard: render failed", err);
    }
    setLive(true);
    schedule(POLL_MS);
  }

  keyFromFragment();
  poll();
})();
