"""`pdserve bench serve`: SLO attainment and goodput against the request rate, PD against colocated
(pdserve/bench/serve.py runs it; pdserve/bench/serve_plan.py sets `pdserve plan`'s prediction beside it)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from pdserve.cli import flags


def add_parser(bench) -> None:
    from pdserve.observability.metrics import SLO

    p = bench.add_parser("serve", help="SLO attainment and goodput vs request rate, PD against colocated",
                         description="Poisson or gamma arrivals at each rate, every request streamed through the "
                                     "openai client against the in-process server (or --direct into the serving "
                                     "loop); per rate and mode: goodput, SLO attainment, TTFT/TPOT/e2e "
                                     "percentiles; the highest rate each mode sustains at the target attainment; "
                                     "an HTML report of attainment vs rate.")
    w = p.add_argument_group("arrivals and workload")
    w.add_argument("--request-rates", default="0.5,1,2,4", help="comma-separated requests/s")
    w.add_argument("--arrival", default="poisson", choices=("poisson", "gamma"))
    w.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma: coefficient of variation of the gaps between arrivals (1: as Poisson; >1: burstier). "
                        "Note: vLLM's --burstiness is the gamma shape, 1/CV^2")
    w.add_argument("--num-prompts", type=int, default=50, help="requests per rate")
    w.add_argument("--prompt-len", default="16:512", help="prompt tokens MIN:MAX (the bench workload's, chat template "
                                                          "included)")
    w.add_argument("--prompt-dist", default="loguniform", choices=("loguniform", "uniform"))
    w.add_argument("--output-len", default="16:128", help="output tokens MIN:MAX, uniform (EOS ignored)")
    w.add_argument("--seed", type=int, default=0)
    m = p.add_argument_group("modes and front end")
    m.add_argument("--modes", default="pd,colocated", help="comma-separated: pd, colocated")
    m.add_argument("--direct", action="store_true", help="hand requests to the router in-process (no HTTP)")
    m.add_argument("--warmup", type=int, default=2, help="uncounted requests per mode before the first rate")
    s = p.add_argument_group("SLOs (defaults: run-batch's, serve's and plan's, for SmolLM2-135M on 2 cores)")
    s.add_argument("--ttft-slo", "--slo-ttft", dest="ttft_slo", type=float, default=SLO.ttft_s,
                   help="time-to-first-token SLO, seconds")
    s.add_argument("--tpot-slo", "--slo-tpot", dest="tpot_slo", type=float, default=SLO.tpot_s,
                   help="time-per-output-token SLO, seconds")
    s.add_argument("--attainment-target", type=float, default=0.9, help="the sustained rate is read at this attainment")
    pl = p.add_argument_group("planner vs measured")
    pl.add_argument("--plan", action="store_true",
                    help="also predict the pd rate sustained at the target with `pdserve plan`'s model (profile "
                         "measured first in this run, or --profile) and report it against the measured one")
    pl.add_argument("--profile", default=None, help="a `pdserve plan --profile-out` JSON instead of profiling")
    pl.add_argument("--profile-out", default=None, help="write the profile measured for --plan here")
    o = p.add_argument_group("output")
    o.add_argument("--report", default="bench_serve.html", help="the HTML report written here")
    o.add_argument("--json", default=None, help="also write the full report here")
    o.add_argument("--quick", action="store_true", help="a few short requests at two low rates: checks it runs")
    flags.engine_args(p)
    flags.cluster_args(p)
    p.set_defaults(func=cmd_bench_serve, online_router=True)


def _range(text: str, flag: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    try:
        lo, hi = int(low), int(high or low)
    except ValueError:
        raise ValueError(f"{flag} is N or MIN:MAX, got {text!r}") from None
    if not 1 <= lo <= hi:
        raise ValueError(f"{flag} needs 1 <= MIN <= MAX, got {text!r}")
    return lo, hi


def bench_from_args(args: argparse.Namespace):
    from pdserve.bench.arrivals import ArrivalSpec
    from pdserve.bench.serve import ServeBench
    from pdserve.bench.workload import WorkloadSpec
    from pdserve.observability.metrics import SLO

    try:
        rates = tuple(float(r) for r in args.request_rates.split(",") if r)
    except ValueError:
        raise ValueError(f"--request-rates takes numbers, got {args.request_rates!r}") from None
    (pmin, pmax), (omin, omax) = _range(args.prompt_len, "--prompt-len"), _range(args.output_len, "--output-len")
    workload = WorkloadSpec(min_prompt=pmin, max_prompt=pmax, min_output=omin, max_output=omax, seed=args.seed,
                            prompt_lengths=args.prompt_dist)
    bench = ServeBench(rates=rates, modes=tuple(m for m in args.modes.split(",") if m),
                       arrival=ArrivalSpec(args.arrival, args.burstiness), num_prompts=args.num_prompts,
                       workload=workload, slo=SLO(ttft_s=args.ttft_slo, tpot_s=args.tpot_slo), direct=args.direct,
                       target=args.attainment_target, warmup=args.warmup, seed=args.seed)
    if args.quick:
        from dataclasses import replace

        bench = replace(bench, rates=(0.5, 1.0), num_prompts=4, warmup=1,
                        workload=replace(workload, min_prompt=16, max_prompt=64, min_output=2, max_output=6))
    return bench


def cmd_bench_serve(args: argparse.Namespace) -> int:
    import json

    from engine.cpu_features import CpuInfo
    from pdserve.bench.serve import run
    from pdserve.bench.serve_plan import measure_profile, plan_vs_measured, worker_threads
    from pdserve.bench.serve_report import render_html, render_table

    bench = bench_from_args(args)
    engine, cluster = flags.engine_config(args), flags.cluster_config(args)
    machine = (f"{CpuInfo.here().describe(f'auto -> {engine.resolved().dtype}')}; {os.cpu_count()} cores, "
               f"load average {os.getloadavg()[0]:.1f} at the start")  # a shared machine's timings say so
    print(machine)
    profile = None
    if args.plan or args.profile:
        from pdserve.plan.profile import StageProfile

        # Profiled before any worker starts, so nothing competes with it.
        profile = (StageProfile.load(Path(args.profile)) if args.profile
                   else measure_profile(engine, worker_threads(cluster), bench, args.quick))
        if args.profile_out:
            profile.save(Path(args.profile_out))
    router = flags.router_config(args, engine)
    report = run(bench, engine, cluster, router)
    report["machine"] = f"{machine}, {os.getloadavg()[0]:.1f} at the end"
    if profile is not None:
        report["plan"] = plan_vs_measured(profile, report, cluster, engine, router)
    print(render_table(report))
    Path(args.report).write_text(render_html(report), encoding="utf-8")  # plotly.js is not all ASCII
    print(f"report: {args.report}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    failed = [m for m, r in report["modes"].items() if "error" in r]
    return 1 if failed else 0
