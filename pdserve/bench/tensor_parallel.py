"""Decode speed of tensor parallelism on one machine: TP 1 against TP N (engine/parallel/), same model and batch.

Each setting runs in its own processes (engine/parallel/spawn.py): every rank prefills the same seeded prompts
into its own pool, then runs `steps` greedy decode steps in lockstep. Rank 0 reports the median step's wall
time and its thread CPU time. Settings: TP 1 with one rank's threads, TP 1 with all N ranks' threads (one rank
holding the whole worker's threads), TP N with `threads_per_rank` each; ratios are printed against the TP-1
rows of the same run, and the settings alternate over `repeats` rounds, so a shared machine's load hits all.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class TPBench:
    model: str | None = None  # None: the default SmolLM2-135M-Instruct
    dtype: str = "float32"
    degree: int = 2
    threads_per_rank: int = 1
    batch: int = 8
    context: int = 128
    steps: int = 16
    repeats: int = 2


def _rank_decode(tp, bench: TPBench) -> dict | None:
    import torch

    from engine.config import EngineConfig
    from engine.kv_cache import BlockManager, KVPool
    from engine.runner import ModelRunner, pool_writer, token_slots

    runner = ModelRunner(EngineConfig(model=bench.model, dtype=bench.dtype, device="cpu"), tp=tp)
    layout = runner.kv_layout(num_blocks=bench.batch * (-(-(bench.context + bench.steps + 1) // 16)) + 1)
    pool, blocks = KVPool.allocate(layout), BlockManager(layout.num_blocks, layout.block_size)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, runner.arch.vocab_size, (bench.context,), generator=gen).tolist()
               for _ in range(bench.batch)]
    tables = [blocks.allocate(str(i), bench.context + bench.steps + 1) for i in range(bench.batch)]
    runner.prefill(prompts, pool_writer(pool, [token_slots(t, bench.context, layout.block_size) for t in tables]))
    bt = torch.tensor(tables)
    tokens = torch.zeros(bench.batch, dtype=torch.long)
    walls, cpus = [], []
    for step in range(bench.steps):
        positions = torch.full((bench.batch,), bench.context + step)
        started, started_cpu = time.perf_counter(), time.thread_time()
        tokens = runner.decode(pool, tokens, positions, bt).argmax(-1)
        walls.append(time.perf_counter() - started)
        cpus.append(time.thread_time() - started_cpu)
    if not tp.is_driver:
        return None
    return {"step_ms": 1e3 * statistics.median(walls[1:]), "cpu_ms": 1e3 * statistics.median(cpus[1:])}


def settings(bench: TPBench) -> list[tuple[str, int, int]]:
    """(label, degree, threads per rank)."""
    n, t = bench.degree, bench.threads_per_rank
    return [(f"TP1 x{t} thr", 1, t), (f"TP1 x{n * t} thr", 1, n * t), (f"TP{n} x{t} thr/rank", n, t)]


def run(bench: TPBench) -> dict[str, list[dict]]:
    from engine.parallel.spawn import run_ranks

    rows: dict[str, list[dict]] = {label: [] for label, _, _ in settings(bench)}
    for _ in range(bench.repeats):
        for label, degree, threads in settings(bench):
            rows[label].append(run_ranks(_rank_decode, degree, bench, threads=threads)[0])
    return rows


def report(bench: TPBench, rows: dict[str, list[dict]]) -> str:
    step = {label: statistics.median(r["step_ms"] for r in runs) for label, runs in rows.items()}
    labels = list(step)
    base, wide = step[labels[0]], step[labels[1]]
    lines = [f"decode, batch {bench.batch}, context {bench.context}, {bench.dtype}, median of {bench.repeats} rounds"]
    for label in labels:
        tok_s = bench.batch / step[label] * 1e3
        cpu = statistics.median(r["cpu_ms"] for r in rows[label])
        lines.append(f"  {label:18s} step {step[label]:7.1f} ms  rank-0 CPU {cpu:7.1f} ms  {tok_s:7.1f} tok/s  "
                     f"x{base / step[label]:.2f} vs {labels[0]}  x{wide / step[label]:.2f} vs {labels[1]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--degree", type=int, default=2)
    p.add_argument("--threads-per-rank", type=int, default=1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    bench = TPBench(args.model, args.dtype, args.degree, args.threads_per_rank, args.batch, args.context, args.steps,
                    args.repeats)
    print(report(bench, run(bench)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
