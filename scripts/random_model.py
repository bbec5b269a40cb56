"""Write a random-weight checkpoint of a real-ish shape, for benchmarks (`pdserve bench throughput --model`).

    python scripts/random_model.py olmoe-mini /tmp/olmoe-mini

Presets keep the routing of the real model (experts, top-k, normalization) and shrink the widths and depth
to fit a small CPU; the default model's tokenizer (SmolLM2's, 49,152 ids) goes beside the weights so the
benchmark's English prompts tokenize. Routers are scaled up from transformers' near-zero init, so tokens
spread over the experts as in a trained model rather than all picking the same few.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB = 49152
PRESETS = {
    # OLMoE-1B-7B: hidden 2048, 16 layers, 64 experts top-8 (intermediate 1024), 16 heads, no renormalization
    "olmoe-mini": ("olmoe", dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                                 intermediate_size=256, num_experts=64, num_experts_per_tok=8, norm_topk_prob=False)),
    # Qwen3-30B-A3B: hidden 2048, 48 layers, 128 experts top-8 (768), 32 q / 4 kv heads of 128, renormalized
    "qwen3moe-mini": ("qwen3_moe", dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                                        num_key_value_heads=2, head_dim=64, intermediate_size=1024,
                                        moe_intermediate_size=256, num_experts=64, num_experts_per_tok=8,
                                        norm_topk_prob=True)),
}


def build(preset: str, out: Path, router_gain: float = 20.0) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    from engine.config import default_cache_dir
    from engine.loader import resolve_model

    model_type, shape = PRESETS[preset]
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, max_position_embeddings=4096, bos_token_id=1,
                                  eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, **shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.mul_(router_gain)
    model.save_pretrained(out)
    default = resolve_model(None, default_cache_dir())
    for f in [*default.glob("tokenizer*"), *default.glob("chat_template*")]:
        shutil.copy(f, out / f.name)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    print(build(args.preset, args.out))
