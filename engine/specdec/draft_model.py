"""`--speculative model:PATH`: a smaller model that shares the target's tokenizer drafts, over its own paged KV.

Where the draft's prompt KV comes from: the decode worker prefills it itself, lazily, from a
sequence's first draft step on, in chunks of at most `prefill_chunk` tokens per step (the last chunk
also yields the first draft token; the sequence drafts nothing until then). The alternative is the
prefill worker running the draft too and shipping its KV beside the target's. Measured with
`python -m engine.specdec.draft_model` (SmolLM2-135M as the draft, bf16, 1 thread; AMD EPYC Zen 4,
2 cores shared with other sessions at load 4-7, so figures vary ~2x between runs):

    prompt tokens   draft prefill here   its KV (23 KB/token)   shipped: shm @ 9.1 GB/s   gRPC @ 0.66 GB/s
    128             0.3-0.7 s            2.9 MB                 0.3 ms                    4.5 ms
    512             1.2-2.2 s            11.8 MB                1.3 ms                    18 ms
    1,024           2.6-5.0 s            23.6 MB                2.6 ms                    36 ms

(transport rates: the README's `pdserve bench kvtransfer` table, 1,024-token row.) Shipping is
100-1000x cheaper *for the decode worker*, but the compute does not vanish: the prefill worker then
runs the draft's prefill too (the middle column), which holds it from the next prompts, so TTFT
grows under load (and by that column outright unless the draft's prefill overlaps the first token's
return), and shipping needs the draft on every prefill worker, a second KV stream through
reservations, grants and all three transports, and a second layout check. Prefilled here, TTFT is
untouched, nothing outside the decode worker changes, and chunking bounds what one admission adds
to a step (`prefill_chunk` tokens of the draft, spread over the steps after it). We chose that.
Ship it instead when decode steps are so short that even a chunk of draft prefill shows in ITL
(a GPU serving a large batch with a mid-size draft), or once prefill workers cache draft prefixes.

Per step and sequence the draft KV is caught up to the accepted length before drafting: positions
whose draft KV was written from drafts that then stood are kept, the rest are overwritten by an
`extend` over the tokens since (rejected positions need no undo). A sequence's draft blocks are freed
when it finishes (`release`) or when it no longer shows up in a step (aborted): `forget_missing`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.kv_cache import BlockManager, KVPool
from engine.sampler import draw_from, keyed_uniform, processed_probs
from engine.specdec.verify import SALT_DRAFT, Draft

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass
class _DraftState:
    """A sequence's draft KV: positions [0, valid) hold the draft's KV of the real context; drafts
    written from position `base` on were `written` (they stay valid as far as they were accepted)."""

    valid: int = 0
    base: int = 0
    written: list[int] = field(default_factory=list)


class DraftModelDrafter:
    name = "model"
    needs_prompt_ids = True

    def __init__(self, target, draft_path: str, num_blocks: int, prefill_chunk: int = 256) -> None:
        """target: the target's ModelRunner; the draft runs on the same device, dtype and backend.
        num_blocks: the draft pool's size (the target pool's: a draft position exists only where the
        target reserved one, so this never runs out unless prefix sharing packed the target pool).
        prefill_chunk: draft prompt tokens prefilled per step, over all new sequences."""
        from engine.runner import ModelRunner

        cfg: EngineConfig = dataclasses.replace(target.config, model=draft_path, speculative="off")
        self.runner = ModelRunner(cfg)
        check_same_tokenizer(target.folder, self.runner.folder, target.arch.vocab_size, self.runner.arch.vocab_size)
        self.pool = KVPool.allocate(self.runner.kv_layout(num_blocks=num_blocks), cfg.device)
        self.blocks = BlockManager(num_blocks, cfg.block_size)
        self.device = self.runner.device
        self._state: dict[str, _DraftState] = {}
        self.prefill_chunk = prefill_chunk

    def release(self, request_id: str) -> None:
        self._state.pop(request_id, None)
        self.blocks.free(request_id)

    def forget_missing(self, live: Sequence[str]) -> None:
        """Free the draft KV of every sequence not in `live` (finished or aborted since)."""
        keep = set(live)
        for rid in [r for r in self._state if r not in keep]:
            self.release(rid)

    def propose(self, seqs: Sequence, gammas: Sequence[int]) -> list[Draft]:
        self.forget_missing([s.request_id for s in seqs])
        live = [i for i, g in enumerate(gammas) if g > 0 and self._ready(seqs[i])]
        tokens: list[list[int]] = [[] for _ in seqs]
        qs: list[list[torch.Tensor]] = [[] for _ in seqs]
        if not live:
            return [Draft(()) for _ in seqs]
        logits, caught = self._catch_up([seqs[i] for i in live])
        live = [i for i, c in zip(live, caught) if c]
        for j in range(max((gammas[i] for i in live), default=0)):
            if j:
                live = [i for i in live if gammas[i] > j]
                logits = self._step([seqs[i] for i in live], [tokens[i][-1] for i in live], j)
            for i, t, q in zip(live, *self._pick(logits, [seqs[i] for i in live], j)):
                tokens[i].append(t)
                if q is not None:
                    qs[i].append(q)
        for s, t in zip(seqs, tokens):
            if t:
                st = self._state[s.request_id]
                st.base, st.written = s.next_position + 1, t[:-1]  # the last draft was never fed
        return [Draft(tuple(t), torch.stack(q) if q else None) for t, q in zip(tokens, qs)]

    def _ready(self, seq) -> bool:
        """Allocate the sequence's draft blocks on first sight; False (no draft) when the pool is full."""
        if seq.request_id in self._state:
            return True
        if len(seq.prompt_token_ids) != seq.prompt_len:
            raise ValueError(f"--speculative model: sequence {seq.request_id} arrived without its prompt ids")
        total = seq.prompt_len + seq.params.max_tokens
        if not self.blocks.can_allocate(total):
            return False
        self.blocks.allocate(seq.request_id, total)
        self._state[seq.request_id] = _DraftState()
        return True

    @torch.inference_mode()
    def _catch_up(self, seqs: Sequence) -> tuple[torch.Tensor, list[bool]]:
        """Write the draft KV of every context position up to and including output[-1], in one extend
        of at most `prefill_chunk` tokens beyond the steady (≤ γ + 2 per sequence) catch-ups: a new
        sequence's prompt is prefilled over several steps, drafting nothing until it is whole, so an
        admission never stalls the batch for a whole prompt. Returns each sequence's last-row logits
        and whether it is caught up (only those draft)."""
        chunks, starts, tables, caught, full = [], [], [], [], []  # full: per chunk, caught per sequence
        budget = self.prefill_chunk
        for s in seqs:
            st = self._state[s.request_id]
            context = list(s.prompt_token_ids) + s.output
            kept = 0
            while kept < len(st.written) and st.base + kept < len(context) and \
                    context[st.base + kept] == st.written[kept]:
                kept += 1
            start = min(max(st.valid, st.base + kept), s.next_position)
            need = s.next_position + 1 - start
            take = need if need <= max(budget, len(st.written) + 2) else budget
            budget -= min(take, budget)
            if take <= 0:
                caught.append(False)
                continue
            chunks.append(context[start:start + take])
            full.append(take == need)
            starts.append(start)
            tables.append(self.blocks.table(s.request_id))
            st.valid = start + take
            caught.append(take == need)
        if not chunks:
            return torch.empty(0), caught
        logits = self.runner.extend(self.pool, chunks, starts, tables)
        return logits[torch.tensor(full, dtype=torch.bool, device=logits.device)], caught

    @torch.inference_mode()
    def _step(self, seqs: Sequence, feed: list[int], j: int) -> torch.Tensor:
        pos = torch.tensor([s.next_position + j for s in seqs], device=self.device)
        rows = [self.blocks.table(s.request_id) for s in seqs]
        width = max(len(r) for r in rows)
        tables = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=self.device)
        return self.runner.decode(self.pool, torch.tensor(feed, device=self.device), pos, tables)

    def _pick(self, logits: torch.Tensor, seqs: Sequence, j: int) -> tuple[list[int], list[torch.Tensor | None]]:
        """Greedy rows: the argmax; sampled rows: a keyed draw from the draft's processed q (kept for
        Algorithm 2), as LayerDrafter does."""
        picks = logits.argmax(-1).tolist()
        qs: list[torch.Tensor | None] = [None] * len(seqs)
        sampled = [r for r, s in enumerate(seqs) if not s.params.greedy]
        if sampled:
            prm = [seqs[r].params for r in sampled]
            q = processed_probs(logits[sampled], prm)
            u = keyed_uniform([p.seed for p in prm], [len(seqs[r].output) + j for r in sampled], SALT_DRAFT,
                              device=q.device)[:, 0]
            for r, t, qrow in zip(sampled, draw_from(q, u).tolist(), q):
                picks[r], qs[r] = t, qrow
        return picks, qs


def check_same_tokenizer(target: Path, draft: Path, target_vocab: int, draft_vocab: int) -> None:
    """A draft must speak the target's token ids: same vocabulary size, and (where the folders carry
    tokenizer files) the same token -> id map and special tokens. Random test models carry none: then
    the size is all there is to compare."""
    if target_vocab != draft_vocab:
        raise ValueError(f"--speculative model:{draft}: the draft's vocabulary has {draft_vocab} tokens, the "
                         f"target's ({target}) {target_vocab}; a draft model must share the target's tokenizer")
    t, d = _tokenizer_identity(target), _tokenizer_identity(draft)
    if t != d:
        why = "has no tokenizer files" if d is None else "has none" if t is None else "maps tokens to other ids"
        raise ValueError(f"--speculative model:{draft}: its tokenizer differs from the target's ({target}): "
                         f"{'the draft' if d is None or t is not None else 'the target'} {why}; "
                         f"a draft model must share the target's tokenizer")


def _tokenizer_identity(folder: Path) -> str | None:
    """The token -> id map and special tokens, as canonical JSON; None without tokenizer files."""
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        return None
    from engine.loader import load_tokenizer

    tok = load_tokenizer(folder)
    return json.dumps({"vocab": tok.get_vocab(), "special": sorted(tok.all_special_ids)}, sort_keys=True)


def measure_admission(draft: str | None = None, prompt_lens: tuple[int, ...] = (128, 512, 1024),
                      dtype: str = "bfloat16", num_threads: int = 1, repeats: int = 3) -> list[dict[str, float]]:
    """The two ways a draft's prompt KV can reach the decode worker, per prompt length: the draft's
    prefill there (the local extend this drafter runs, best of `repeats`) and the bytes shipping it
    would move (divide by a transport's rate: README's `pdserve bench kvtransfer` table)."""
    import time

    from engine.runner import ModelRunner

    runner = ModelRunner(EngineConfig(model=draft, dtype=dtype, device="cpu", num_threads=num_threads))
    layout = runner.kv_layout(num_blocks=runner.kv_layout(1).blocks_for(max(prompt_lens)))
    pool = KVPool.allocate(layout)
    table = list(range(layout.num_blocks))
    per_token = layout.num_layers * 2 * layout.num_kv_heads * layout.head_dim * layout.itemsize
    rows = []
    for n in prompt_lens:
        ids = torch.randint(0, runner.arch.vocab_size, (n,)).tolist()
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            runner.extend(pool, [ids], [0], [table])
            best = min(best, time.perf_counter() - started)
        rows.append({"tokens": n, "prefill_ms": best * 1e3, "kv_bytes": n * per_token})
    return rows


if __name__ == "__main__":
    import sys

    for row in measure_admission(sys.argv[1] if len(sys.argv) > 1 else None):
        mb = row["kv_bytes"] / 1e6
        print(f"{row['tokens']:>5} tokens: draft prefill {row['prefill_ms']:8.1f} ms | KV {mb:6.1f} MB: "
              f"shm @9.1 GB/s {mb / 9.1:6.2f} ms, gRPC @0.66 GB/s {mb / 0.66:6.1f} ms")
