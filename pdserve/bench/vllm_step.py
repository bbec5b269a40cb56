"""vLLM's CPU decode step, for `pdserve bench step`. Run by vLLM's own Python (`--vllm-python`, its own
virtual environment), never imported by pdserve: it needs nothing but vLLM (and psutil, a vLLM dependency).

vLLM's offline API gives no step hook, so a step is the difference of two runs that differ only in their
decode length: (time of 72 output tokens - time of 8) / 64, each the median of `--repeats` runs, after a
warm-up run (vLLM compiles its model at start and on a batch size's first run). Prompts of
context - 40 random tokens put the 64 timed steps at a mean context of `--context`, as pdserve's rows;
prefix caching is off (random prompts, but no run may reuse another's KV). Greedy, EOS ignored. vLLM's CPU
backend reserves gpu_memory_utilization (92% by default) of the machine's memory and refuses to start when
that much is not free, as on a machine shared with other work: it gets `--memory-gib` (its KV cache and
activations; SmolLM2-135M at 64 x 340 tokens needs ~0.5 GiB of KV).

Each run is timed twice: wall time, and the CPU time of this process and every process it started (vLLM's
engine core and worker): on a machine shared with other work, CPU time is what vLLM itself spent, the clock
`pdserve bench step` uses at one thread. Prints one JSON object per batch size: {"batch", "step_s",
"step_cpu_s", "short_s", "long_s"}. Offline LLM(...) spawns its engine process, hence the __main__ guard.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

SHORT, LONG = 8, 72


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--memory-gib", type=float, default=3.0)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    from vllm import LLM, SamplingParams

    prompt_len = max(1, args.context - (SHORT + LONG) // 2)
    total_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    llm = LLM(model=args.model, dtype=args.dtype, max_num_seqs=max(batches), max_model_len=prompt_len + LONG + 8,
              enable_prefix_caching=False, seed=args.seed, gpu_memory_utilization=min(0.9, args.memory_gib / total_gib))
    vocab = llm.get_tokenizer().vocab_size
    rng = random.Random(args.seed)

    def run(batch: int, max_tokens: int) -> tuple[float, float]:
        prompts = [{"prompt_token_ids": [rng.randrange(vocab) for _ in range(prompt_len)]} for _ in range(batch)]
        params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True, temperature=0)
        started, started_cpu = time.perf_counter(), tree_cpu_s()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - started, tree_cpu_s() - started_cpu

    for batch in batches:
        run(batch, SHORT)  # warm-up: this batch size's first run
        short, long = [], []
        for _ in range(args.repeats):  # alternated, so a slow minute on a shared machine hits both
            short.append(run(batch, SHORT))
            long.append(run(batch, LONG))
        (s, s_cpu), (lg, lg_cpu) = (tuple(statistics.median(x) for x in zip(*runs)) for runs in (short, long))
        print(json.dumps({"batch": batch, "step_s": (lg - s) / (LONG - SHORT),
                          "step_cpu_s": (lg_cpu - s_cpu) / (LONG - SHORT), "short_s": s, "long_s": lg}), flush=True)


def tree_cpu_s() -> float:
    """User + system CPU seconds of this process and its live descendants."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return total


if __name__ == "__main__":
    main()
