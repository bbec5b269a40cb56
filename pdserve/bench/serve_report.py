"""`pdserve bench serve`'s table and its one-file HTML report: SLO attainment against the request
rate, one line per mode, with the target line and each mode's sustained rate marked (DistServe's
figure); three panels: both SLOs, TTFT only, TPOT only. Drawn by plotly.js, the same bundle the
dashboards use, inlined by the same helper: one file, no network."""

from __future__ import annotations

import html
import json
from typing import Any

from pdserve.observability.dashboard.server import plotly_js

COLORS = {"pd": "#1f77b4", "colocated": "#d62728"}
PANELS = (("attainment", "both SLOs"), ("ttft_attainment", "TTFT SLO"), ("tpot_attainment", "TPOT SLO"))
RATE_AXIS, ATTAIN_AXIS = "request rate (req/s)", "SLO attainment"


def _f(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 1e3:.0f}"


def render_table(report: dict[str, Any]) -> str:
    slo = report["slo"]
    lines = [f"{report['model']}, {report['arrival_text']} arrivals, {report['num_prompts']} requests per rate, "
             f"front end {report['front_end']}; SLO TTFT {slo['ttft_s']:g} s, TPOT {slo['tpot_s']:g} s",
             f"{'mode':<10} {'rate':>5} {'offered':>7} {'achieved':>8} {'goodput':>7} {'attain':>6} {'TTFT ok':>7} "
             f"{'TPOT ok':>7} {'TTFT p50/p90/p99 ms':>20} {'TPOT p50/p90/p99 ms':>20} {'e2e p50/p90/p99 s':>18} "
             f"{'failed':>6}"]
    for mode, res in report["modes"].items():
        if "error" in res:
            lines.append(f"{mode:<10} could not run: {res['error']}")
            continue
        for r in res["rates"]:
            t, p, e = r["ttft_s"], r["tpot_s"], r["e2e_s"]
            lines.append(
                f"{mode:<10} {r['rate_rps']:>5g} {_f(r['offered_rps']):>7} {_f(r['achieved_rps']):>8} "
                f"{_f(r['goodput_rps']):>7} {r['attainment']:>6.0%} {r['ttft_attainment']:>7.0%} "
                f"{r['tpot_attainment']:>7.0%} {'/'.join(_ms(t[k]) for k in ('p50', 'p90', 'p99')):>20} "
                f"{'/'.join(_ms(p[k]) for k in ('p50', 'p90', 'p99')):>20} "
                f"{'/'.join(_f(e[k], '.1f') for k in ('p50', 'p90', 'p99')):>18} {r['failed']:>6}")
        leaked = res["kv_blocks_leaked"]
        lines.append(f"{'':<10} sustained at >= {report['target']:.0%} attainment: {sustained_text(res['sustained'])}; "
                     f"KV blocks leaked: {'n/a (another server)' if leaked is None else leaked}")
        lines += [f"{'':<10} {line}" for line in breakdown_lines(res)]
    lines += ratio_lines(report)
    ratio = hybrid_ratio(report)
    if ratio is not None:
        lines.append(f"hybrid sustains {ratio:.2f}x the rate of the better of pd and colocated (this run)")
    plan = report.get("plan")
    if plan:
        lines.append(f"planner vs measured (pd, {plan['config']}, {_f(plan.get('cached_prompt_tokens'), '.0f')} "
                     f"prompt tokens a request cached, front end {_f(plan.get('front_end_cpu_ms'), '.1f')} ms CPU a "
                     f"request): predicted {_f(plan['predicted_rps'], '.3f')} req/s, "
                     f"measured {_f(plan['measured_rps'], '.3f')} req/s, relative error "
                     f"{_f(plan['relative_error'], '+.0%')}: {plan['verdict']}")
        colo = plan.get("colocated")
        if colo:
            lines.append(f"planner vs measured (colocated, {colo['config']}, "
                         f"{_f(colo.get('cached_prompt_tokens'), '.0f')} prompt tokens a request cached, front end "
                         f"{_f(colo.get('front_end_cpu_ms'), '.1f')} ms CPU a request): predicted "
                         f"{_f(colo['predicted_rps'], '.3f')} req/s, measured {_f(colo['measured_rps'], '.3f')} req/s, "
                         f"relative error {_f(colo['relative_error'], '+.0%')}: {colo['verdict']}")
        lines += plan["profile"]
    return "\n".join(lines)


def breakdown_lines(res: dict[str, Any]) -> list[str]:
    """Where each rate's output tokens spent their time on a pdserve server (pdserve/bench/token_time.py)."""
    from pdserve.bench.token_time import Breakdown

    return [f"{r['rate_rps']:g} req/s, where the time went: {Breakdown.describe(r['breakdown'])}"
            for r in res["rates"] if r.get("breakdown")]


def ratio_lines(report: dict[str, Any]) -> list[str]:
    """Each server against the baseline (the first --base-url), rate by rate, from this run alone."""
    lines = []
    for label, rows in (report.get("ratios") or {}).items():
        per_rate = [r for r in rows if "rate_rps" in r]
        text = "; ".join(f"{r['rate_rps']:g} req/s goodput {_f(r['goodput_rps'])}x, TPOT mean {_f(r['tpot_mean_s'])}x, "
                         f"TTFT mean {_f(r['ttft_mean_s'])}x" for r in per_rate)
        sustained = next((r["sustained"] for r in rows if "sustained" in r), None)
        lines.append(f"{label} / {report['baseline']}: {text}; sustained rate {_f(sustained)}x")
    return lines


def hybrid_ratio(report: dict[str, Any]) -> float | None:
    """Hybrid's sustained rate over the better of PD's and colocated's, when all three ran (issue 28's goal:
    >= 1.2); None when one is missing or the better baseline sustained nothing."""
    modes = report["modes"]
    if any(m not in modes or "error" in modes[m] for m in ("pd", "colocated", "hybrid")):
        return None
    best = max(modes["pd"]["sustained"]["rate_rps"] or 0.0, modes["colocated"]["sustained"]["rate_rps"] or 0.0)
    return (modes["hybrid"]["sustained"]["rate_rps"] or 0.0) / best if best > 0 else None


def sustained_text(s: dict[str, Any]) -> str:
    from pdserve.bench.sustained import Sustained

    return Sustained(**s).describe()


def figures(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One plotly figure per panel: a trace per mode that ran, the target line, and (on the both-SLOs
    panel, the curve it is read off) each mode's sustained rate as a marker on the target line."""
    target, xmax = report["target"], max(report["rates"]) * 1.05
    ran = [(mode, res) for mode, res in report["modes"].items() if "error" not in res]
    out = []
    for key, title in PANELS:
        traces: list[dict[str, Any]] = [{
            "type": "scatter", "mode": "lines+markers", "name": mode, "x": [r["rate_rps"] for r in res["rates"]],
            "y": [r[key] for r in res["rates"]], "line": {"color": COLORS.get(mode, "#2ca02c"), "width": 2},
            "hovertemplate": f"{html.escape(mode)}: %{{x:g}} req/s, %{{y:.1%}} within {title}<extra></extra>"}
            for mode, res in ran]
        traces.append({"type": "scatter", "mode": "lines", "name": f"target {target:.0%}", "x": [0, xmax],
                       "y": [target, target], "line": {"color": "#888", "dash": "dash", "width": 1},
                       "hovertemplate": f"target {target:.0%}<extra></extra>"})
        if key == "attainment":
            for mode, res in ran:
                sus = res["sustained"]
                text, short = sustained_text(sus), {"at_least": ">= ", "below": "< "}.get(sus["bound"], "")
                traces.append({"type": "scatter", "mode": "markers",
                               "name": f"{mode} sustained: {short}{sus['rate_rps']:.3g} req/s",
                               "x": [res["sustained"]["rate_rps"]], "y": [target],
                               "marker": {"symbol": "diamond-open", "size": 13, "line": {"width": 2},
                                          "color": COLORS.get(mode, "#2ca02c")},
                               "hovertemplate": f"{html.escape(mode)} sustains {html.escape(text)}<extra></extra>"})
        out.append({"id": f"panel-{key}", "data": traces, "layout": {
            "title": {"text": f"within {title}", "x": 0.02, "xanchor": "left"}, "height": 400,
            "hovermode": "closest", "margin": {"l": 64, "r": 20, "t": 40, "b": 110},
            "legend": {"orientation": "h", "y": -0.25, "yanchor": "top"},
            "xaxis": {"title": {"text": RATE_AXIS}, "range": [0, xmax], "zeroline": False},
            "yaxis": {"title": {"text": ATTAIN_AXIS}, "range": [0, 1.05], "tickformat": ".0%"}}})
    return out


_DRAW = """
const figs = JSON.parse(document.getElementById("bench-figures").textContent);
for (const f of figs) Plotly.newPlot(f.id, f.data, f.layout, {displaylogo: false, responsive: true});
"""


def render_html(report: dict[str, Any]) -> str:
    figs = figures(report)
    panels = "".join(f"<div id='{f['id']}' style='width:460px;display:inline-block'></div>" for f in figs)
    data = json.dumps(figs).replace("</", "<\\/")
    table = html.escape(render_table(report))
    return ("<!doctype html><html><head><meta charset='utf-8'><title>pdserve bench serve</title>"
            f"<script>\n{plotly_js()}</script></head>"
            "<body style='font-family:sans-serif;margin:16px'><h2>pdserve bench serve: SLO attainment vs "
            f"request rate</h2><p>{html.escape(report.get('machine', ''))}</p><div>{panels}</div>"
            "<p>Dashed grey: the attainment target; diamonds on it: the rate each mode sustains at the target "
            "(linear between the last measured rate that meets it and the first that misses it; hover for a "
            "bound).</p>"
            f"<pre style='font-size:12px'>{table}</pre>"
            f"<script type='application/json' id='bench-figures'>{data}</script><script>{_DRAW}</script>"
            "</body></html>")
