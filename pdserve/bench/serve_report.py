"""`pdserve bench serve`'s table and its one-file HTML report: SLO attainment against the request
rate, one line per mode, with the target line and each mode's sustained rate marked (DistServe's
figure); three panels: both SLOs, TTFT only, TPOT only. Plain SVG: no network, no script."""

from __future__ import annotations

import html
import math
from typing import Any

COLORS = {"pd": "#1f77b4", "colocated": "#d62728"}
PANELS = (("attainment", "both SLOs"), ("ttft_attainment", "TTFT SLO"), ("tpot_attainment", "TPOT SLO"))


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
        lines.append(f"{'':<10} sustained at >= {report['target']:.0%} attainment: {sustained_text(res['sustained'])}; "
                     f"KV blocks leaked: {res['kv_blocks_leaked']}")
    plan = report.get("plan")
    if plan:
        lines.append(f"planner vs measured (pd, {plan['config']}): predicted {_f(plan['predicted_rps'], '.3f')} req/s, "
                     f"measured {_f(plan['measured_rps'], '.3f')} req/s, relative error "
                     f"{_f(plan['relative_error'], '+.0%')}: {plan['verdict']}")
        lines += plan["profile"]
    return "\n".join(lines)


def sustained_text(s: dict[str, Any]) -> str:
    from pdserve.bench.sustained import Sustained

    return Sustained(**s).describe()


def _panel(report: dict[str, Any], key: str, title: str, w: int = 420, h: int = 300) -> str:
    left, right, top, bottom = 52, 12, 28, 42
    pw, ph = w - left - right, h - top - bottom
    rmax = max(report["rates"]) * 1.05
    x = lambda r: left + pw * r / rmax  # noqa: E731
    y = lambda a: top + ph * (1 - a)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
           f'font-size="11"><text x="{left + pw / 2}" y="16" text-anchor="middle" font-size="13">'
           f'SLO attainment ({html.escape(title)})</text>']
    for a in (0, 0.25, 0.5, 0.75, 1.0):
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y(a)}" y2="{y(a)}" stroke="#eee"/>'
                   f'<text x="{left - 6}" y="{y(a) + 4}" text-anchor="end">{a:.0%}</text>')
    for t in _ticks(rmax):
        out.append(f'<line x1="{x(t)}" x2="{x(t)}" y1="{top + ph}" y2="{top + ph + 4}" stroke="#333"/>'
                   f'<text x="{x(t)}" y="{top + ph + 16}" text-anchor="middle">{t:g}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>'
               f'<text x="{left + pw / 2}" y="{h - 6}" text-anchor="middle">request rate (req/s)</text>'
               f'<line x1="{left}" x2="{left + pw}" y1="{y(report["target"])}" y2="{y(report["target"])}" '
               f'stroke="#888" stroke-dasharray="4 3"/>')
    for i, (mode, res) in enumerate(m for m in report["modes"].items() if "error" not in m[1]):
        color = COLORS.get(mode, "#2ca02c")
        pts = [(x(r["rate_rps"]), y(r[key])) for r in res["rates"]]
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" '
                   f'points="{" ".join(f"{px:.1f},{py:.1f}" for px, py in pts)}"/>')
        for (px, py), r in zip(pts, res["rates"]):
            out.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3.5" fill="{color}"><title>{mode}: '
                       f'{r["rate_rps"]:g} req/s, {r[key]:.1%}</title></circle>')
        if key == "attainment" and res["sustained"]["bound"] == "interpolated":
            sx = x(res["sustained"]["rate_rps"])
            out.append(f'<line x1="{sx:.1f}" x2="{sx:.1f}" y1="{top}" y2="{top + ph}" stroke="{color}" '
                       f'stroke-dasharray="2 2"/>')
        out.append(f'<rect x="{left + pw - 96}" y="{top + ph - 18 - 16 * i}" width="10" height="10" fill="{color}"/>'
                   f'<text x="{left + pw - 82}" y="{top + ph - 9 - 16 * i}">{html.escape(mode)}</text>')
    return "".join(out) + "</svg>"


def _ticks(hi: float) -> list[float]:
    step = 10 ** math.floor(math.log10(hi / 4)) if hi > 0 else 1
    for m in (1, 2, 5, 10):
        if hi / (step * m) <= 6:
            step *= m
            break
    return [i * step for i in range(int(hi / step) + 1)]


def render_html(report: dict[str, Any]) -> str:
    panels = "".join(_panel(report, key, title) for key, title in PANELS)
    table = html.escape(render_table(report))
    return ("<!doctype html><html><head><meta charset='utf-8'><title>pdserve bench serve</title></head>"
            "<body style='font-family:sans-serif;margin:16px'><h2>pdserve bench serve: SLO attainment vs "
            f"request rate</h2><p>{html.escape(report.get('machine', ''))}</p><div>{panels}</div>"
            "<p>Dashed grey: the attainment target; dotted verticals: the rate each mode sustains at the target "
            "(linear between the last measured rate that meets it and the first that misses it).</p>"
            f"<pre style='font-size:12px'>{table}</pre></body></html>")
