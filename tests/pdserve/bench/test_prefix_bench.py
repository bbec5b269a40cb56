"""The prefix-caching benchmark's prefill CPU-time A/B runs (no timing assertion: the figures are the
benchmark's output) and really reuses the blocks its prompts share."""

from __future__ import annotations

import math
import random

from engine.config import EngineConfig
from pdserve.bench.prefix_caching import prefill_cpu_time


def test_prefill_cpu_ab_reuses_the_shared_header(tiny_models, tmp_path):
    rng = random.Random(0)
    header = [rng.randrange(256) for _ in range(10)]  # as a chat template's system prompt: 2 full blocks of 4
    prompts = [header + [rng.randrange(256) for _ in range(rng.randint(5, 60))] for _ in range(8)]
    engine = EngineConfig(model=str(tiny_models["llama"]), dtype="float32", block_size=4, cache_dir=str(tmp_path),
                          max_prefill_tokens=128, prefill_cache_gib=0.01)
    lines: list[str] = []
    ratio = prefill_cpu_time(prompts, engine, repeats=2, print_fn=lines.append)
    assert math.isfinite(ratio) and ratio > 0
    assert len(lines) == 2
    cached, total = map(int, lines[0].rsplit("cached ", 1)[1].split(" ")[0].split("/"))
    assert total == sum(map(len, prompts))
    # blocks get keys when their batch is done: prompts of later batches reuse the header's 2 full blocks
    assert 0 < cached <= 8 * (len(prompts) - 1) and cached % 8 == 0
