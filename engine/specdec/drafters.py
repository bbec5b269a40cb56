"""Drafters: cheap guesses of a sequence's next tokens, chosen by name (`--speculative`).

    ngram      prompt lookup: the tokens that followed the latest earlier occurrence of the last
               n-gram (n = 3, 2, 1) of prompt + output. No model; strong when the output copies
               its input (rewrite, summarize, extract).
    layers:K   self-speculation: the target's first K layers + final norm + LM head. Its KV is the
               target's own KV of layers 0..K-1 in the same pool: a draft step writes those layers
               for the drafted positions, and verification overwrites them with the target's values.
    model:PATH a smaller model sharing the target's tokenizer, over its own paged KV
               (engine/specdec/draft_model.py).

`propose(seqs, gammas)` returns one `Draft` per sequence, `gammas[i]` tokens at most (possibly
none). Greedy rows draft the argmax (a point mass); sampled rows of model drafters draw from
their processed distribution q with keys (seed, step, SALT_DRAFT) and return q for Algorithm 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from engine.attention import PagedDecodeAttention
from engine.config import SamplingParams
from engine.kv_cache import KVPool
from engine.sampler import draw_from, keyed_uniform, processed_probs
from engine.specdec.verify import SALT_DRAFT, Draft


class DraftSeq(Protocol):
    """What a drafter reads of a running sequence (decode_worker's DecodeSequence has it)."""

    prompt_token_ids: Sequence[int]
    output: list[int]
    block_table: list[int]
    params: SamplingParams

    @property
    def next_position(self) -> int: ...


class Drafter(Protocol):
    name: str
    needs_prompt_ids: bool

    def propose(self, seqs: Sequence[DraftSeq], gammas: Sequence[int]) -> list[Draft]: ...


class NgramDrafter:
    name = "ngram"
    needs_prompt_ids = True

    def __init__(self, max_n: int = 3, min_n: int = 1) -> None:
        self.max_n, self.min_n = max_n, min_n

    def propose(self, seqs: Sequence[DraftSeq], gammas: Sequence[int]) -> list[Draft]:
        return [Draft(lookup(list(s.prompt_token_ids) + s.output, g, self.max_n, self.min_n) if g > 0 else ())
                for s, g in zip(seqs, gammas)]


def lookup(context: Sequence[int], gamma: int, max_n: int = 3, min_n: int = 1) -> tuple[int, ...]:
    """Up to γ tokens that followed the latest earlier occurrence of context's last n-gram,
    trying n = max_n down to min_n; () when none occurs."""
    a = np.asarray(context, dtype=np.int64)
    length = a.shape[0]
    for n in range(max_n, min_n - 1, -1):
        if length <= n:
            continue
        # Starts i < length - n with a[i:i+n] == a[-n:] (the suffix itself is excluded).
        hit = np.ones(length - n, dtype=bool)
        for k in range(n):
            hit &= a[k:length - n + k] == a[length - n + k]
        starts = np.flatnonzero(hit)
        if starts.size:
            follow = int(starts[-1]) + n
            return tuple(int(t) for t in a[follow:follow + gamma])
    return ()


class LayerDrafter:
    """The target's first `num_layers` layers as the draft model, over the target's own pool."""

    name = "layers"
    needs_prompt_ids = False

    def __init__(self, model: torch.nn.Module, pool: KVPool, backend, num_layers: int) -> None:
        total = len(model.layers)
        if not 0 < num_layers < total:
            raise ValueError(f"--speculative layers:K needs 0 < K < {total} (the target's layers), got {num_layers}")
        self.model, self.pool, self.backend, self.num_layers = model, pool, backend, num_layers
        self.device = model.embed.weight.device

    @torch.inference_mode()
    def propose(self, seqs: Sequence[DraftSeq], gammas: Sequence[int]) -> list[Draft]:
        tokens: list[list[int]] = [[] for _ in seqs]
        qs: list[list[torch.Tensor]] = [[] for _ in seqs]
        bs = self.pool.layout.block_size
        for j in range(max(gammas, default=0)):
            live = [i for i, g in enumerate(gammas) if g > j]
            feed = [seqs[i].output[-1] if j == 0 else tokens[i][-1] for i in live]
            pos = torch.tensor([seqs[i].next_position + j for i in live], device=self.device)
            width = max(len(seqs[i].block_table) for i in live)
            tables = torch.tensor([seqs[i].block_table + [0] * (width - len(seqs[i].block_table)) for i in live],
                                  device=self.device)
            slots = tables.gather(1, (pos // bs)[:, None]).squeeze(1) * bs + pos % bs
            ctx = PagedDecodeAttention(self.pool, slots, tables, pos + 1, self.backend)
            logits = self.model(torch.tensor(feed, device=self.device), pos, ctx, num_layers=self.num_layers)
            picks = logits.argmax(-1).tolist()
            sampled = [r for r, i in enumerate(live) if not seqs[i].params.greedy]
            if sampled:
                prm = [seqs[live[r]].params for r in sampled]
                q = processed_probs(logits[sampled], prm)
                u = keyed_uniform([p.seed for p in prm], [len(seqs[live[r]].output) + j for r in sampled],
                                  SALT_DRAFT, device=q.device)[:, 0]
                for r, t, qrow in zip(sampled, draw_from(q, u).tolist(), q):
                    picks[r] = t
                    qs[live[r]].append(qrow)
            for r, i in enumerate(live):
                tokens[i].append(picks[r])
        return [Draft(tuple(t), torch.stack(q) if q else None) for t, q in zip(tokens, qs)]


def make_drafter(spec: str, model: torch.nn.Module, pool: KVPool, backend, runner=None) -> Drafter | None:
    """`--speculative` value -> drafter; None for off. A bad value fails here, at start.
    `runner` (the target's ModelRunner) is needed by model:PATH only."""
    if spec == "off":
        return None
    if spec == "ngram":
        return NgramDrafter()
    if spec.startswith("layers:"):
        k = spec.removeprefix("layers:")
        if not k.isdigit():
            raise ValueError(f"--speculative layers:K needs an integer K, got {spec!r}")
        return LayerDrafter(model, pool, backend, int(k))
    if spec.startswith("model:") and spec.removeprefix("model:"):
        from engine.specdec.draft_model import DraftModelDrafter

        if runner is None:
            raise ValueError("--speculative model:PATH needs the target's runner")
        return DraftModelDrafter(runner, spec.removeprefix("model:"), pool.layout.num_blocks)
    raise ValueError(f"--speculative must be off, ngram, layers:K or model:PATH, got {spec!r}")
