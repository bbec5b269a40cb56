"""What the served model allows a request to ask: its context, its names, the default output length."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from engine.config import EngineConfig
from engine.families import read_arch
from engine.loader import load_hf_config, load_tokenizer, model_display_name, resolve_model

log = logging.getLogger("pdserve.openai")


@dataclass(frozen=True)
class ModelLimits:
    max_context: int  # the model's context length
    model_names: tuple[str, ...]  # accepted values of body.model (absent is accepted too)
    default_max_tokens: int = 512
    ignore_eos: bool = False  # --ignore-eos: for benchmarks


def model_limits(engine: EngineConfig, default_max_tokens: int, ignore_eos: bool) -> tuple[Any, str, ModelLimits]:
    """(tokenizer, the model's name, what a request may ask) for the model served. Converts a GGUF
    once, before any worker starts."""
    started = time.time()
    folder = resolve_model(engine.model, engine.cache_dir)
    tokenizer = load_tokenizer(folder)
    arch = read_arch(load_hf_config(folder))
    log.info("start-up: model files, tokenizer and config %.1f s (%s)", time.time() - started,
             type(tokenizer).__name__)
    name = model_display_name(engine.model)
    limits = ModelLimits(max_context=arch.max_position_embeddings,
                         model_names=tuple(dict.fromkeys([name, str(engine.model or name)])),
                         default_max_tokens=default_max_tokens, ignore_eos=ignore_eos)
    return tokenizer, name, limits
