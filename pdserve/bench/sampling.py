"""`python -m pdserve.bench.sampling`: the decode loop's sampling cost per step, against the method it replaced.

Logits are the default model's own (last-token logits of prompts from the held-out text), so top-p
nuclei have the sizes a real model gives. For each batch size and sampling setting: milliseconds per
call of `engine.sampler.sample_t` and of the earlier method (a keyed uniform per vocabulary entry, an
exponential race, a full sort for top-p), timed in the same run with the benchmark clock
(pdserve/bench/clock.py), and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from engine.config import EngineConfig, SamplingParams
from engine.sampler import SamplingTensors, keyed_uniform_t, sample_t
from pdserve.bench.clock import bench_clock, clock_name

SETTINGS = {"temperature 1": SamplingParams(temperature=1.0), "top-p 0.9 (T 0.7)": SamplingParams(temperature=0.7,
                                                                                                  top_p=0.9),
            "top-p 0.95": SamplingParams(temperature=1.0, top_p=0.95),
            "top-k 50 (T 0.8)": SamplingParams(temperature=0.8, top_k=50)}


def earlier_sample(logits: torch.Tensor, st: SamplingTensors, steps: torch.Tensor) -> torch.Tensor:
    """The method before: a full sort for top-p, then argmax p / -log(u) over a uniform per token."""
    scaled = logits / st.temperature[:, None]
    if st.max_top_k > 0:
        kth = scaled.topk(st.max_top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if st.any_top_p:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= st.top_p[:, None]
        scaled = scaled.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    u = keyed_uniform_t(st.seed_lo, st.seed_hi, steps, 0, logits.shape[-1])
    return (scaled.softmax(dim=-1) / -torch.log(u)).argmax(dim=-1)


def model_logits(rows: int, dtype: str) -> torch.Tensor:
    from engine.loader import load_tokenizer
    from engine.runner import ModelRunner

    runner = ModelRunner(EngineConfig(dtype=dtype))
    tokenizer = load_tokenizer(runner.folder)
    words = (Path(__file__).parent / "heldout.txt").read_text().split()
    prompts = [tokenizer(" ".join(words[i * 7:i * 7 + 24]))["input_ids"] for i in range(rows)]
    return runner.prefill(prompts, None).float()


def time_ms(fn: Callable[[], object], repeats: int) -> float:
    clock = bench_clock()
    fn()
    times = []
    for _ in range(repeats):
        t = clock()
        fn()
        times.append(clock() - t)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="1,16,64")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    logits = model_logits(max(batches), args.dtype)
    print(f"sampling, default model's logits (vocabulary {logits.shape[-1]}), {args.threads} thread(s), "
          f"{clock_name()}, median of {args.repeats}")
    print(f"{'batch':>5} {'setting':<18} {'now ms':>8} {'before ms':>10} {'speed-up':>9}")
    for b in batches:
        rows, steps = logits[:b].contiguous(), torch.arange(b)
        for name, params in SETTINGS.items():
            st = SamplingTensors.build([params] * b, "cpu")
            call = (rows, st, steps)
            now = time_ms(lambda c=call: sample_t(*c), args.repeats)
            before = time_ms(lambda c=call: earlier_sample(*c), args.repeats)
            print(f"{b:>5} {name:<18} {now:>8.2f} {before:>10.2f} {before / now:>8.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
