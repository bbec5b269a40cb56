"""`pdserve bench quant`: quantized weights and KV against float (bytes, perplexity, agreement, decode tok/s)."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from engine.config import EngineConfig


def add_parser(bench) -> None:
    qb = bench.add_parser("quant", help="quantized weights and KV vs float: bytes, perplexity, agreement, decode tok/s")
    qb.add_argument("--settings", default="float32,bfloat16,bfloat16+kvint8,int8,w8a8,int4,int4+lmhead,gguf+lmhead",
                    help="comma-separated: float32, bfloat16, int8, w8a8, int4, gguf, each quantized one optionally "
                         "+lmhead; any optionally +kvint8 (--kv-cache-dtype int8)")
    qb.add_argument("--batch-sizes", default="1,64", help="decode batch sizes to time")
    qb.add_argument("--steps", type=int, default=16, help="timed decode steps per repeat")
    qb.add_argument("--repeats", type=int, default=3)
    qb.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    qb.add_argument("--model", default=None, help="as for run-batch; default SmolLM2-135M-Instruct")
    qb.add_argument("--cache-dir", default=None)
    qb.add_argument("--quick", action="store_true", help="tiny sizes: checks the benchmark runs")
    qb.add_argument("--llamacpp", action="store_true",
                    help="also decode the same GGUF with llama.cpp at batch 1 (needs llama-cpp-python installed)")
    qb.add_argument("--json", default=None, help="also write the full report here")
    qb.set_defaults(func=cmd_bench_quant)


def cmd_bench_quant(args: argparse.Namespace) -> int:
    from pdserve.bench.quant import QuantBench, run

    bench = QuantBench(settings=tuple(s for s in args.settings.split(",") if s),
                       batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")),
                       decode_steps=args.steps, repeats=args.repeats, llamacpp=args.llamacpp)
    if args.quick:
        bench = replace(bench, batch_sizes=(1, 4), decode_steps=2, repeats=1, num_prompts=2, agree_tokens=4,
                        ppl_max_tokens=128)
    kwargs = {"model": args.model, "num_threads": args.threads}
    if args.cache_dir:
        kwargs["cache_dir"] = args.cache_dir
    engine = EngineConfig(**kwargs)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    report = run(bench, engine)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(report["last_line"])
    return 0
