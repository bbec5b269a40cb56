// pdserve dashboard: draws the state computed by pdserve/observability/dashboard/state.py with plain SVG.
// No libraries, nothing fetched from elsewhere: the page works offline. In a report the state
// is embedded (window.PDSERVE_STATE); live, it is polled from /api/state every second.
(function () {
  "use strict";
  const COLORS = ["#2f80ed", "#e8833a", "#27ae60", "#b04ad6", "#eb5757", "#f2c94c", "#56ccf2", "#6d4c41"];
  const NS = "http://www.w3.org/2000/svg";

  function el(tag, attrs, parent) {
    const e = document.createElementNS(NS, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }
  function num(x, digits) {
    if (x === null || x === undefined || !isFinite(x)) return "–";
    const a = Math.abs(x);
    if (a !== 0 && (a < 0.01 || a >= 1e5)) return x.toExponential(2);
    return x.toFixed(digits === undefined ? (a < 10 ? 3 : a < 1000 ? 1 : 0) : digits);
  }
  function secs(x) { return x === null || x === undefined ? "–" : (x < 1 ? num(x * 1000, 1) + " ms" : num(x, 2) + " s"); }
  function pct(x) { return x === null || x === undefined ? "–" : num(x * 100, 1) + "%"; }

  function tile(id, value, text) {
    const node = document.getElementById(id);
    node.textContent = text;
    node.setAttribute("data-value", value === null || value === undefined ? "" : String(value));
  }

  function frame(container, w, h) {
    container.innerHTML = "";
    return el("svg", { viewBox: `0 0 ${w} ${h}`, role: "img" }, container);
  }

  function axes(svg, x0, y0, x1, y1, xmax, ymax, xlabel) {
    el("line", { x1: x0, y1: y1, x2: x1, y2: y1, stroke: "#99a" }, svg);
    el("line", { x1: x0, y1: y0, x2: x0, y2: y1, stroke: "#99a" }, svg);
    const t = (x, y, s, anchor) => { const n = el("text", { x: x, y: y, "font-size": 10, fill: "#556", "text-anchor": anchor || "middle" }, svg); n.textContent = s; };
    t(x0 - 4, y0 + 8, num(ymax), "end");
    t(x0 - 4, y1, "0", "end");
    t(x1, y1 + 12, num(xmax) + (xlabel || ""), "end");
    t(x0, y1 + 12, "0", "start");
  }

  function lineChart(id, xs, named) {
    const box = document.getElementById(id);
    const W = 560, H = 190, L = 44, R = 110, T = 8, B = 22;
    const svg = frame(box, W, H);
    const names = Object.keys(named);
    if (!xs || !xs.length || !names.length) { box.setAttribute("data-drawn", "empty"); return; }
    const xmax = xs[xs.length - 1] || 1;
    let ymax = 0;
    names.forEach(n => named[n].forEach(v => { if (v > ymax) ymax = v; }));
    ymax = ymax || 1;
    axes(svg, L, T, W - R, H - B, xmax, ymax, " s");
    names.forEach((n, i) => {
      const pts = named[n].map((v, j) => `${L + (xs[j] / xmax) * (W - R - L)},${H - B - (v / ymax) * (H - B - T)}`);
      el("polyline", { points: pts.join(" "), fill: "none", stroke: COLORS[i % COLORS.length], "stroke-width": 1.6 }, svg);
      const label = el("text", { x: W - R + 8, y: T + 12 + 13 * i, "font-size": 11, fill: COLORS[i % COLORS.length] }, svg);
      label.textContent = n;
    });
    box.setAttribute("data-drawn", "1");
  }

  function histogram(id, h) {
    const box = document.getElementById(id);
    const W = 560, H = 170, L = 44, R = 10, T = 8, B = 22;
    const svg = frame(box, W, H);
    if (!h || !h.counts || !h.counts.length) { box.setAttribute("data-drawn", "empty"); return; }
    const cmax = Math.max.apply(null, h.counts) || 1;
    const lo = h.edges[0], hi = h.edges[h.edges.length - 1];
    const bw = (W - L - R) / h.counts.length;
    h.counts.forEach((c, i) => {
      const bh = (c / cmax) * (H - B - T);
      const r = el("rect", { x: L + i * bw + 1, y: H - B - bh, width: Math.max(bw - 2, 1), height: bh, fill: "#2f80ed" }, svg);
      el("title", {}, r).textContent = `${num(h.edges[i])} – ${num(h.edges[i + 1])}: ${c}`;
    });
    el("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#99a" }, svg);
    const t = (x, s, a) => { const n = el("text", { x: x, y: H - 6, "font-size": 10, fill: "#556", "text-anchor": a }, svg); n.textContent = s; };
    t(L, num(lo), "start"); t(W - R, num(hi), "end");
    const y = el("text", { x: L - 4, y: T + 8, "font-size": 10, fill: "#556", "text-anchor": "end" }, svg); y.textContent = cmax;
    box.setAttribute("data-drawn", "1");
  }

  function gantt(id, rows) {
    const box = document.getElementById(id);
    const W = 1140, RH = 12, L = 120, R = 10, T = 6;
    const H = T + rows.length * RH + 22;
    const svg = frame(box, W, H);
    if (!rows.length) { box.setAttribute("data-drawn", "empty"); return; }
    const end = Math.max.apply(null, rows.map(r => r.finish || 0)) || 1;
    const X = t => L + (t / end) * (W - L - R);
    const segs = [["queued", "prefill_start", "#c7ccd6"], ["prefill_start", "prefill_end", "#e8833a"],
                  ["prefill_end", "transfer_end", "#b04ad6"], ["transfer_end", "decode_admit", "#f2c94c"],
                  ["decode_admit", "finish", "#2f80ed"]];
    rows.forEach((r, i) => {
      const y = T + i * RH;
      const label = el("text", { x: L - 6, y: y + RH - 3, "font-size": 9, fill: r.ok ? "#334" : "#c0392b", "text-anchor": "end" }, svg);
      label.textContent = r.id;
      segs.forEach(([a, b, color]) => {
        if (r[a] === null || r[b] === null || r[b] <= r[a]) return;
        const rect = el("rect", { x: X(r[a]), y: y + 1, width: Math.max(X(r[b]) - X(r[a]), 0.5), height: RH - 3, fill: color }, svg);
        el("title", {}, rect).textContent = `${r.id} ${a} → ${b}: ${secs(r[b] - r[a])}`;
      });
    });
    const t = el("text", { x: W - R, y: H - 6, "font-size": 10, fill: "#556", "text-anchor": "end" }, svg);
    t.textContent = num(end) + " s";
    box.setAttribute("data-drawn", "1");
  }

  function stageTable(s) {
    const body = document.querySelector("#stages tbody");
    body.innerHTML = "";
    const st = s.stages;
    const rows = [["queue", "wait", st.queue.wait_s, secs], ["prefill", "time", st.prefill.time_s, secs],
                  ["prefill", "TTFT", st.prefill.ttft_s, secs], ["transfer", "time (overlaps prefill)", st.transfer.time_s, secs],
                  ["transfer", "exposed after prefill", st.transfer.exposed_s, secs],
                  ["transfer", "GB/s", st.transfer.gbps, num], ["decode", "admit wait", st.decode.admit_wait_s, secs],
                  ["decode", "TPOT", st.decode.tpot_s, secs], ["decode", "p99 inter-token gap", st.decode.itl_p99_s, secs],
                  ["end to end", "latency", st.end_to_end.latency_s, secs]];
    rows.forEach(([stage, metric, d, f]) => {
      const tr = document.createElement("tr");
      [stage, metric, f(d.mean), f(d.p50), f(d.p90), f(d.p99), f(d.max)].forEach(v => {
        const td = document.createElement("td"); td.textContent = v; tr.appendChild(td);
      });
      body.appendChild(tr);
    });
  }

  function render(state) {
    document.getElementById("title").textContent = state.title;
    const status = document.getElementById("status");
    const finished = !state.live || (state.now && state.now.finished);
    status.textContent = state.live ? (finished ? "finished" : "live") : "report";
    status.className = "badge " + (finished ? "done" : "live");
    document.getElementById("slo-ttft").textContent = secs(state.slo.ttft_s);
    document.getElementById("slo-tpot").textContent = secs(state.slo.tpot_s);
    const s = state.summary;
    const done = s ? s.requests : 0;
    document.getElementById("progress").textContent =
      `${done}${state.total_lines ? " / " + state.total_lines : ""} requests finished`;
    if (s) {
      tile("goodput", s.goodput_rps, num(s.goodput_rps) + " req/s");
      tile("slo-attainment", s.slo_attainment, pct(s.slo_attainment));
      tile("ttft-attainment", s.stages.prefill.slo_attainment, pct(s.stages.prefill.slo_attainment));
      tile("tpot-attainment", s.stages.decode.slo_attainment, pct(s.stages.decode.slo_attainment));
      tile("throughput", s.throughput_rps, num(s.throughput_rps) + " req/s");
      tile("prefill-tps", s.stages.prefill.tokens_per_s, num(s.stages.prefill.tokens_per_s));
      tile("decode-tps", s.stages.decode.tokens_per_s, num(s.stages.decode.tokens_per_s));
      tile("ttft-mean", s.stages.prefill.ttft_s.mean, secs(s.stages.prefill.ttft_s.mean));
      tile("tpot-mean", s.stages.decode.tpot_s.mean, secs(s.stages.decode.tpot_s.mean));
      tile("transfer-gbps", s.stages.transfer.gbps.mean, num(s.stages.transfer.gbps.mean) + " GB/s");
      const pre = s.stages.prefill;
      tile("cache-hit-rate", pre.cache_hit_rate, pct(pre.cache_hit_rate));
      tile("cached-tokens", pre.cached_tokens, pre.cached_tokens + " / " + pre.computed_tokens);
      tile("kv-saved", s.stages.transfer.bytes_saved, num(s.stages.transfer.bytes_saved / 1e6) + " MB");
      tile("succeeded", s.succeeded, String(s.succeeded));
      tile("failed", s.failed, String(s.failed));
      stageTable(s);
    }
    const ser = state.series;
    if (ser) {
      const g = ser.goodput;
      lineChart("chart-goodput", g.map(p => p.t), { throughput: g.map(p => p.throughput_rps), goodput: g.map(p => p.goodput_rps) });
      lineChart("chart-stages", ser.t, ser.in_stage);
      lineChart("chart-queue", ser.t, ser.queue_depth);
      lineChart("chart-kv", ser.t, ser.kv_blocks);
      lineChart("chart-batch", ser.t, ser.decode_batch);
      const d = state.distributions;
      histogram("hist-ttft", d.ttft_s); histogram("hist-tpot", d.tpot_s); histogram("hist-e2e", d.e2e_s);
      histogram("hist-queue", d.queue_wait_s); histogram("hist-transfer", d.transfer_gbps);
      gantt("gantt", state.timeline || []);
    }
    const kvNow = document.getElementById("kv-now");
    if (state.now && state.now.decode_workers) {
      kvNow.textContent = "now: " + Object.values(state.now.decode_workers).map(
        w => `${w.worker_id} ${w.num_blocks - w.free_blocks}/${w.num_blocks} blocks, batch ${w.running}`).join("; ");
    }
    document.body.setAttribute("data-rendered", finished ? "final" : "partial");
  }

  async function poll() {
    try {
      const response = await fetch("api/state", { cache: "no-store" });
      const state = await response.json();
      render(state);
      if (state.now && state.now.finished) return;
    } catch (e) {
      document.getElementById("status").textContent = "disconnected";
    }
    setTimeout(poll, 1000);
  }

  if (window.PDSERVE_STATE) render(window.PDSERVE_STATE); else poll();
})();
