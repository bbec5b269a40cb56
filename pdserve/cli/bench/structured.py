"""`pdserve bench structured`: decode tok/s with and without a JSON schema, and valid answers with and without it
(pdserve/bench/structured.py)."""

from __future__ import annotations

import argparse
import json


def add_parser(bench) -> None:
    from pdserve.bench.structured import StructuredBench

    p = bench.add_parser("structured", help="decode tok/s with and without a JSON schema; valid answers with and "
                                            "without it")
    p.add_argument("--batch-sizes", default="1,16,64")
    p.add_argument("--steps", type=int, default=StructuredBench.steps)
    p.add_argument("--validity-requests", type=int, default=StructuredBench.validity_requests)
    p.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto (the CPU's best)")
    p.add_argument("--num-threads", type=int, default=0, help="torch threads (0: torch's choice)")
    p.add_argument("--json", default=None, help="also write the report here")
    p.add_argument("--quick", action="store_true", help="batch 2, 4 steps, 4 requests: checks the benchmark runs")
    p.set_defaults(func=cmd_bench_structured)


def cmd_bench_structured(args: argparse.Namespace) -> int:
    from pdserve.bench.structured import StructuredBench, run, table

    bench = StructuredBench(batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")), steps=args.steps,
                            validity_requests=args.validity_requests, dtype=args.dtype, num_threads=args.num_threads)
    if args.quick:
        bench = StructuredBench(batch_sizes=(2,), steps=4, validity_requests=4, max_tokens=48, dtype=args.dtype,
                                num_threads=args.num_threads)
    report = run(bench)
    print(table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0
