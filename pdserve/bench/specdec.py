"""`pdserve bench specdec`: speculative decoding against plain decoding, in one process, same run.

The homework's Table 1 on what runs here: drafters × γ ∈ {2, 3, 5, 7} (+ auto) × batch sizes,
each measured as α, tokens per target forward and wall-clock decode speedup over plain decoding
of the same prompts measured in the same run. The decode loop is the real one (ContinuousBatcher
with the SpeculativeStepper hooked in) over a real paged pool; prefill is outside the timing.
The workload asks the model to rewrite or summarize a given text, where the output copies its
input and prompt lookup (`ngram`) pays.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from decode_worker.batcher import ContinuousBatcher, DecodeSequence
from decode_worker.speculative import build_stepper, spec_summary
from decode_worker.stopping import StopChecker
from engine.config import SamplingParams
from engine.kv_cache import BlockManager, KVPool
from engine.runner import ModelRunner, pool_writer, token_slots
from engine.sampler import sample


@dataclass
class Generation:
    outputs: list[list[int]]  # each request's output tokens, first (prefill) token included
    decode_s: float  # wall time of the decode loop
    rows: int  # Σ batch size over target forwards
    spec_steps: int = 0
    plain_steps: int = 0
    per_request: list[dict[str, Any] | None] = field(default_factory=list)

    @property
    def decode_tokens(self) -> int:
        return sum(len(o) - 1 for o in self.outputs)

    @property
    def alpha(self) -> float | None:
        """Accepted / drafted over all requests (the table's α)."""
        drafted = sum(r["drafted"] for r in self.per_request if r)
        return sum(r["accepted"] for r in self.per_request if r) / drafted if drafted else None


def generate(runner: ModelRunner, prompts: list[list[int]], params: list[SamplingParams], speculative: str = "off",
             num_tokens: int | str = "auto", tokenizer: Any | None = None, max_num_seqs: int | None = None,
             stepper_hook: Any | None = None) -> Generation:
    """Prefill `prompts` into a fresh pool, then decode them all with the decode worker's batcher
    (speculative or plain). Every KV block must come back (checked)."""
    bs = runner.config.block_size
    need = sum(-(-(len(p) + sp.max_tokens) // bs) for p, sp in zip(prompts, params))
    pool = KVPool.allocate(runner.kv_layout(num_blocks=need + 1), runner.config.device)
    blocks = BlockManager(need + 1, bs)
    tables = [blocks.allocate(str(i), len(p) + sp.max_tokens) for i, (p, sp) in enumerate(zip(prompts, params))]
    firsts: list[int] = []
    for lo in range(0, len(prompts), 16):  # prefill in slices: bounded activation memory
        chunk = prompts[lo:lo + 16]
        sink = pool_writer(pool, [token_slots(t, len(p), bs) for t, p in zip(tables[lo:lo + 16], chunk)])
        logits = runner.prefill(chunk, sink)
        firsts += sample(logits, params[lo:lo + 16], [0] * len(chunk)).tolist()
    stopper = StopChecker(runner.arch.eos_token_ids, tokenizer)
    batcher = ContinuousBatcher(runner, pool, stopper, max_num_seqs or len(prompts))
    batcher.enable_speculation(build_stepper(runner, pool, stopper, speculative, num_tokens))
    if stepper_hook is not None and batcher.speculative is not None:
        stepper_hook(batcher.speculative)
    seqs = [DecodeSequence(str(i), len(p), sp, tables[i], [firsts[i]], [time.time()],
                           prompt_token_ids=tuple(p)) for i, (p, sp) in enumerate(zip(prompts, params))]
    for s in seqs:
        batcher.add(s)
    started = time.perf_counter()
    plain_rows = 0
    while batcher.has_work():
        running = len(batcher.running) + len(batcher.waiting)
        batcher.step()
        if batcher.speculative is None:
            plain_rows += min(running, batcher.max_num_seqs)
    decode_s = time.perf_counter() - started
    for i in range(len(prompts)):
        blocks.free(str(i))
    blocks.assert_empty()
    spec = batcher.speculative
    return Generation([s.output for s in seqs], decode_s, spec.rows if spec else plain_rows,
                      spec.spec_steps if spec else 0, spec.plain_steps if spec else 0,
                      [spec_summary(s) for s in seqs])
