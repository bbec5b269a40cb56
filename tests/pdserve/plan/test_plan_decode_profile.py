"""The plan profile's decode step is a serving step: ContinuousBatcher.step over rows at mixed contexts whose
mean is the point's context, with room for every timed step, up to the model's last positions."""

from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.runner import ModelRunner
from pdserve.plan.decode_inputs import decode_step_inputs
from pdserve.plan.profile import _decode_time


@pytest.fixture(scope="module")
def runner(tiny_models):
    return ModelRunner(EngineConfig(model=str(tiny_models["llama"]), dtype="float32", device="cpu", block_size=4))


@pytest.mark.parametrize("batch,context,steps", [(1, 40, 1), (7, 40, 1), (8, 100, 6), (5, 509, 4), (4, 3, 6)])
def test_step_inputs_mix_contexts_around_the_point_within_the_model(runner, batch, context, steps):
    pool, tokens, positions, tables = decode_step_inputs(runner, batch, context, torch.Generator().manual_seed(0),
                                                         steps)
    bs, top = pool.layout.block_size, runner.arch.max_position_embeddings - 2  # 512 positions
    centre = max(0, context - steps // 2)
    assert tokens.shape == positions.shape == (batch,) and tables.shape[0] == batch
    assert positions.sum().item() == batch * centre  # the mean context, exactly
    assert positions.min().item() >= 0 and positions.max().item() + steps - 1 <= top
    if batch > 1 and context // 2 <= centre and centre + context // 2 + steps <= top:
        assert positions.max().item() - positions.min().item() == 2 * (context // 2)  # about C/2 .. 3C/2
    assert tables.shape[1] * bs >= positions.max().item() + steps  # every step's KV lands in the row's blocks
    assert tables.unique().numel() == tables.numel() <= pool.layout.num_blocks  # no block shared by two rows


def test_decode_time_steps_a_batch_up_to_the_last_positions(runner):
    gen = torch.Generator().manual_seed(1)
    for batch, context in ((1, 8), (6, 510)):  # 510: _decode_points' clamp for a 512-position model
        assert _decode_time(runner, batch, context, 3, gen) > 0
