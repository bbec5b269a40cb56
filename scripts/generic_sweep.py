"""Try model types through pdserve as a user bringing their own checkpoint would: a tiny random config of each
(transformers' class defaults, widths shrunk), loaded by ModelRunner, packed-prefill logits against
transformers in fp32. Prints, per type: the path taken and the max |logit diff|, or the refusal, or a crash.

    python scripts/generic_sweep.py gpt2 opt falcon mamba ...   # model types as transformers names them

Shrinking is best-effort (a config that transformers itself rejects shows as SETUP-FAIL, not a pdserve result).
"""

from __future__ import annotations

import inspect
import logging
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, head_dim=16, n_embd=64, n_layer=2, n_head=4,
             n_positions=256, ffn_dim=128, n_inner=128, d_model=64, moe_intermediate_size=32, num_experts=4,
             num_local_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=32, n_routed_experts=4,
             n_shared_experts=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
             v_head_dim=16, first_k_dense_replace=1, rotary_dim=8, bos_token_id=1, eos_token_id=2, pad_token_id=0,
             layer_types=None, decoder_layers=2, encoder_layers=2, num_layers=2, d_ff=128, num_heads=4, d_kv=16)


def tiny(model_type: str, folder: Path) -> Path:
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    params = inspect.signature(cls.__init__).parameters
    loose = any(p.kind == p.VAR_KEYWORD for p in params.values())
    defaults = cls()
    config = cls(**{k: v for k, v in SMALL.items() if k in params or (loose and hasattr(defaults, k))})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    return folder


def check(model_type: str) -> str:
    from transformers import AutoModelForCausalLM

    from engine.attention import PrefillAttention
    from engine.config import EngineConfig
    from engine.runner import ModelRunner

    try:
        folder = tiny(model_type, Path(tempfile.mkdtemp()) / model_type)
    except Exception as e:
        return f"SETUP-FAIL {type(e).__name__}: {str(e)[:120]}"
    try:
        runner = ModelRunner(EngineConfig(model=str(folder), dtype="float32", device="cpu"))
    except Exception as e:
        return f"REFUSED {type(e).__name__}: {str(e)[:220]}"
    try:
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
        prompts = [torch.randint(0, 256, (n,)).tolist() for n in (5, 40)]
        lens = [len(p) for p in prompts]
        ours = runner.model(torch.tensor(sum(prompts, [])), torch.cat([torch.arange(n) for n in lens]),
                            PrefillAttention(lens))
        ref = torch.cat([hf(torch.tensor([p])).logits[0] for p in prompts])
        a = runner.arch
        return (f"{a.impl.label}: max |logit diff| {(ours - ref).abs().max().item():.2e} "
                f"({a.num_layers} layers, {a.num_kv_heads} KV heads of {a.head_dim})")
    except Exception as e:
        return f"RUN-FAIL {type(e).__name__}: {str(e)[:200]}"


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    for model_type in sys.argv[1:]:
        print(f"{model_type:20s} {check(model_type)}", flush=True)
