"""Our forward against transformers: logits within 1e-4 on tiny random configs, and paged decode steps."""

from __future__ import annotations

import pytest
import torch

from engine.attention import PrefillAttention
from engine.config import EngineConfig
from engine.kv_cache import BlockManager, KVPool
from engine.runner import ModelRunner, pool_writer, token_slots

TOL = 1e-4


def _hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()


@pytest.mark.parametrize("name", ["llama", "llama-tied-llama3rope", "llama-linear-rope", "qwen2", "qwen3"])
def test_packed_prefill_logits_match_transformers(tiny_models, name):
    folder = tiny_models[name]
    runner = ModelRunner(EngineConfig(model=str(folder), dtype="float32", device="cpu"))
    hf = _hf(folder)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 97, 40)]  # 97 > rope's 32
    lens = [len(p) for p in prompts]
    ids = torch.tensor(sum(prompts, []))
    positions = torch.cat([torch.arange(n) for n in lens])
    ours = runner.model(ids, positions, PrefillAttention(lens))  # all tokens of 3 packed sequences
    start = 0
    for p in prompts:
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0]
        diff = (ours[start:start + len(p)] - ref).abs().max().item()
        assert diff < TOL, f"{name}: max |logit diff| {diff:.2e} for a {len(p)}-token sequence"
        start += len(p)


@pytest.mark.parametrize("name", ["llama", "qwen3"])
@pytest.mark.parametrize("block_size", [4, 16])
def test_paged_decode_logits_match_transformers(tiny_models, name, block_size):
    folder = tiny_models[name]
    runner = ModelRunner(EngineConfig(model=str(folder), dtype="float32", device="cpu", block_size=block_size))
    hf = _hf(folder)
    layout = runner.kv_layout(num_blocks=64)
    pool = KVPool.allocate(layout)
    gen = torch.Generator().manual_seed(2)
    full = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (20, 45)]
    steps = 12
    prompts = [seq[:-steps] for seq in full]
    # Scattered, non-contiguous tables, so a table-indexing bug shows up.
    perm = torch.randperm(layout.num_blocks, generator=gen).tolist()
    need = [layout.blocks_for(len(seq)) for seq in full]
    tables = [perm[:need[0]], perm[need[0]:need[0] + need[1]]]
    runner.prefill(prompts, pool_writer(pool, [token_slots(t, len(p), block_size) for t, p in zip(tables, prompts)]))
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    with torch.no_grad():
        refs = [hf(torch.tensor([seq])).logits[0] for seq in full]
    for step in range(steps):
        pos = torch.tensor([len(p) + step for p in prompts])
        toks = torch.tensor([seq[int(q)] for seq, q in zip(full, pos)])
        logits = runner.decode(pool, toks, pos, bt)
        for i, ref in enumerate(refs):
            diff = (logits[i] - ref[int(pos[i])]).abs().max().item()
            assert diff < TOL, f"{name} step {step} seq {i}: max |logit diff| {diff:.2e}"


def test_default_model_greedy_matches_generate(default_model_dir, tokenizer):
    """The real SmolLM2-135M in fp32: our prefill + paged decode equals transformers' greedy generate."""
    runner = ModelRunner(EngineConfig(dtype="float32", device="cpu", kv_cache_gib=0.1))
    hf = _hf(default_model_dir)
    questions = ["What is the capital of France?", "Name a primary color.", "Say hello in German."]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"] for q in questions]
    n = 24
    layout = runner.kv_layout()
    pool = KVPool.allocate(layout)
    blocks = BlockManager(layout.num_blocks, layout.block_size)
    tables = [blocks.allocate(str(i), len(p) + n) for i, p in enumerate(prompts)]
    logits = runner.prefill(prompts, pool_writer(pool, [token_slots(t, len(p), layout.block_size)
                                                         for t, p in zip(tables, prompts)]))
    out = [[int(t)] for t in logits.argmax(-1)]
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    for _ in range(n - 1):
        toks = torch.tensor([o[-1] for o in out])
        pos = torch.tensor([len(p) + len(o) - 1 for p, o in zip(prompts, out)])
        for o, t in zip(out, runner.decode(pool, toks, pos, bt).argmax(-1).tolist()):
            o.append(t)
    for p, o in zip(prompts, out):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False)[0, len(p):].tolist()
        assert o[:len(ref)] == ref, f"ours {o} != transformers {ref}"


@pytest.mark.parametrize("name", ["llama", "qwen3"])
@pytest.mark.parametrize("block_size", [4, 16])
def test_extend_over_cached_prefix_matches_transformers(tiny_models, name, block_size):
    """Prefill a prefix into the pool, then extend each sequence by a ragged chunk that attends to it
    (prefix-cached prefill, speculative verification): every new token's logits equal transformers'."""
    folder = tiny_models[name]
    runner = ModelRunner(EngineConfig(model=str(folder), dtype="float32", device="cpu", block_size=block_size,
                                      attention_backend="torch"))
    hf = _hf(folder)
    layout = runner.kv_layout(num_blocks=64)
    pool = KVPool.allocate(layout)
    gen = torch.Generator().manual_seed(3)
    full = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (23, 50, 9)]
    prefix_lens = [block_size, 37, 1]  # one prefix ends on a block boundary, one mid-block
    perm = torch.randperm(layout.num_blocks, generator=gen).tolist()
    tables, start = [], 0
    for seq in full:
        tables.append(perm[start:start + layout.blocks_for(len(seq))])
        start += len(tables[-1])
    prefixes = [seq[:n] for seq, n in zip(full, prefix_lens)]
    runner.prefill(prefixes, pool_writer(pool, [token_slots(t, len(p), block_size) for t, p in zip(tables, prefixes)]))
    chunks = [seq[n:] for seq, n in zip(full, prefix_lens)]
    logits = runner.extend(pool, chunks, prefix_lens, tables, all_logits=True)
    row = 0
    for seq, n in zip(full, prefix_lens):
        with torch.no_grad():
            ref = hf(torch.tensor([seq])).logits[0, n:]
        diff = (logits[row:row + len(seq) - n] - ref).abs().max().item()
        assert diff < TOL, f"{name}: max |logit diff| {diff:.2e} extending {len(seq) - n} tokens past {n}"
        row += len(seq) - n
    # Last-token logits (prefix-cached prefill) are the same rows.
    last = runner.extend(pool, chunks, prefix_lens, tables)
    ends = torch.tensor([len(s) - n for s, n in zip(full, prefix_lens)]).cumsum(0) - 1
    assert torch.allclose(last, logits[ends], atol=1e-5)
