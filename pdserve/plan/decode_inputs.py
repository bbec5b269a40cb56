"""The inputs of a decode step at a chosen batch and context, over a zeroed KV pool: what the profile times
(pdserve.plan.profile) and what its busy neighbour runs (pdserve.plan.neighbour)."""

from __future__ import annotations


def decode_step_inputs(runner, batch: int, context: int, gen, steps: int = 1) -> tuple:
    """(pool, tokens, positions, block tables) of a decode step of `batch` sequences whose contexts spread
    evenly over about context/2 .. 3*context/2 (as a serving batch mixes lengths; a step's attention costs
    the sum of the rows' contexts), over a zeroed pool (a step's time does not depend on the cached values).
    Each row's blocks are one run, as the block manager mostly hands them out. Over `steps` steps, each moving
    every row one position on, the mean context runs through `context` (and no row passes the model's
    last position but one)."""
    import torch

    from engine.kv_cache import KVPool

    centre = max(0, context - steps // 2)  # the rows' mean position at the first step
    half = max(0, min(context // 2, centre, runner.arch.max_position_embeddings - 1 - steps - centre))
    # Symmetric offsets: row i and row batch-1-i cancel (round() is odd), so the mean stays `centre`.
    offsets = [round(half * (2 * i - (batch - 1)) / (batch - 1)) if batch > 1 else 0 for i in range(batch)]
    order = torch.randperm(batch, generator=gen).tolist()
    positions = torch.tensor([centre + offsets[i] for i in order], dtype=torch.long)
    per_seq = runner.kv_layout(num_blocks=1).blocks_for(centre + half + steps)
    pool = KVPool.allocate(runner.kv_layout(num_blocks=batch * per_seq), str(runner.device))
    tables = torch.arange(batch * per_seq, dtype=torch.int32).view(batch, per_seq).to(runner.device)
    tokens = torch.randint(0, runner.arch.vocab_size, (batch,), generator=gen).to(runner.device)
    return pool, tokens, positions.to(runner.device), tables
