"""`pdserve bench serve`: arrival generators (statistics, seeding), the sustained-rate interpolation on
hand-made curves, the per-rate summary, the planner-vs-measured prediction against a closed form, and
the report's plotly figures on a hand-made report, and `--quick` end to end (real Ray workers, the real
model, the openai client): every request sent is measured once, at its seeded time, and the figures
agree with the samples (no latency thresholds)."""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser

import numpy as np
import pytest

from pdserve.bench import serve
from pdserve.bench.arrivals import ArrivalSpec, arrival_times, gaps
from pdserve.bench.serve import Sample, summarize
from pdserve.bench.serve_report import PANELS, render_html
from pdserve.bench.sustained import sustained_rate
from pdserve.observability.dashboard.server import plotly_js
from pdserve.observability.metrics import SLO
from pdserve.plan.check import compare, predicted_sustained
from pdserve.plan.model import Config
from pdserve.plan.profile import DecodeFit, PrefillFit, StageProfile
from pdserve.runtime.cluster import ClusterConfig

N = 20_000


# ---- arrivals ------------------------------------------------------------------------------------
@pytest.mark.parametrize("rate", [0.5, 4.0])
def test_poisson_gaps_have_mean_one_over_rate_and_cv_one(rate):
    g = gaps(ArrivalSpec(), rate, N, seed=1)
    assert g.mean() == pytest.approx(1 / rate, rel=0.03)  # SE of the mean: 0.7%
    assert g.std() / g.mean() == pytest.approx(1.0, rel=0.05)
    assert (g > 0).all()


@pytest.mark.parametrize("cv", [0.5, 2.0, 4.0])
def test_gamma_gaps_have_the_requested_cv_and_mean(cv):
    g = gaps(ArrivalSpec("gamma", cv), 2.0, N, seed=2)
    assert g.mean() == pytest.approx(0.5, rel=0.05 * cv)
    assert g.std() / g.mean() == pytest.approx(cv, rel=0.1)


def test_gamma_with_cv_one_is_exponential():
    g = gaps(ArrivalSpec("gamma", 1.0), 1.0, N, seed=3)
    # exponential: P(gap > t) = exp(-t)
    for t in (0.5, 1.0, 2.0):
        assert (g > t).mean() == pytest.approx(math.exp(-t), abs=0.015)


def test_arrivals_are_seeded_and_start_at_zero():
    spec = ArrivalSpec("gamma", 2.0)
    a, b, c = (arrival_times(spec, 1.0, 50, seed=s) for s in (7, 7, 8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert len(a) == 50 and a[0] == 0 and (np.diff(a) > 0).all()
    assert len(arrival_times(spec, 1.0, 1, seed=0)) == 1 and len(arrival_times(spec, 1.0, 0, seed=0)) == 0


def test_arrival_spec_refuses_bad_input():
    with pytest.raises(ValueError, match="--arrival gamma"):
        ArrivalSpec("poisson", 2.0)
    with pytest.raises(ValueError, match="--arrival"):
        ArrivalSpec("uniform")
    with pytest.raises(ValueError, match="positive"):
        ArrivalSpec("gamma", 0.0)
    with pytest.raises(ValueError, match="positive"):
        gaps(ArrivalSpec(), 0.0, 3, seed=0)


# ---- the sustained rate --------------------------------------------------------------------------
def test_sustained_rate_interpolates_between_last_meeting_and_first_missing_rate():
    s = sustained_rate([(4, 0.5), (1, 1.0), (3, 0.85), (2, 0.95)], 0.9)  # any order
    assert s.bound == "interpolated" and s.rate_rps == pytest.approx(2.5)


def test_sustained_rate_takes_the_first_miss_even_if_a_higher_rate_recovers():
    s = sustained_rate([(1, 0.95), (2, 0.8), (3, 0.95)], 0.9)
    assert s.rate_rps == pytest.approx(1 + 0.05 / 0.15)


def test_sustained_rate_exactly_at_target_counts_as_met():
    assert sustained_rate([(1, 1.0), (2, 0.9), (3, 0.6)], 0.9).rate_rps == pytest.approx(2.0)


def test_sustained_rate_bounds():
    every = sustained_rate([(1, 1.0), (2, 0.97)], 0.9)
    assert (every.bound, every.rate_rps) == ("at_least", 2) and every.describe().startswith(">=")
    none = sustained_rate([(1, 0.5), (2, 0.2)], 0.9)
    assert (none.bound, none.rate_rps) == ("below", 1) and none.describe().startswith("<")
    with pytest.raises(ValueError):
        sustained_rate([(1, 1.0), (1, 0.5)])
    with pytest.raises(ValueError):
        sustained_rate([])


# ---- one rate's summary --------------------------------------------------------------------------
def test_summarize_counts_every_request_and_orders_percentiles():
    slo = SLO(ttft_s=1.0, tpot_s=0.1)
    samples = [
        Sample("ok", 10, 5, scheduled=0.0, sent=0.0, first=0.5, end=0.9, output_tokens=5),  # tpot 0.1: meets
        Sample("slow-ttft", 10, 5, scheduled=1.0, sent=1.0, first=2.5, end=2.7, output_tokens=5),
        Sample("slow-tpot", 10, 3, scheduled=2.0, sent=2.0, first=2.2, end=3.2, output_tokens=3),
        Sample("failed", 10, 3, scheduled=3.0, sent=3.0, end=3.1, error="boom"),
    ]
    row = summarize(samples, 1.0, slo)
    assert (row["requests"], row["completed"], row["failed"], row["within_slo"]) == (4, 3, 1, 1)
    assert row["attainment"] == 0.25 and row["ttft_attainment"] == 0.5 and row["tpot_attainment"] == 0.5
    assert row["offered_rps"] == pytest.approx(1.0)  # 3 gaps over 3 s
    assert row["wall_s"] == pytest.approx(3.2)
    assert row["goodput_rps"] == pytest.approx(1 / 3.2) and row["achieved_rps"] == pytest.approx(3 / 3.2)
    for key in ("ttft_s", "tpot_s", "e2e_s"):
        p = row[key]
        assert p["p50"] <= p["p90"] <= p["p99"]
    assert row["ttft_s"]["p99"] == pytest.approx(1.5) and row["errors"] == ["boom"]


# ---- the planner's prediction --------------------------------------------------------------------
def test_predicted_sustained_matches_the_md1_closed_form():
    """Fixed prompts of 50 tokens, prefill 0.05 s + 1 ms/token = S = 0.1 s, decode free, no transfer. With
    one prompt per call the router is M/D/1: P(TTFT ok) ~ 1 - rho * exp(-slack * rho / W),
    W = rho*S / (2(1 - rho)), slack = SLO - S (the heavy-traffic shape; the simulation is the exact queue,
    so they agree to a few percent). The router's packed calls share the 50 ms and sustain more."""
    from pdserve.plan.simulate import ONE_PROMPT_PER_CALL

    profile = StageProfile(PrefillFit(0.05, 0.001), DecodeFit(0.0, 0.0, 0.0), kv_bytes_per_token=1, num_layers=1,
                           threads=2)
    s, slack = 0.1, 0.4

    def ok(rho: float) -> float:
        return 1 - rho * math.exp(-slack * 2 * (1 - rho) / s)

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) >= 0.9 else (lo, mid)
    slo = SLO(ttft_s=0.5, tpot_s=1.0)
    single = predicted_sustained(profile, [(50, 8)] * 10, slo, Config(1, 1, 16), threads_per_worker=2,
                                 transfer_gbps=0.0, policy=ONE_PROMPT_PER_CALL)
    assert single == pytest.approx(lo / s, rel=0.05)
    two = predicted_sustained(profile, [(50, 8)] * 10, slo, Config(2, 1, 16), threads_per_worker=2,
                              transfer_gbps=0.0, policy=ONE_PROMPT_PER_CALL)
    assert two > 1.9 * single  # prefill is the only cost: two workers, about twice the rate
    packed = predicted_sustained(profile, [(50, 8)] * 10, slo, Config(1, 1, 16), threads_per_worker=2,
                                 transfer_gbps=0.0)
    assert packed > 1.2 * single


def test_compare_reports_relative_error_and_bounds():
    c = compare(1.1, {"rate_rps": 1.0, "bound": "interpolated"})
    assert c["relative_error"] == pytest.approx(0.1) and c["verdict"].startswith("within")
    assert compare(2.0, {"rate_rps": 1.0, "bound": "interpolated"})["verdict"].startswith("outside")
    assert "lower bound" in compare(3.0, {"rate_rps": 2.0, "bound": "at_least"})["verdict"]


def test_cluster_mode_is_validated():
    assert ClusterConfig().mode == "pd"
    with pytest.raises(ValueError, match="--mode"):
        ClusterConfig(mode="both")


# ---- the report ----------------------------------------------------------------------------------
class _Loads(HTMLParser):
    """Every attribute of the page's own tags that would load something (script text is not parsed)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self.figures = ""
        self._in_figures = False

    def handle_starttag(self, tag, attrs):
        self._in_figures = dict(attrs).get("id") == "bench-figures"
        self.found += [f"<{tag} {k}={v}>" for k, v in attrs
                       if k in ("src", "href", "data", "srcset", "action") and v and not v.startswith("#")]

    def handle_data(self, data):
        if self._in_figures:
            self.figures += data


def check_report_html(text: str, report: dict) -> None:
    """One self-contained file with the dashboards' plotly bundle inlined, three panels with a trace per
    mode that ran (its rates and attainments), the target line and each mode's sustained rate."""
    assert plotly_js() in text and "Plotly.newPlot" in text
    loads = _Loads()
    loads.feed(text)
    assert loads.found == [], f"the report must be one self-contained file, it loads {loads.found}"
    figs = json.loads(loads.figures)
    assert [f["id"] for f in figs] == [f"panel-{key}" for key, _ in PANELS]
    ran = {m: r for m, r in report["modes"].items() if "error" not in r}
    for fig, (key, title) in zip(figs, PANELS):
        lay = fig["layout"]
        assert title in lay["title"]["text"]
        assert (lay["xaxis"]["title"]["text"], lay["yaxis"]["title"]["text"]) == ("request rate (req/s)",
                                                                                 "SLO attainment")
        traces = {t["name"]: t for t in fig["data"]}
        for mode, res in ran.items():
            t = traces[mode]
            assert t["x"] == [r["rate_rps"] for r in res["rates"]] and t["y"] == [r[key] for r in res["rates"]]
            assert "%{x" in t["hovertemplate"] and "%{y" in t["hovertemplate"]
            marker = next((t for name, t in traces.items() if name.startswith(f"{mode} sustained: ")), None)
            assert (marker is not None) == (key == "attainment")  # read off the both-SLOs curve only
            if marker:
                assert (marker["x"], marker["y"]) == ([res["sustained"]["rate_rps"]], [report["target"]])
        assert not {m for m in report["modes"] if m not in ran} & set(traces)
        target = traces[f"target {report['target']:.0%}"]
        assert target["y"] == [report["target"]] * 2 and target["x"][-1] >= max(report["rates"])


def _row(rate: float, both: float, ttft: float, tpot: float) -> dict:
    pct = {"p50": 0.1, "p90": 0.2, "p99": 0.3}
    return {"rate_rps": rate, "requests": 20, "completed": 20, "failed": 0, "offered_rps": rate, "achieved_rps": rate,
            "goodput_rps": both * rate, "within_slo": int(20 * both), "attainment": both, "ttft_attainment": ttft,
            "tpot_attainment": tpot, "wall_s": 20 / rate, "output_tokens": 100, "ttft_s": pct, "tpot_s": pct,
            "e2e_s": pct, "errors": []}


def test_report_draws_each_mode_with_plotly_in_one_file():
    pd = [_row(1, 1.0, 1.0, 1.0), _row(2, 0.95, 1.0, 0.95), _row(4, 0.5, 0.6, 0.9)]
    co = [_row(1, 0.95, 0.95, 1.0), _row(2, 0.7, 0.75, 0.9), _row(4, 0.2, 0.3, 0.5)]
    modes = {mode: {"rates": rows, "kv_blocks_leaked": 0,
                    "sustained": vars(sustained_rate([(r["rate_rps"], r["attainment"]) for r in rows], 0.9))}
             for mode, rows in (("pd", pd), ("colocated", co))}
    report = {"model": "m", "arrival_text": "Poisson", "rates": [1, 2, 4], "num_prompts": 20, "front_end": "openai",
              "slo": {"ttft_s": 1.0, "tpot_s": 0.1}, "target": 0.9, "machine": "here",
              "modes": {**modes, "other": {"error": "cannot start"}}}
    assert modes["pd"]["sustained"]["rate_rps"] == pytest.approx(2 + 0.05 / 0.45 * 2)
    check_report_html(render_html(report), report)


# ---- end to end ----------------------------------------------------------------------------------
def _nearest_rank(values: list[float], q: int) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


@pytest.mark.slow
@pytest.mark.parametrize("front_end", ["openai", "direct"])
def test_bench_serve_quick_end_to_end(ray_cluster, tmp_path, capsys, monkeypatch, front_end):
    from pdserve.bench.serve_plan import colocated_threads, worker_threads
    from pdserve.cli import build_parser, cluster_config, engine_config, main, router_config
    from pdserve.plan.check import predicted_sustained_colocated
    from pdserve.plan.simulate import RouterPolicy

    made, measured = [], []  # the runs make_runs scheduled; each rate's samples as summarize got them
    real_make_runs, real_summarize = serve.make_runs, serve.summarize

    def make_runs(*a, **k):
        made.append(real_make_runs(*a, **k))
        return made[-1]

    def summarize(samples, rate, slo):
        measured.append((rate, list(samples)))
        return real_summarize(samples, rate, slo)

    monkeypatch.setattr(serve, "make_runs", make_runs)
    monkeypatch.setattr(serve, "summarize", summarize)
    out, html, prof = tmp_path / "serve.json", tmp_path / "serve.html", tmp_path / "profile.json"
    if front_end == "openai":  # profiled in the run (`--plan`), as a user would
        plan_args = ["--plan", "--profile-out", str(prof)]
    else:  # a hand-made profile: the prediction does not depend on this machine's load
        prof.write_text(StageProfile(PrefillFit(0.02, 0.0005), DecodeFit(0.01, 0.001, 0.0), kv_bytes_per_token=1,
                                     num_layers=1, threads=1).to_json())
        plan_args = ["--profile", str(prof), "--direct"]
    modes = ["pd"] if front_end == "openai" else ["pd", "colocated"]  # the planner's colocated side once
    argv = ["bench", "serve", "--quick", "--modes", ",".join(modes), "--kv-cache-gib", "0.25", "--json", str(out),
            "--report", str(html), *plan_args]
    rc = main(argv)
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["front_end"] == front_end
    pd = report["modes"]["pd"]
    assert pd["kv_blocks_leaked"] == 0 and len(pd["rates"]) == 2 and len(measured) == 2 * len(modes)
    (runs, _), = made  # the same requests for every mode
    slo = report["slo"]
    for i, ((rate, requests, offsets), (m_rate, samples), row) in enumerate(zip(runs, measured[:2], pd["rates"])):
        assert rate == m_rate == row["rate_rps"] == (0.5, 1.0)[i]
        # every request sent is measured once: none lost, none duplicated, none from another rate
        assert sorted(s.custom_id for s in samples) == sorted(r.custom_id for r in requests)
        assert len({r.custom_id for r in requests}) == len(requests) == report["num_prompts"] == 4
        assert row["requests"] == row["completed"] == 4 and row["failed"] == 0, row["errors"]
        # each sent at its seeded time, so the offered rate is the one the seeded arrivals scheduled
        seeded = arrival_times(ArrivalSpec(), rate, 4, seed=i)
        assert [s.scheduled for s in samples] == offsets == seeded.tolist()
        assert row["offered_rps"] == pytest.approx(3 / (seeded[-1] - seeded[0]), rel=0.1)
        assert all(-0.01 <= s.sent - s.scheduled < 0.5 for s in samples), [(s.scheduled, s.sent) for s in samples]
        # EOS ignored: every request streamed all its tokens, and usage said so
        assert [s.output_tokens for s in samples] == [s.max_tokens for s in samples]
        assert row["output_tokens"] == sum(s.max_tokens for s in samples)
        # the decode workers' own counters over this rate alone: one row per token after the prefill's
        d = row["decode"]
        assert d["rows"] == sum(s.max_tokens - 1 for s in samples) and d["steps"] > 0
        assert d["mean_batch"] == pytest.approx(d["rows"] / d["steps"]) and 1 <= d["mean_batch"] <= 4
        assert 0 < d["step_cpu_ms"] <= d["step_ms"] * 1.01 and 0 < d["busy"] <= 1.01
        assert (min(s.prompt_tokens for s in samples) <= d["mean_context"]
                <= max(s.prompt_tokens + s.max_tokens for s in samples))
        # attainment and percentiles from the client's own times
        ttft = [s.first - s.sent for s in samples]
        tpot = [(s.end - s.first) / (s.output_tokens - 1) for s in samples]
        both = sum(a <= slo["ttft_s"] and b <= slo["tpot_s"] for a, b in zip(ttft, tpot))
        assert row["attainment"] == both / 4 and row["ttft_attainment"] == sum(a <= slo["ttft_s"] for a in ttft) / 4
        assert row["tpot_attainment"] == sum(b <= slo["tpot_s"] for b in tpot) / 4
        for key, values in (("ttft_s", ttft), ("tpot_s", tpot)):
            p = row[key]
            assert p["p50"] <= p["p90"] <= p["p99"]
            assert [p[f"p{q}"] for q in (50, 90, 99)] == [_nearest_rank(values, q) for q in (50, 90, 99)]
    assert pd["sustained"] == vars(sustained_rate([(r["rate_rps"], r["attainment"]) for r in pd["rates"]], 0.9))
    # the planner predicts from the profile (measured and written out, or given) over the lengths
    # benchmarked; from a measured --quick profile the value depends on the load (under load it may say
    # that no rate meets the SLOs), from the hand-made one it is positive
    assert report["lengths"] == [[s.prompt_tokens, s.max_tokens] for _, samples in measured[:2] for s in samples]
    args = build_parser().parse_args(argv)
    cluster, engine = cluster_config(args), engine_config(args)
    plan = report["plan"]
    assert plan["predicted_rps"] == predicted_sustained(
        StageProfile.load(prof), [tuple(x) for x in report["lengths"]], SLO(**slo),
        Config(cluster.num_prefill, cluster.num_decode, engine.max_num_seqs), worker_threads(cluster), 0.9,
        policy=RouterPolicy.of(router_config(args, engine)), cached_tokens=plan["cached_prompt_tokens"],
        front_end_cpu_s=plan["front_end_cpu_ms"] / 1e3)
    # the benchmark process's own CPU (router, server, client) per request sent, measured over each rate
    assert plan["front_end_cpu_ms"] == pytest.approx(1e3 * sum(r["front_end_cpu_s"] for r in pd["rates"]) / sum(
        r["requests"] for r in pd["rates"])) and plan["front_end_cpu_ms"] > 0
    # the server's prefix-cache hits, as it reported them in each stream's usage
    assert plan["cached_prompt_tokens"] == sum(r["cached_prompt_tokens"] for r in pd["rates"]) / sum(
        r["completed"] for r in pd["rates"])
    assert all(0 <= r["cached_prompt_tokens"] < r["prompt_tokens"] for r in pd["rates"])
    assert plan["cached_prompt_tokens"] > 0  # the chat template's system prompt, cached since the warm-up
    assert plan["measured_rps"] == pd["sustained"]["rate_rps"]
    assert front_end == "openai" or plan["predicted_rps"] > 0.5
    if "colocated" in modes:
        colo = report["modes"]["colocated"]
        assert colo["kv_blocks_leaked"] == 0 and plan["colocated"]["measured_rps"] == colo["sustained"]["rate_rps"]
        assert plan["colocated"]["predicted_rps"] == predicted_sustained_colocated(
            StageProfile.load(prof), [tuple(x) for x in report["lengths"]], SLO(**slo), cluster.num_colocated,
            engine.max_num_seqs, cluster.max_num_batched_tokens, colocated_threads(cluster), 0.9,
            cached_tokens=plan["colocated"]["cached_prompt_tokens"],
            front_end_cpu_s=plan["colocated"]["front_end_cpu_ms"] / 1e3) > 0.5
    else:
        assert "colocated" not in plan
    check_report_html(html.read_text(encoding="utf-8"), report)
    printed = capsys.readouterr().out
    assert "sustained at >= 90% attainment" in printed
    assert ("planner vs measured (colocated" in printed) == ("colocated" in modes)


def test_decode_stage_from_counters_and_a_restart_in_between():
    from pdserve.bench.serve import decode_stage

    d = decode_stage((10, 1.0, 40, 0.8, 4000, 0.1), (30, 3.0, 120, 2.4, 12000, 0.3), wall_s=4.0, workers=1)
    assert d == {"steps": 20, "rows": 80, "step_ms": pytest.approx(100.0), "step_cpu_ms": pytest.approx(80.0),
                 "mean_batch": 4.0, "mean_context": 100.0, "core_wait_ms": pytest.approx(10.0), "busy": 0.5}
    # colocated keeps no contexts; a kernel without scheduler stats no run-queue time
    unknown = decode_stage((10, 1.0, 40, 0.8, 0, 0), (30, 3.0, 120, 2.4, 0, 0), wall_s=4.0, workers=1)
    assert unknown["mean_context"] is None and unknown["core_wait_ms"] is None and unknown["steps"] == 20
    restarted = decode_stage((10, 1.0, 40, 0.8, 0, 0), (3, 0.3, 9, 0.2, 0, 0), wall_s=4.0, workers=1)  # began again
    assert set(restarted.values()) == {None}
    assert set(decode_stage(None, (3, 0.3, 9, 0.2, 0, 0), 4.0, 1).values()) == {None}
