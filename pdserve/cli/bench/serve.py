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
    w.add_argument("--request-rates", "--request-rate", dest="request_rates", default="0.5,1,2,4",
                   help="comma-separated requests/s (vLLM's --request-rate: one rate)")
    w.add_argument("--arrival", default="poisson", choices=("poisson", "gamma"))
    w.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma: coefficient of variation of the gaps between arrivals (1: as Poisson; >1: burstier). "
                        "Note: vLLM's --burstiness is the gamma shape, 1/CV^2")
    w.add_argument("--num-prompts", type=int, default=50, help="requests per rate")
    w.add_argument("--prompt-len", default="16:512", help="prompt tokens MIN:MAX (the bench workload's, chat template "
                                                          "included)")
    w.add_argument("--prompt-dist", default="loguniform", choices=("loguniform", "uniform", "bimodal"))
    w.add_argument("--workload", default=None, choices=("bimodal",),
                   help="bimodal: most prompts up to 256 tokens (log-uniform from the --prompt-len minimum), 15%% "
                        "of 2-4k tokens; sets --prompt-dist bimodal and caps the short ones at 256")
    w.add_argument("--output-len", default="16:128", help="output tokens MIN:MAX, uniform (EOS ignored)")
    w.add_argument("--seed", type=int, default=0)
    _vllm_load_args(p)
    m = p.add_argument_group("modes and front end")
    m.add_argument("--modes", default="pd,colocated", help="comma-separated: pd, colocated, hybrid")
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


def _vllm_load_args(p) -> None:
    """vLLM's `bench serve` flags, for the same load through pdserve and any OpenAI-compatible server."""
    v = p.add_argument_group("vLLM's load (`vllm bench serve --backend openai --endpoint /v1/completions`)")
    v.add_argument("--dataset-name", default="chat", choices=("chat", "random"),
                   help="chat: the bench workload's chats (--prompt-len, --output-len); random: vLLM's random "
                        "dataset, sent to /v1/completions in vLLM's request/stream format")
    v.add_argument("--random-input-len", type=int, default=1024, help="random: prompt tokens")
    v.add_argument("--random-output-len", type=int, default=128, help="random: output tokens")
    v.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="random: lengths drawn in [len * (1 - r), len * (1 + r)]")
    v.add_argument("--ignore-eos", action="store_true",
                   help="accepted for vLLM's command lines: EOS is always ignored here")
    v.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                   help="vLLM's goodput SLOs, e.g. ttft:2000 tpot:150 (milliseconds; sets --ttft-slo/--tpot-slo)")
    v.add_argument("--base-url", action="append", default=[], metavar="[LABEL=]URL",
                   help="also load this running OpenAI-compatible server (repeatable; e.g. "
                        "vllm=http://127.0.0.1:8000); the first is the baseline the report's ratios are "
                        "taken against. With --modes '' only these")
    v.add_argument("--served-model-name", dest="served_model", default=None,
                   help="the model name sent to --base-url servers (default: the first each lists)")


def _goodput_slo(pairs: list[str] | None, slo):
    """vLLM's `--goodput ttft:MS tpot:MS` over the SLO the other flags gave."""
    from dataclasses import replace

    fields = {"ttft": "ttft_s", "tpot": "tpot_s"}
    for pair in pairs or ():
        key, _, value = pair.partition(":")
        try:
            seconds = float(value) / 1e3
        except ValueError:
            raise ValueError(f"--goodput takes KEY:MILLISECONDS, got {pair!r}") from None
        if key not in fields or seconds <= 0:
            raise ValueError(f"--goodput keys are ttft and tpot with positive milliseconds, got {pair!r}")
        slo = replace(slo, **{fields[key]: seconds})
    return slo


def bench_from_args(args: argparse.Namespace):
    from pdserve.bench.arrivals import ArrivalSpec
    from pdserve.bench.openai_load import RandomDataset
    from pdserve.bench.serve import ServeBench, Target
    from pdserve.bench.workload import WorkloadSpec
    from pdserve.observability.metrics import SLO

    try:
        rates = tuple(float(r) for r in args.request_rates.split(",") if r)
    except ValueError:
        raise ValueError(f"--request-rates takes numbers, got {args.request_rates!r}") from None
    (pmin, pmax), (omin, omax) = _range(args.prompt_len, "--prompt-len"), _range(args.output_len, "--output-len")
    dist = args.prompt_dist
    if getattr(args, "workload", None) == "bimodal":
        dist, pmax = "bimodal", min(pmax, 256)
    workload = WorkloadSpec(min_prompt=pmin, max_prompt=pmax, min_output=omin, max_output=omax, seed=args.seed,
                            prompt_lengths=dist)
    slo = _goodput_slo(args.goodput, SLO(ttft_s=args.ttft_slo, tpot_s=args.tpot_slo))
    dataset = (RandomDataset(args.random_input_len, args.random_output_len, args.random_range_ratio)
               if args.dataset_name == "random" else None)
    bench = ServeBench(rates=rates, modes=tuple(m for m in args.modes.split(",") if m),
                       arrival=ArrivalSpec(args.arrival, args.burstiness), num_prompts=args.num_prompts,
                       workload=workload, slo=slo, direct=args.direct, target=args.attainment_target,
                       warmup=args.warmup, seed=args.seed, targets=tuple(Target.parse(u) for u in args.base_url),
                       dataset=dataset, model=args.served_model)
    if args.quick:
        from dataclasses import replace

        bench = replace(bench, rates=(0.5, 1.0), num_prompts=4, warmup=1,
                        workload=replace(workload, min_prompt=16, max_prompt=64, min_output=2, max_output=6),
                        dataset=dataset and replace(dataset, input_len=min(dataset.input_len, 48),
                                                    output_len=min(dataset.output_len, 6)))
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
