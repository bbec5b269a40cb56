"""The inductor candidate (engine/inductor_step.py), narrowly: it is measured against the native compiled step
by `pdserve bench step --inductor` and not used by workers. One bucket of 4 rows compiled for a 2-layer model
(inductor's compile alone takes minutes on 2 shared cores, hence `slow`): a batch of 3 pads to it, the real rows
match the eager step within float32 rounding (inductor fuses and orders its own arithmetic, so not bit for bit),
and the padding row writes no KV."""

from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.inductor_step import InductorDecodeStep
from engine.kv_cache import KVPool
from engine.runner import ModelRunner

pytestmark = pytest.mark.slow


def test_padded_bucket_matches_eager_and_padding_writes_nothing(tiny_models, tmp_path):
    runner = ModelRunner(EngineConfig(model=str(tiny_models["llama"]), dtype="float32", device="cpu", block_size=8,
                                      cache_dir=str(tmp_path), num_threads=1))
    g = torch.Generator().manual_seed(0)
    eager_pool = KVPool.allocate(runner.kv_layout(num_blocks=40))
    eager_pool.tensor.copy_(torch.randn(eager_pool.tensor.shape, generator=g))
    before = eager_pool.buffer.clone()
    pool = KVPool(eager_pool.layout, before.clone())
    step = InductorDecodeStep(runner, pool, [4])
    tables = (torch.randperm(39, generator=g)[:3 * 8] + 1).view(3, 8).to(torch.int32)  # block 0: padding's read
    positions, tokens = torch.tensor([5, 30, 61]), torch.tensor([7, 99, 200])
    eager = runner.decode(eager_pool, tokens, positions, tables)
    compiled = step.run(tokens, positions, tables)
    assert compiled.shape == eager.shape
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    changed = (pool.tensor != before.view(pool.tensor.dtype).view(pool.tensor.shape)).any(dim=(-1, -2))
    written = changed.any(dim=(0, 1)).flatten().nonzero().flatten().tolist()  # flat slots written in any layer
    slots = [int(tables[i, p // 8]) * 8 + p % 8 for i, p in enumerate(positions.tolist())]
    assert written == sorted(slots)  # the three real rows' slots, nothing for the padding row
    torch.testing.assert_close(pool.tensor, eager_pool.tensor, rtol=1e-5, atol=1e-5)
