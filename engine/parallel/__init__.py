"""Tensor parallelism inside one worker (Megatron style): a group handle, a shard plan, parallel layers.

    group.py   TensorParallel: rank, degree and the collectives (gloo on a CPU, NCCL on CUDA)
    shard.py   ShardPlan: which heads, MLP columns and vocabulary rows a rank holds; slices checkpoint tensors
    layers.py  the row-parallel linear (one all-reduce), vocab-parallel embedding and LM head; `parallelize`
"""

from __future__ import annotations

from engine.parallel.group import SINGLE, TensorParallel, init_tensor_parallel
from engine.parallel.shard import HeadRange, ShardPlan, TensorParallelUnsupported

__all__ = ["SINGLE", "HeadRange", "ShardPlan", "TensorParallel", "TensorParallelUnsupported",
           "init_tensor_parallel"]
