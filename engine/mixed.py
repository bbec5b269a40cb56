"""One forward over decode rows and prefill chunks together (chunked prefill, `--mode colocated`).

    rows:    [d_0 .. d_{D-1} | c_0 ............ c_{P-1}]   D decode rows of one token, then P chunks
    attend:  PagedDecodeAttention(rows < D)  +  ExtendAttention(the chunks, over their cached prefix)

Each part keeps the attention path it has in the PD workers (the native decode kernel for decode
rows, the extend path of prefix caching for chunks), so a mixed step computes what the two steps
would apart; the linear layers see all rows at once, which is where mixing pays.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.attention import ExtendAttention, PagedDecodeAttention, VarlenBatch
from engine.attention.base import AttentionBackend, AttentionSpec
from engine.kv_cache import KVPool


class MixedAttention:
    """The first `num_decode` rows through `decode`, the rest through `extend` (either may be None)."""

    def __init__(self, decode: PagedDecodeAttention | None, extend: ExtendAttention | None, num_decode: int) -> None:
        if decode is None and extend is None:
            raise ValueError("a mixed step needs decode rows or prefill chunks")
        self.decode, self.extend, self.num_decode = decode, extend, num_decode

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               spec: AttentionSpec) -> torch.Tensor:
        if self.extend is None:
            return self.decode.attend(layer, q, k, v, spec)
        if self.decode is None:
            return self.extend.attend(layer, q, k, v, spec)
        d = self.num_decode
        return torch.cat([self.decode.attend(layer, q[:d], k[:d], v[:d], spec),
                          self.extend.attend(layer, q[d:], k[d:], v[d:], spec)])


def _padded(tables: Sequence[Sequence[int]]) -> torch.Tensor:
    width = max(len(t) for t in tables)
    return torch.tensor([list(t) + [0] * (width - len(t)) for t in tables], dtype=torch.int32)


def mixed_context(pool: KVPool, chunks: Sequence[Sequence[int]], starts: Sequence[int],
                  tables: Sequence[Sequence[int]], num_decode: int, backend: AttentionBackend,
                  device: torch.device) -> MixedAttention:
    """Row i appends chunks[i] at position starts[i] of its sequence (blocks `tables[i]`, which cover
    the new tokens); rows [0, num_decode) hold one token each."""
    bs = pool.layout.block_size
    decode = extend = None
    if num_decode:
        positions = torch.tensor(list(starts[:num_decode]), dtype=torch.int64, device=device)
        block_tables = _padded(tables[:num_decode]).to(device)
        slots = block_tables.gather(1, (positions // bs)[:, None]).squeeze(1).long() * bs + positions % bs
        decode = PagedDecodeAttention(pool, slots, block_tables, positions + 1, backend)
    if len(chunks) > num_decode:
        lens = [len(c) for c in chunks[num_decode:]]
        prefix = list(starts[num_decode:])
        part = tables[num_decode:]
        slots = [t[p // bs] * bs + p % bs for t, s, n in zip(part, prefix, lens) for p in range(s, s + n)]
        batch = VarlenBatch.build(lens, prefix, _padded(part), device)
        extend = ExtendAttention(pool, torch.tensor(slots, device=device), batch, backend)
    return MixedAttention(decode, extend, num_decode)
