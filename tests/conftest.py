"""Shared fixtures: tiny random-weight checkpoints, the default model, one Ray cluster per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# No GPU: Triton kernels run under its interpreter on the CPU (read when a kernel is defined, so before
# any engine.kernels.triton_* module is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _save_tiny(folder: Path, config) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init leaves norms at 1: perturb them so a norm bug cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    return folder


TINY_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6)


WINDOW = 16  # the tiny sliding-window models' window: prompts in the tests run longer


def tiny_configs():
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    return {**tiny_window_configs(),
        "llama": LlamaConfig(**TINY_COMMON, tie_word_embeddings=False,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        "llama-tied-llama3rope": LlamaConfig(
            **TINY_COMMON, tie_word_embeddings=True,
            rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
        "llama-linear-rope": LlamaConfig(**TINY_COMMON,
                                         rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                          "factor": 2.0}),
        "qwen2": Qwen2Config(**TINY_COMMON, tie_word_embeddings=False),
        "qwen3": Qwen3Config(**TINY_COMMON, head_dim=32, tie_word_embeddings=False),
    }


def tiny_window_configs():
    """The sliding-window and Gemma / Phi families (issue 26): prompts longer than WINDOW in their tests."""
    from transformers import Gemma2Config, Gemma3TextConfig, MistralConfig, Phi3Config, Qwen2Config

    gemma = dict(TINY_COMMON, head_dim=16, query_pre_attn_scalar=32, sliding_window=WINDOW, tie_word_embeddings=True)
    return {
        "mistral-sw": MistralConfig(**TINY_COMMON, sliding_window=WINDOW, tie_word_embeddings=False),
        # layer 0 attends to everything, layer 1 within the window (max_window_layers: the first full layers)
        "qwen2-sw": Qwen2Config(**TINY_COMMON, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
        "qwen2-sw-all": Qwen2Config(**TINY_COMMON, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0),
        "gemma2": Gemma2Config(**gemma, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
        # local, global, local; the global layer's RoPE is linearly scaled and has its own base
        "gemma3": Gemma3TextConfig(**{**gemma, "num_hidden_layers": 3}, final_logit_softcapping=20.0,
                                   layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                   rope_parameters={
                                       "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                       "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}}),
        "phi3": Phi3Config(**TINY_COMMON, sliding_window=24, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                            "partial_rotary_factor": 0.5}),
        # LongRoPE that one factor set serves (max_position_embeddings == original): fixed at load
        "phi3-longrope": Phi3Config(**TINY_COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                    original_max_position_embeddings=512,
                                    rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                     "short_factor": [1.0, 1.3, 1.9, 2.5, 3.0, 4.1, 5.0, 7.5],
                                                     "long_factor": [2.0, 3.0, 4.0, 6.0, 8.0, 9.0, 11.0, 16.0],
                                                     "original_max_position_embeddings": 512}),
    }


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: _save_tiny(root / name, cfg) for name, cfg in tiny_configs().items()}


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from engine.config import default_cache_dir
    from engine.loader import resolve_model

    return resolve_model(None, default_cache_dir())


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    from engine.loader import load_tokenizer

    return load_tokenizer(default_model_dir)


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, num_cpus=os.cpu_count(), logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_with_tokenizer(tiny_models, default_model_dir, tmp_path_factory) -> Path:
    """The tiny llama plus the default model's tokenizer (a decode worker's stop checker loads one)."""
    import shutil

    folder = tmp_path_factory.mktemp("tiny-tok") / "llama"
    shutil.copytree(tiny_models["llama"], folder)
    for f in default_model_dir.glob("tokenizer*"):
        shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="session")
def tiny_served(tiny_models, default_model_dir, tmp_path_factory):
    """name -> a copy of tiny_models[name] with the default model's tokenizer (what workers and front ends load)."""
    import shutil

    made: dict[str, Path] = {}

    def folder(name: str) -> Path:
        if name not in made:
            target = tmp_path_factory.mktemp("served") / name
            shutil.copytree(tiny_models[name], target)
            for f in default_model_dir.glob("tokenizer*"):
                shutil.copy(f, target / f.name)
            made[name] = target
        return made[name]

    return folder
