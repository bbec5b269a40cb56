"""Which part of the model one tensor-parallel rank holds, and the checkpoint slices that give it.

Megatron's split, per decoder layer (H query heads, KVH KV heads, D head dim, I MLP width, V vocabulary,
degree P, rank r):

    qkv_proj  [H*D + 2*KVH*D, hidden]  column-parallel: rows of q heads [r*H/P, (r+1)*H/P), and of this
                                       rank's KV heads in k and in v
    o_proj    [hidden, H*D]            row-parallel: the same q heads' columns; output all-reduced
    gate_up   [2*I, hidden]            column-parallel: gate rows [r*I/P, (r+1)*I/P) and the same up rows
    down      [hidden, I]              row-parallel: those columns; output all-reduced
    embed     [V, hidden]              vocab-parallel: rows [r*Vp, (r+1)*Vp), Vp = ceil(V/P), zero-padded
    lm_head   [V, hidden]              the same rows; logits gathered across ranks
    norms                              replicated

KV heads: with KVH >= P rank r holds KV heads [r*KVH//P, (r+1)*KVH//P) and the query heads that read them
(uneven when P does not divide KVH: SmolLM2's 3 KV heads over 2 ranks are 1 + 2, its 9 query heads 3 + 6);
with KVH < P each KV head is replicated on P/KVH ranks (rank r holds head r // (P/KVH)) and the query heads
split evenly, which are exactly the heads reading it. Every rank's pool has the same blocks (`max_kv_heads`
sizes them).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from engine.arch import ModelArch


class TensorParallelUnsupported(ValueError):
    """A model or setting tensor parallelism cannot split; raised at load, naming why."""


@dataclass(frozen=True)
class HeadRange:
    """The KV heads [start, start + count) of `total` that one rank holds."""

    start: int
    count: int
    total: int

    @property
    def stop(self) -> int:
        return self.start + self.count

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.count == self.total


@dataclass(frozen=True)
class ShardPlan:
    """Rank `rank` of `size`'s share of a model with `arch` (the whole model's shape)."""

    arch: ModelArch
    rank: int = 0
    size: int = 1

    def __post_init__(self) -> None:
        a, p = self.arch, self.size
        if p == 1:
            return
        if a.num_kv_heads < p and p % a.num_kv_heads:
            raise TensorParallelUnsupported(
                f"tensor parallel size {p} over {a.num_kv_heads} KV heads: a larger size must be a multiple of them")
        if a.num_kv_heads < p and a.num_heads % p:
            raise TensorParallelUnsupported(
                f"tensor parallel size {p} does not divide the {a.num_heads} attention heads")
        if a.intermediate_size % p:
            raise TensorParallelUnsupported(
                f"tensor parallel size {p} does not divide the MLP width {a.intermediate_size}")

    @classmethod
    def of(cls, arch: ModelArch, rank: int, size: int) -> ShardPlan:
        return cls(arch, rank, size)

    @property
    def heads(self) -> tuple[int, int]:
        """(first query head, count) of this rank: the query heads of its KV heads (split evenly when KV heads
        are replicated)."""
        if self.arch.num_kv_heads >= self.size:
            group = self.arch.num_heads // self.arch.num_kv_heads
            kv = self.kv_heads
            return kv.start * group, kv.count * group
        n = self.arch.num_heads // self.size
        return self.rank * n, n

    @property
    def kv_heads(self) -> HeadRange:
        total = self.arch.num_kv_heads
        if total >= self.size:
            start, stop = self.rank * total // self.size, (self.rank + 1) * total // self.size
            return HeadRange(start, stop - start, total)
        return HeadRange(self.rank // (self.size // total), 1, total)

    @property
    def max_kv_heads(self) -> int:
        """The most KV heads any rank of the group holds (sizes every rank's pool to the same blocks)."""
        return max(ShardPlan(self.arch, r, self.size).kv_heads.count for r in range(self.size))

    @property
    def vocab_rows(self) -> tuple[int, int]:
        """(first vocabulary row, rows per rank incl. padding): every rank holds the same padded count."""
        per = -(-self.arch.vocab_size // self.size)
        return self.rank * per, per

    @property
    def rank_arch(self) -> ModelArch:
        """The shape the decoder is built with on this rank: its heads and MLP columns (the vocabulary
        stays whole: the parallel embedding and LM head carry their own shards)."""
        if self.size == 1:
            return self.arch
        return replace(self.arch, num_heads=self.heads[1], num_kv_heads=self.kv_heads.count,
                       intermediate_size=self.arch.intermediate_size // self.size)

    def shard(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's slice of our parameter `name` (the whole model's tensor, fused as our model fuses)."""
        if self.size == 1:
            return tensor
        suffix = name.split(".", 2)[-1] if name.startswith("layers.") else name
        if suffix in ("qkv_proj.weight", "qkv_proj.bias"):
            return self._qkv(tensor)
        if suffix == "o_proj.weight":
            start, n = self.heads
            d = self.arch.head_dim
            return tensor[:, start * d:(start + n) * d].contiguous()
        if suffix == "mlp.gate_up_proj.weight":
            width = self.arch.intermediate_size
            n = width // self.size
            lo = self.rank * n
            return torch.cat([tensor[lo:lo + n], tensor[width + lo:width + lo + n]])
        if suffix == "mlp.down_proj.weight":
            n = self.arch.intermediate_size // self.size
            return tensor[:, self.rank * n:(self.rank + 1) * n].contiguous()
        if suffix in ("embed.weight", "lm_head.weight"):
            return self._vocab(tensor)
        return tensor  # norms: replicated

    def _qkv(self, tensor: torch.Tensor) -> torch.Tensor:
        d, kv = self.arch.head_dim, self.kv_heads
        q_size, kv_size = self.arch.num_heads * d, self.arch.num_kv_heads * d
        start, n = self.heads
        q = tensor[start * d:(start + n) * d]
        k = tensor[q_size + kv.start * d:q_size + kv.stop * d]
        v = tensor[q_size + kv_size + kv.start * d:q_size + kv_size + kv.stop * d]
        return torch.cat([q, k, v])

    def _vocab(self, tensor: torch.Tensor) -> torch.Tensor:
        start, per = self.vocab_rows
        rows = tensor[start:start + per]
        if rows.shape[0] == per:
            return rows.contiguous()
        pad = tensor.new_zeros((per - rows.shape[0], *tensor.shape[1:]))
        return torch.cat([rows, pad])
