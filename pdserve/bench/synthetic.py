"""A decode batch made up for timing steps: `batch` greedy sequences at `context` tokens each, EOS
ignored, over a pool of zeros (a step's time does not depend on the cached values), run by the
batcher as a decode worker runs it. Used by scripts/decode_step_bench.py and scripts/gpu_check.py."""

from __future__ import annotations

from decode_worker.batcher import ContinuousBatcher, DecodeSequence
from decode_worker.stopping import StopChecker
from engine.config import SamplingParams
from engine.kv_cache import KVPool


def synthetic_batcher(runner, batch: int, context: int, room_blocks: int = 12, **batcher_kw) -> ContinuousBatcher:
    """Every sequence holds blocks for its context plus `room_blocks` more to step into."""
    layout = runner.kv_layout(num_blocks=batch * (context // runner.config.block_size + room_blocks))
    pool = KVPool.allocate(layout, str(runner.device))
    batcher = ContinuousBatcher(runner, pool, StopChecker((), None), batch, **batcher_kw)
    per = layout.num_blocks // batch
    params = SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True)
    for i in range(batch):
        batcher.add(DecodeSequence(str(i), context, params, list(range(i * per, (i + 1) * per)), [1], [0.0]))
    return batcher
