"""Time the decode loop's step at one batch size: SmolLM2-135M on the CPU, the batcher as a decode
worker runs it (greedy, EOS ignored, every sequence at the same context).

    .venv/bin/python scripts/decode_step_bench.py [DTYPE] [BATCH] [LABEL]

To compare two commits in the same minutes, run it alternately from two checkouts with
`PYTHONPATH=<checkout>` (the script only uses APIs both sides have).
"""

import sys
import time

import torch

from decode_worker.batcher import ContinuousBatcher, DecodeSequence
from decode_worker.stopping import StopChecker
from engine.config import EngineConfig, SamplingParams
from engine.kv_cache import KVPool
from engine.runner import ModelRunner

dtype = sys.argv[1] if len(sys.argv) > 1 else "bfloat16"
batch = int(sys.argv[2]) if len(sys.argv) > 2 else 64
label = sys.argv[3] if len(sys.argv) > 3 else ""
context, steps = 300, 15
torch.set_num_threads(2)
runner = ModelRunner(EngineConfig(dtype=dtype, device="cpu", kv_cache_gib=0.5))
layout = runner.kv_layout(num_blocks=batch * (context // 16 + 12))
pool = KVPool.allocate(layout)
batcher = ContinuousBatcher(runner, pool, StopChecker((), None), batch)
per = layout.num_blocks // batch
params = SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True)
for i in range(batch):
    batcher.add(DecodeSequence(str(i), context, params, list(range(i * per, (i + 1) * per)), [1], [0.0]))
for _ in range(3):
    batcher.step()
times = []
for _ in range(steps):
    started = time.perf_counter()
    batcher.step()
    times.append(time.perf_counter() - started)
times.sort()
print(f"{label} {dtype} batch {batch} context {context}: median step {times[steps // 2] * 1000:.1f} ms, "
      f"best {times[0] * 1000:.1f} ms")
