"""`pdserve plan`: recommend prefill/decode worker counts and the max decode batch for a workload."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path


def add_parser(sub) -> None:
    from engine.config import DTYPE_CHOICES
    from pdserve.observability.metrics import SLO

    p = sub.add_parser("plan", help="recommend prefill/decode worker counts and max decode batch for a workload",
                       description="Profile prefill and decode on this hardware (or read --profile), then predict "
                                   "SLO attainment and goodput of every prefill/decode split that fits the "
                                   "resources (a simulation of the router: length-bucketed prefill calls, "
                                   "decode batches joined at step boundaries) and recommend "
                                   "the one with the most goodput per core or GPU.")
    w = p.add_argument_group("workload")
    w.add_argument("--rate", type=float, default=1.0, help="arrival rate, requests/s (Poisson)")
    w.add_argument("--burstiness", type=float, default=1.0,
                   help="coefficient of variation of the gaps between arrivals (1: Poisson; >1: burstier gamma), "
                        "as for bench serve")
    w.add_argument("--prompt-len", default="16:512", help="prompt tokens: N, or MIN:MAX (see --prompt-dist)")
    w.add_argument("--prompt-dist", default="uniform", choices=("uniform", "loguniform"),
                   help="how prompt lengths spread over --prompt-len (bench serve's default is loguniform)")
    w.add_argument("--output-len", default="16:256", help="output tokens: N, or MIN:MAX uniform")
    w.add_argument("--cached-prompt-tokens", type=float, default=0.0,
                   help="prompt tokens per request found in the prefix cache (e.g. a shared system prompt); "
                        "bench serve reports them per rate")
    w.add_argument("--slo-ttft", type=float, default=SLO.ttft_s, help="time-to-first-token SLO, seconds")
    w.add_argument("--slo-tpot", type=float, default=SLO.tpot_s, help="time-per-output-token SLO, seconds")
    w.add_argument("--samples", type=int, default=2000, help="requests drawn to average attainment over")
    w.add_argument("--seed", type=int, default=0)
    r = p.add_argument_group("resources")
    r.add_argument("--cpus", type=float, default=float(os.cpu_count() or 1), help="cores in all (default: this host's)")
    r.add_argument("--gpus", type=float, default=0.0, help="GPUs in all; when set, workers are placed on GPUs")
    r.add_argument("--per-worker", type=float, default=1.0, help="cores (or GPUs) each worker gets")
    r.add_argument("--max-num-seqs", default="8,16,32,64,128,256", help="max decode batches to consider")
    r.add_argument("--max-prefill-tokens", type=int, default=2048,
                   help="the router's token budget per prefill call (as for run-batch and serve)")
    r.add_argument("--front-end-cpu-ms", type=float, default=0.0,
                   help="CPU ms the router and front end spend per request on the workers' cores (bench serve "
                        "reports it); 0: not modelled")
    r.add_argument("--transfer-gbps", type=float, default=2.0, help="KV transfer bandwidth; 0: free")
    r.add_argument("--workers-share-device", choices=("auto", "yes", "no"), default="auto",
                   help="whether workers slow each other down (one node's cores, one GPU): profile each stage "
                        "beside a busy neighbour and count it. auto: yes for --cpus, no for --gpus")
    m = p.add_argument_group("profile")
    m.add_argument("--profile", default=None, help="read this profile JSON instead of profiling")
    m.add_argument("--profile-out", default=None, help="write the measured profile here")
    m.add_argument("--quick", action="store_true", help="tiny profile sizes and fewer samples: checks it runs")
    m.add_argument("--model", default=None, help="as for run-batch; default SmolLM2-135M-Instruct")
    m.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    m.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    m.add_argument("--threads", type=int, default=0,
                   help="torch threads while profiling (default: --per-worker on CPUs, torch's choice on a GPU)")
    m.add_argument("--cache-dir", default=None)
    p.add_argument("--json", default=None, help="also write every prediction here")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict, replace

    from pdserve.observability.metrics import SLO
    from pdserve.plan.model import LengthDist, Resources, Workload, search, search_colocated
    from pdserve.plan.report import render
    from pdserve.plan.simulate import ROUTER_DEFAULTS

    gpu = args.gpus > 0
    resources = Resources(total=args.gpus if gpu else args.cpus, per_worker=args.per_worker,
                          kind="gpu" if gpu else "cpu", transfer_gbps=args.transfer_gbps,
                          shared={"auto": None, "yes": True, "no": False}[args.workers_share_device],
                          front_end_cpu_s_per_request=args.front_end_cpu_ms / 1e3)
    if args.cached_prompt_tokens < 0 or args.front_end_cpu_ms < 0:
        raise ValueError("--cached-prompt-tokens and --front-end-cpu-ms cannot be negative, got "
                         f"{args.cached_prompt_tokens} and {args.front_end_cpu_ms}")
    if args.rate <= 0 or args.burstiness <= 0:
        raise ValueError(f"--rate and --burstiness must be positive, got {args.rate} and {args.burstiness}")
    workload = Workload(rate_rps=args.rate, prompt=LengthDist.parse(args.prompt_len, args.prompt_dist),
                        output=LengthDist.parse(args.output_len), slo=SLO(ttft_s=args.slo_ttft, tpot_s=args.slo_tpot),
                        samples=500 if args.quick else args.samples, seed=args.seed, cv=args.burstiness,
                        cached_tokens=args.cached_prompt_tokens)
    batches = tuple(int(b) for b in args.max_num_seqs.split(",") if b)
    if not batches or min(batches) <= 0:
        raise ValueError(f"--max-num-seqs takes positive integers, got {args.max_num_seqs!r}")
    profile = _load_or_measure(args, resources)
    if args.profile_out:
        profile.save(Path(args.profile_out))
    if args.max_prefill_tokens < 1:
        raise ValueError(f"--max-prefill-tokens must be positive, got {args.max_prefill_tokens}")
    policy = replace(ROUTER_DEFAULTS, max_prefill_tokens=args.max_prefill_tokens)
    ranked = search(profile, workload, resources, batches, policy)
    colocated = search_colocated(profile, workload, resources, batches, policy)
    print(render(profile, workload, resources, ranked, colocated=colocated, policy=policy))
    if args.json:
        report = {"workload": asdict(replace(workload, prompt=str(workload.prompt), output=str(workload.output))),
                  "resources": asdict(resources),
                  "predictions": [{**asdict(p), "stable": p.stable,
                                   "goodput_rps": p.goodput_rps(workload.rate_rps),
                                   "limiting_stage": p.limiting_stage} for p in ranked],
                  "colocated": {**asdict(colocated), "stable": colocated.stable,
                                "goodput_rps": colocated.goodput_rps(workload.rate_rps)}}
        Path(args.json).write_text(json.dumps(_finite(report), indent=2))
    return 0


def _finite(obj):
    """Strict JSON: an unstable stage's infinite wait or batch becomes null."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def _load_or_measure(args: argparse.Namespace, resources):
    from pdserve.plan.profile import QUICK_SIZES, ProfileSizes, StageProfile, measure

    if args.profile:
        return StageProfile.load(Path(args.profile))
    from engine.config import EngineConfig
    from engine.cpu_features import CpuInfo
    from engine.runner import ModelRunner

    threads = args.threads or (int(resources.per_worker) if resources.kind == "cpu" else 0)
    kwargs = {"model": args.model, "dtype": args.dtype, "device": args.device, "num_threads": threads}
    if args.cache_dir:
        kwargs["cache_dir"] = args.cache_dir
    runner = ModelRunner(EngineConfig(**kwargs))
    cfg = runner.config
    where = CpuInfo.here().describe() if cfg.device == "cpu" else cfg.device
    description = f"{runner.folder.name} {cfg.dtype} on {where}"
    return measure(runner, QUICK_SIZES if args.quick else ProfileSizes(), threads, description,
                   neighbour=resources.interfere)
