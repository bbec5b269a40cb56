"""`pdserve bench autoscale --simulate`: the autoscaler's controller against the planner's simulator on
seeded step, diurnal and bursty traces, each against the cheapest static P:D reaching its attainment."""

from __future__ import annotations

import argparse


def add_parser(bench) -> None:
    a = bench.add_parser("autoscale", help="the goodput autoscaler against the best static P:D (simulated)")
    a.add_argument("--simulate", action="store_true", help="run against the planner's simulator (required: the "
                   "autoscaler on a real cluster, `pdserve up --autoscale`, is not built yet)")
    a.add_argument("--profile", required=True, help="a stage profile JSON (`pdserve plan --profile-out FILE`)")
    a.add_argument("--traces", default="step,diurnal,bursty")
    a.add_argument("--peak-rps", type=float, default=20.0, help="the traces' highest offered rate")
    a.add_argument("--duration", type=float, default=7200.0, help="seconds of each trace")
    a.add_argument("--interval", type=float, default=30.0, help="seconds between controller decisions")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--prompt-len", default="16:512")
    a.add_argument("--output-len", default="16:256")
    a.add_argument("--slo-ttft", type=float, default=2.0)
    a.add_argument("--slo-tpot", type=float, default=0.15)
    a.add_argument("--max-batch", type=int, default=64, help="decode batch (max_num_seqs) of every decode worker")
    a.add_argument("--samples", type=int, default=200, help="requests each simulated interval draws")
    a.add_argument("--min-prefill", type=int, default=1)
    a.add_argument("--max-prefill", type=int, default=64)
    a.add_argument("--min-decode", type=int, default=1)
    a.add_argument("--max-decode", type=int, default=64)
    a.set_defaults(func=cmd_bench_autoscale)


def cmd_bench_autoscale(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pdserve.autoscale.controller import Bounds, Capacity, ControllerConfig
    from pdserve.autoscale.simulate import FleetModel, TraceKind, best_static, run_autoscaled, trace
    from pdserve.observability.metrics import SLO
    from pdserve.plan.model import LengthDist, Resources, Workload, stage_capacity_rps
    from pdserve.plan.profile import StageProfile

    if not args.simulate:
        raise ValueError("only --simulate is built: the autoscaler on a running cluster (pdserve up --autoscale) "
                         "is not yet")
    kinds = [TraceKind(t) for t in args.traces.split(",") if t]
    profile = StageProfile.load(Path(args.profile))
    workload = Workload(1.0, LengthDist.parse(args.prompt_len), LengthDist.parse(args.output_len),
                        SLO(ttft_s=args.slo_ttft, tpot_s=args.slo_tpot), samples=args.samples, seed=args.seed)
    most = args.max_prefill + args.max_decode
    resources = Resources(total=float(most), per_worker=1.0, shared=False)  # a cluster: workers do not interfere
    capacity = Capacity(*stage_capacity_rps(profile, workload, resources, args.max_batch))
    config = ControllerConfig(prefill=Bounds(args.min_prefill, args.max_prefill),
                              decode=Bounds(args.min_decode, args.max_decode))
    model = FleetModel(profile, workload, resources, args.max_batch)
    print(f"model: one prefill worker {capacity.prefill_rps:.2f} req/s, one decode worker {capacity.decode_rps:.2f} "
          f"req/s (batch {args.max_batch}); {args.duration:g} s traces, a decision every {args.interval:g} s")
    print(f"{'trace':8} {'attain':>7} {'worker-s':>9} {'changes':>7} | {'static P:D':>10} {'attain':>7} "
          f"{'worker-s':>9} | {'ratio':>5}")
    for kind in kinds:
        rates = trace(kind, args.peak_rps, args.duration, args.interval, args.seed)
        auto = run_autoscaled(model, rates, args.interval, config, capacity, args.seed)
        static = best_static(model, rates, args.interval, capacity, auto.attainment, most)
        right = (f"{static.prefill:>4}:{static.decode:<5} {static.attainment:>7.3f} {static.worker_s:>9.0f} | "
                 f"{auto.worker_s / static.worker_s:>5.2f}" if static else "   none reaches it")
        print(f"{kind.value:8} {auto.attainment:>7.3f} {auto.worker_s:>9.0f} {auto.direction_changes:>7} | {right}")
    print(f"({model.calls} simulated intervals; ratio: autoscaled worker-seconds over the static ones)")
    return 0
