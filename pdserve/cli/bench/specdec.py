"""`pdserve bench specdec`: speculative decoding (drafters x γ x batch size) against plain decoding."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path


def add_parser(bench) -> None:
    sd = bench.add_parser("specdec", help="speculative decoding: drafters x γ x batch size vs plain decoding")
    sd.add_argument("--target", default=None, help="HF folder or .gguf of the target; default SmolLM2-135M-Instruct")
    sd.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto (the CPU's best)")
    sd.add_argument("--drafters", default="ngram,layers:24", help="comma-separated: ngram, layers:K, model:PATH")
    sd.add_argument("--gammas", default="2,3,5,7,auto", help="comma-separated γ values and/or auto")
    sd.add_argument("--batch-sizes", default="1,8,64")
    sd.add_argument("--max-tokens", type=int, default=48, help="greedy output tokens per request (EOS ignored)")
    sd.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    sd.add_argument("--cache-dir", default=None)
    sd.add_argument("--svg", default="specdec_speedup.svg", help="speedup-vs-γ plot written here")
    sd.add_argument("--quick", action="store_true", help="two γ, one batch of 2, 8 tokens: checks the benchmark runs")
    sd.add_argument("--json", default=None, help="also write the full report here")
    sd.set_defaults(func=cmd_bench_specdec)


def cmd_bench_specdec(args: argparse.Namespace) -> int:
    from pdserve.bench.specdec import SpecBench, run, table

    gammas = tuple(g if g == "auto" else int(g) for g in args.gammas.split(","))
    bench = SpecBench(target=args.target, dtype=args.dtype, drafters=tuple(args.drafters.split(",")), gammas=gammas,
                      batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")), max_tokens=args.max_tokens,
                      num_threads=args.threads, cache_dir=args.cache_dir)
    if args.quick:
        bench = replace(bench, gammas=(2, "auto"), batch_sizes=(2,), max_tokens=8, passage_tokens=40)
    report = run(bench, out_svg=args.svg)
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    best = max((r for r in report["rows"] if r["drafter"] != "off"), key=lambda r: r["speedup"])
    print(f"specdec best_speedup={best['speedup']:.2f} drafter={best['drafter']} gamma={best['gamma']} "
          f"batch={best['batch']} all_exact={all(r['exact'] for r in report['rows'])}")
    return 0
