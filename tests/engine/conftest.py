"""Fixtures of the engine tests: tiny models with 1, 2 and 4 KV heads for tensor parallelism."""

from __future__ import annotations

import pytest

from tests.conftest import TINY_COMMON, _save_tiny


@pytest.fixture(scope="session")
def tp_models(tmp_path_factory, tiny_models):
    """name -> folder: KV heads 1 (tied, vocab 250), 2, 3 (uneven at TP 2), 4, and a Qwen2 with biases (2 KV heads)."""
    from transformers import LlamaConfig

    root = tmp_path_factory.mktemp("tp")
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    made = {
        "mqa-tied": _save_tiny(root / "mqa", LlamaConfig(**{**TINY_COMMON, "num_key_value_heads": 1, "vocab_size": 250},
                                                         tie_word_embeddings=True, rope_parameters=rope)),
        "mha": _save_tiny(root / "mha", LlamaConfig(**{**TINY_COMMON, "num_key_value_heads": 4},
                                                    tie_word_embeddings=False, rope_parameters=rope)),
        # 3 KV heads (SmolLM2's count): split 1 + 2 over two ranks, query heads 2 + 4
        "gqa3": _save_tiny(root / "gqa3", LlamaConfig(**{**TINY_COMMON, "num_key_value_heads": 3,
                                                         "num_attention_heads": 6, "hidden_size": 96},
                                                      tie_word_embeddings=False, rope_parameters=rope)),
    }
    return {**made, "gqa": tiny_models["llama"], "qwen2-bias": tiny_models["qwen2"]}
