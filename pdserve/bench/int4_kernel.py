"""Per-call time of our int4 GEMV against torch's packed int4 CPU op, on the default model's shapes.

    python -m pdserve.bench.int4_kernel [--threads 1] [--rows 1,4,16,64]

Each weight is random int4 in groups of 32; both paths get the same float32 activations (torch's op
through bfloat16, as engine.quant.cpu serves it). Median microseconds per call over repeats, timed with
bench quant's clock (thread CPU time at one thread). Weights this small stay in the CPU's caches here;
a decode step streams them from memory (bench quant measures that).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from engine.quant.cpu import CPUQuantMatmul
from engine.quant.scheme import quantize
from pdserve.bench.clock import bench_clock, clock_name

# SmolLM2-135M: q/o, k/v, gate/up, down, the LM head; then the fused qkv and gate_up the model runs
SHAPES = ((576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576), (960, 576), (3072, 576))


def per_call_us(fn, x: torch.Tensor, calls: int, repeats: int = 5) -> float:
    clock = bench_clock()
    fn(x)
    times = []
    for _ in range(repeats):
        t = clock()
        for _ in range(calls):
            fn(x)
        times.append((clock() - t) / calls * 1e6)
    return statistics.median(times)


def run(rows: tuple[int, ...], shapes: tuple[tuple[int, int], ...] = SHAPES, print_fn=print) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    out = []
    print_fn(f"{torch.get_num_threads()} torch threads, {clock_name()}; us per call, median of 5")
    print_fn(f"{'N x K':>12} {'rows':>5} {'ours':>9} {'torch':>9} {'speedup':>8}")
    for n, k in shapes:
        qw = quantize(torch.randn(n, k, generator=gen) * 0.05, "int4", 32)
        ours, theirs = CPUQuantMatmul(qw), CPUQuantMatmul(qw, native=False)
        if ours.gemv is None:
            raise SystemExit("the native int4 kernel did not build here (no C++ compiler or no AVX2)")
        for m in rows:
            x = torch.randn(m, k, generator=gen)
            calls = max(3, int(2e7 // (n * k * max(m, 4))))
            a, b = per_call_us(ours.gemv, x, calls), per_call_us(theirs.decode, x, calls)
            out.append({"n": n, "k": k, "rows": m, "ours_us": a, "torch_us": b})
            print_fn(f"{n:>6}x{k:<5} {m:>5} {a:9.1f} {b:9.1f} {b / a:7.2f}x")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default="1,4,16,64", help="activation rows per call, comma-separated")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run(tuple(int(r) for r in args.rows.split(",")))


if __name__ == "__main__":
    main()
