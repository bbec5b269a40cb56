// pdserve dashboard: draws the state computed by pdserve/observability/dashboard/state.py with plotly.js
// (ticks, axis titles, hover values, zoom). plotly.js comes from the installed `plotly` package: the
// dashboard's server serves it, a report inlines it, so nothing is fetched from elsewhere and the page
// works offline. In a report the state is embedded (window.PDSERVE_STATE); live, it is polled from
// api/state every second, and redraws keep the zoom the user chose (uirevision).
(function () {
  "use strict";
  const COLORS = ["#2f80ed", "#e8833a", "#27ae60", "#b04ad6", "#eb5757", "#f2c94c", "#56ccf2", "#6d4c41"];
  const STAGE_COLORS = { queued: "#8a93a6", prefill: "#e8833a", transfer: "#b04ad6", admitting: "#b04ad6", decode: "#2f80ed" };
  const STATE_WORDS = { queued: "queued for prefill", prefill: "in prefill", admitting: "waiting to join a decode batch", decode: "decoding" };
  const CONFIG = { displaylogo: false, responsive: true };
  const TIME = "time since the first arrival (s)";
  let pending = [];

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

  function layout(xTitle, yTitle, extra) {
    return Object.assign({
      uirevision: "keep", height: 270, margin: { l: 64, r: 20, t: 30, b: 46 },
      font: { family: "system-ui, -apple-system, 'Segoe UI', sans-serif", size: 11, color: "#334" },
      xaxis: { title: { text: xTitle }, zeroline: false, gridcolor: "#eceef2" },
      yaxis: { title: { text: yTitle }, rangemode: "tozero", gridcolor: "#eceef2" },
      showlegend: true, legend: { orientation: "h", x: 0, y: 1.0, yanchor: "bottom" },
      hovermode: "x unified", paper_bgcolor: "#fff", plot_bgcolor: "#fff",
    }, extra || {});
  }

  // Draw (or redraw in place) one chart; data-drawn says "1" once plotly has rendered data, "empty" if none.
  function draw(id, traces, lay, emptyText) {
    const box = document.getElementById(id);
    const has = traces.some(t => t.x && t.x.length);
    if (!has) {
      lay.annotations = [{ text: emptyText || "no data yet", showarrow: false, xref: "paper", yref: "paper", x: 0.5, y: 0.5 }];
    }
    pending.push(Plotly.react(box, traces, lay, CONFIG).then(() => box.setAttribute("data-drawn", has ? "1" : "empty")));
  }

  function lines(id, xs, named, yTitle, extra) {
    const traces = Object.keys(named).map((n, i) => ({
      type: "scatter", mode: "lines", name: n, x: xs, y: named[n],
      line: { color: STAGE_COLORS[n] || COLORS[i % COLORS.length], width: 1.8 },
    }));
    draw(id, xs && xs.length ? traces : [], layout(TIME, yTitle, extra));
    // Each line's last value, for a reader that compares the chart with /metrics at the same moment.
    const last = {};
    Object.keys(named).forEach(n => { const ys = named[n]; if (ys && ys.length) last[n] = ys[ys.length - 1]; });
    document.getElementById(id).setAttribute("data-last", JSON.stringify(last));
  }

  // The headline of a live page: requests in flight now, and the state holding most of them.
  function backlog(b) {
    const box = document.getElementById("backlog");
    if (!b) { box.hidden = true; return; }
    box.hidden = false;
    box.className = "backlog" + (b.counts.queued > 0 ? " queued" : "");
    Object.keys(b.counts).forEach(k => tile("now-" + k, b.counts[k], String(b.counts[k])));
    tile("now-in-flight", b.in_flight, String(b.in_flight));
    tile("backlog-at", b.at || "", b.at ? "most are " + STATE_WORDS[b.at] : "nothing in flight");
  }

  function rates(points) {
    const x = points.map(p => p.t);
    const step = (name, key, color, dash) => ({ type: "scatter", mode: "lines", name, x, y: points.map(p => p[key]),
      line: { color, width: 1.8, shape: "hv", dash: dash || "solid" } });
    draw("chart-rates", x.length ? [step("offered", "offered_rps", "#8a93a6", "dot"), step("served", "throughput_rps", "#2f80ed"),
                                    step("goodput", "goodput_rps", "#27ae60")] : [],
         layout(TIME, "requests/s"));
  }

  function attainment(points, target) {
    const x = points.map(p => p.t);
    const traces = ["prefill", "transfer", "decode"].map(s => ({
      type: "scatter", mode: "lines+markers", name: s, x, y: points.map(p => p[s]), connectgaps: false,
      line: { color: STAGE_COLORS[s], width: 1.8 }, marker: { size: 4 },
    }));
    const lay = layout(TIME, "share within SLO", {
      yaxis: { title: { text: "share within SLO" }, range: [0, 1.05], tickformat: ".0%", gridcolor: "#eceef2" },
      shapes: [{ type: "line", xref: "paper", x0: 0, x1: 1, y0: target, y1: target, line: { color: "#c0392b", width: 1, dash: "dash" } }],
    });
    draw("chart-attainment", x.length ? traces : [], lay);
  }

  function speculative(points) {
    const x = points.map(p => p.t);
    const trace = (name, key, axis, color) => ({ type: "scatter", mode: "lines+markers", name, x, y: points.map(p => p[key]),
      yaxis: axis, connectgaps: false, line: { color, width: 1.8 }, marker: { size: 4 } });
    const lay = layout(TIME, "draft acceptance rate", {
      yaxis: { title: { text: "draft acceptance rate" }, range: [0, 1.05], tickformat: ".0%", gridcolor: "#eceef2" },
      yaxis2: { title: { text: "tokens per target forward, γ" }, overlaying: "y", side: "right", rangemode: "tozero",
                tickmode: "auto", showgrid: false },
      margin: { l: 64, r: 64, t: 30, b: 46 },
    });
    draw("chart-spec", x.length ? [trace("acceptance rate", "acceptance_rate", "y", "#27ae60"),
                                   trace("tokens per target forward", "tokens_per_forward", "y2", "#2f80ed"),
                                   trace("mean γ", "gamma_mean", "y2", "#e8833a")] : [],
         lay, "speculative decoding off");
  }

  function histogram(id, h, xTitle) {
    const n = h && h.counts ? h.counts.length : 0;
    const idx = [...Array(n).keys()];
    const traces = n ? [{
      type: "bar", name: "requests", x: idx.map(i => (h.edges[i] + h.edges[i + 1]) / 2), y: h.counts,
      width: idx.map(i => h.edges[i + 1] - h.edges[i]), marker: { color: "#2f80ed" },
      customdata: idx.map(i => [h.edges[i], h.edges[i + 1]]),
      hovertemplate: "%{customdata[0]:.4g} – %{customdata[1]:.4g}: %{y} requests<extra></extra>",
    }] : [];
    draw(id, traces, layout(xTitle, "requests", { showlegend: false, hovermode: "closest", bargap: 0.04 }));
  }

  function gantt(rows) {
    const seen = new Set();
    const labels = rows.map((r, i) => {
      let label = (r.id === null || r.id === undefined ? "#" + i : String(r.id)) + (r.ok ? "" : " (failed)");
      if (seen.has(label)) label += " #" + i;
      seen.add(label);
      return label;
    });
    const segs = [["queue", "queued", "prefill_start", "#c7ccd6"], ["prefill", "prefill_start", "prefill_end", "#e8833a"],
                  ["transfer after prefill", "prefill_end", "transfer_end", "#b04ad6"],
                  ["admit wait", "transfer_end", "decode_admit", "#f2c94c"], ["decode", "decode_admit", "finish", "#2f80ed"]];
    const traces = segs.map(([name, a, b, color]) => {
      const keep = rows.map((r, i) => i).filter(i => rows[i][a] !== null && rows[i][b] !== null && rows[i][b] > rows[i][a]);
      return { type: "bar", orientation: "h", name, marker: { color }, y: keep.map(i => labels[i]),
        base: keep.map(i => rows[i][a]), x: keep.map(i => rows[i][b] - rows[i][a]), customdata: keep.map(i => rows[i][a]),
        hovertemplate: "%{y}: " + name + " %{x:.4g} s, from %{customdata:.4g} s<extra></extra>" };
    });
    draw("gantt", rows.length ? traces : [], layout(TIME, "request (sample)", {
      barmode: "overlay", hovermode: "closest", height: 90 + rows.length * 16,
      yaxis: { title: { text: "request (sample)" }, type: "category", autorange: "reversed", automargin: true },
    }));
  }

  function limiting(lim, slo) {
    const stage = document.getElementById("limiting-stage");
    const why = document.getElementById("limiting-why");
    const advice = document.getElementById("limiting-advice");
    const body = document.querySelector("#limiting tbody");
    body.innerHTML = "";
    if (!lim) { tile("limiting-stage", null, "–"); why.textContent = "no request finished yet"; advice.textContent = ""; return; }
    tile("limiting-stage", lim.stage, lim.stage);
    stage.className = "stage " + lim.stage + (lim.below_target ? " below" : "");
    const worst = lim.stages.find(s => s.stage === lim.stage);
    const over = `over the last ${num(lim.window_s, 0)} s of finishes (${lim.requests} requests)`;
    why.textContent = lim.below_target
      ? `its attainment ${pct(worst.attainment)} is under the ${pct(lim.target)} target, ${over}`
      : `every stage meets the ${pct(lim.target)} target ${over}; this one is nearest its SLO (p90 at ${pct(worst.headroom_p90)} of its budget)`;
    advice.textContent = (lim.below_target ? "→ " : "→ when load grows: ") + lim.advice;
    const budget = { prefill: "TTFT ≤ " + secs(slo.ttft_s), transfer: "TPOT ≤ " + secs(slo.tpot_s) + " (its exposed part)",
                     decode: "TPOT ≤ " + secs(slo.tpot_s) + " (the rest)" };
    lim.stages.forEach(s => {
      const tr = document.createElement("tr");
      if (s.stage === lim.stage) tr.className = "limiting";
      [s.stage, budget[s.stage], pct(s.attainment), String(s.misses), pct(s.headroom_p90)].forEach(v => {
        const td = document.createElement("td"); td.textContent = v; tr.appendChild(td);
      });
      body.appendChild(tr);
    });
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

  function tiles(state) {
    const s = state.summary;
    const r = state.rates || {};
    tile("offered", r.offered_rps, num(r.offered_rps) + " req/s");
    tile("served", r.served_rps, num(r.served_rps) + " req/s");
    document.querySelectorAll(".rate-window").forEach(n => { n.textContent = r.window_s ? "last " + num(r.window_s, 1) + " s" : "last window"; });
    if (!s) return;
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
    const sp = s.speculative;
    tile("spec-acceptance", sp ? sp.acceptance_rate : null, sp ? pct(sp.acceptance_rate) : "off");
    tile("spec-tpf", sp ? sp.tokens_per_forward : null, sp ? num(sp.tokens_per_forward) : "off");
    tile("spec-gamma", sp ? sp.gamma_mean : null, sp ? num(sp.gamma_mean, 2) : "off");
    const st = s.structured;  // constrained answers and how many failed validation (pdserve/openai/structured.py)
    tile("structured-requests", st ? st.requests : null, st ? String(st.requests) : "none");
    tile("structured-failures", st ? st.validation_failures : null,
         st ? `${st.validation_failures} of ${st.checked} checked` : "none");
    tile("succeeded", s.succeeded, String(s.succeeded));
    tile("failed", s.failed, String(s.failed));
    stageTable(s);
  }

  function render(state) {
    pending = [];
    document.getElementById("title").textContent = state.title;
    const status = document.getElementById("status");
    const finished = !state.live || (state.now && state.now.finished);
    status.textContent = state.live ? (finished ? "finished" : "live") : "report";
    status.className = "badge " + (finished ? "done" : "live");
    document.getElementById("slo-ttft").textContent = secs(state.slo.ttft_s);
    document.getElementById("slo-tpot").textContent = secs(state.slo.tpot_s);
    const done = state.summary ? state.summary.requests : 0;
    document.getElementById("progress").textContent =
      `${done}${state.total_lines ? " / " + state.total_lines : ""} requests finished`;
    tiles(state);
    backlog(state.backlog);
    limiting(state.limiting, state.slo);
    const ser = state.series, live = state.live_series;
    if (live) {  // live: in-flight requests up to now, sampled from the router (what /metrics reports)
      lines("chart-stages", live.t, live.in_stage, "requests");
      lines("chart-queue", live.t, live.queue_depth, "queued requests", { legend: { orientation: "h", x: 0, y: 1.0, yanchor: "bottom", title: { text: "prompt tokens" } } });
    }
    if (ser) {
      rates(ser.goodput);
      attainment(ser.attainment, state.limiting ? state.limiting.target : 0.9);
      if (!live) {  // a report: reconstructed from the finished requests' timelines
        lines("chart-stages", ser.t, ser.in_stage, "requests");
        lines("chart-queue", ser.t, ser.queue_depth, "queued requests", { legend: { orientation: "h", x: 0, y: 1.0, yanchor: "bottom", title: { text: "prompt tokens" } } });
      }
      lines("chart-kv", ser.t, ser.kv_blocks, "KV blocks");
      lines("chart-batch", ser.t, ser.decode_batch, "sequences in the batch");
      speculative(ser.speculative || []);
      const d = state.distributions;
      histogram("hist-ttft", d.ttft_s, "TTFT (s)"); histogram("hist-tpot", d.tpot_s, "TPOT (s)");
      histogram("hist-e2e", d.e2e_s, "end-to-end latency (s)"); histogram("hist-queue", d.queue_wait_s, "queue wait (s)");
      histogram("hist-transfer", d.transfer_gbps, "KV transfer rate (GB/s)");
      gantt(state.timeline || []);
    }
    const kvNow = document.getElementById("kv-now");
    if (state.now && state.now.decode_workers) {
      kvNow.textContent = "now: " + Object.values(state.now.decode_workers).map(
        w => `${w.worker_id} ${w.num_blocks - w.free_blocks}/${w.num_blocks} blocks, batch ${w.running}`).join("; ");
    }
    // Marked only once every chart has rendered, so a reader of the page (or a test) sees them all.
    return Promise.all(pending).then(() => document.body.setAttribute("data-rendered", finished ? "final" : "partial"));
  }

  async function poll() {
    try {
      const response = await fetch("api/state", { cache: "no-store" });
      const state = await response.json();
      await render(state);
      if (state.now && state.now.finished) return;
    } catch (e) {
      document.getElementById("status").textContent = "disconnected";
    }
    setTimeout(poll, 1000);
  }

  if (window.PDSERVE_STATE) render(window.PDSERVE_STATE); else poll();
})();
