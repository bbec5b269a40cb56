"""Tiny random-weight checkpoints for the mixture-of-experts path (Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE)
and the generic path (architectures without a native one), built from transformers' config classes, and
greedy decoding through the engine and through transformers; shared by engine, worker and end-to-end
tests (import a fixture by name)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from engine.kv_cache import BlockManager, KVPool
from engine.runner import ModelRunner, pool_writer, token_slots
from tests.conftest import TINY_COMMON, WINDOW

# Several experts per token everywhere; Qwen3-MoE also has a dense layer (mlp_only_layers), OLMoE clips q/k/v.
IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
MOE_NAMES = ("mixtral", "qwen3_moe", "olmoe", "qwen2_moe")
# Learned absolute positions, multi-head (GPT-2, OPT); partial rotary + parallel residual (GPT-NeoX);
# RoPE with scaled embeddings, residuals, attention and logits (Granite).
GENERIC_NAMES = ("gpt2", "gpt_neox", "opt", "granite")


def moe_configs() -> dict:
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    return {
        "mixtral": MixtralConfig(**TINY_COMMON, **IDS, num_local_experts=6, num_experts_per_tok=2,
                                 tie_word_embeddings=False),
        "qwen3_moe": Qwen3MoeConfig(**TINY_COMMON, **IDS, head_dim=32, num_experts=8, num_experts_per_tok=3,
                                    moe_intermediate_size=48, norm_topk_prob=True, decoder_sparse_step=1,
                                    mlp_only_layers=[1], tie_word_embeddings=False),
        "olmoe": OlmoeConfig(**TINY_COMMON, **IDS, num_experts=8, num_experts_per_tok=3, clip_qkv=2.0,
                             norm_topk_prob=False, tie_word_embeddings=False),
        "qwen2_moe": Qwen2MoeConfig(**TINY_COMMON, **IDS, num_experts=8, num_experts_per_tok=2,
                                    moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                    norm_topk_prob=False, tie_word_embeddings=False),
    }


def moe_window_configs() -> dict:
    """MoE models whose layers attend within WINDOW (tests run longer prompts): every layer (Mixtral,
    Qwen3-MoE with use_sliding_window), or the layers its config's rule picks (Qwen2-MoE: layer 0 only)."""
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    return {
        "mixtral-sw": MixtralConfig(**TINY_COMMON, **IDS, num_local_experts=6, num_experts_per_tok=2,
                                    sliding_window=WINDOW, tie_word_embeddings=False),
        "qwen3_moe-sw": Qwen3MoeConfig(**TINY_COMMON, **IDS, head_dim=32, num_experts=8, num_experts_per_tok=3,
                                       moe_intermediate_size=48, norm_topk_prob=True, use_sliding_window=True,
                                       sliding_window=WINDOW, tie_word_embeddings=False),
        "qwen2_moe-sw": Qwen2MoeConfig(**TINY_COMMON, **IDS, num_experts=8, num_experts_per_tok=2,
                                       moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                       use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2,
                                       tie_word_embeddings=False),
    }


def generic_configs() -> dict:
    from transformers import GPT2Config, GPTNeoXConfig, GraniteConfig, OPTConfig

    return {
        "gpt2": GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=512, **IDS),
        "gpt_neox": GPTNeoXConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=512, rotary_pct=0.5,
                                  use_parallel_residual=True, tie_word_embeddings=False, **IDS),
        "opt": OPTConfig(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=512, word_embed_proj_dim=64, **IDS),
        "granite": GraniteConfig(**TINY_COMMON, **IDS, embedding_multiplier=3.0, residual_multiplier=0.5,
                                 attention_multiplier=0.2, logits_scaling=2.0, tie_word_embeddings=False),
    }


def save_tiny(folder: Path, config, router_gain: float = 30.0) -> Path:
    """Random weights; norms perturbed (a norm bug cannot hide) and routers sharpened, so each token's
    experts and their weights differ clearly (transformers' init leaves routing near uniform)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:  # RMSNorm / LayerNorm weights and biases
                p.add_(torch.randn_like(p) * 0.1)
            if name.endswith("gate.weight") and "shared" not in name:
                p.mul_(router_gain)
    model.save_pretrained(folder)
    return folder


def with_tokenizer(folder: Path, default_model_dir: Path) -> Path:
    """The default model's tokenizer beside the weights (workers load one for the stop checks); the tiny
    models' 256 ids are its first 256."""
    for f in [*default_model_dir.glob("tokenizer*"), *default_model_dir.glob("chat_template*")]:
        shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="session")
def tiny_moe_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-moe")
    return {name: save_tiny(root / name, cfg) for name, cfg in moe_configs().items()}


@pytest.fixture(scope="session")
def tiny_moe_window_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-moe-sw")
    return {name: save_tiny(root / name, cfg) for name, cfg in moe_window_configs().items()}


@pytest.fixture(scope="session")
def tiny_generic_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-generic")
    return {name: save_tiny(root / name, cfg) for name, cfg in generic_configs().items()}


def greedy_through_engine(runner: ModelRunner, prompts: list[list[int]], n: int, cached: int = 0) -> list[list[int]]:
    """Greedy tokens by prefill (the first `cached` tokens of each prompt, if any, then an extend over
    them: prefix caching's path) and paged decode steps."""
    layout = runner.kv_layout(num_blocks=128)
    pool = KVPool.allocate(layout)
    blocks = BlockManager(layout.num_blocks, layout.block_size)
    tables = [blocks.allocate(str(i), len(p) + n) for i, p in enumerate(prompts)]
    bs = layout.block_size
    if cached:
        heads = [p[:cached] for p in prompts]
        runner.prefill(heads, pool_writer(pool, [token_slots(t, cached, bs) for t in tables]))
        logits = runner.extend(pool, [p[cached:] for p in prompts], [cached] * len(prompts), tables)
    else:
        slots = [token_slots(t, len(p), bs) for t, p in zip(tables, prompts)]
        logits = runner.prefill(prompts, pool_writer(pool, slots))
    out = [[int(t)] for t in logits.argmax(-1)]
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    for _ in range(n - 1):
        toks = torch.tensor([o[-1] for o in out])
        pos = torch.tensor([len(p) + len(o) - 1 for p, o in zip(prompts, out)])
        for o, t in zip(out, runner.decode(pool, toks, pos, bt).argmax(-1).tolist()):
            o.append(t)
    return out


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy tokens: n of them, or fewer ending with EOS."""
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()
