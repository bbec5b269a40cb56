"""An HF folder's config.json read as plain JSON, without importing transformers.

Importing transformers costs 5-11 s of CPU on a 2-core machine, and every worker paid it only to
read a dozen numbers. `read_config` returns the JSON's fields as attributes, exactly as
`AutoConfig.from_pretrained` would expose them, but only where that is provably the same: every
field the engine reads whose absence transformers would fill with a class default must be present,
and the RoPE must be the unscaled one (scaled types go through transformers' own parameter
functions, `engine/model/rope.py`). Otherwise it raises `NotPlainConfig` and the caller uses
transformers (`engine.loader.load_hf_config`). tests/engine/test_hf_files.py checks the equality.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType
from typing import Any

# Fields engine.families.read_arch and the RoPE tables read whose absence transformers fills with a class
# default that can differ from the engine's own fallback (e.g. Qwen3's head_dim 128, Llama's eos 2).
REQUIRED = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "max_position_embeddings",
            "tie_word_embeddings", "eos_token_id")
# Per architecture: fields whose class default is not what `getattr(config, name, fallback)` gives.
REQUIRED_FOR = {"llama": (), "qwen2": (), "qwen3": ("head_dim",)}


class NotPlainConfig(ValueError):
    """config.json needs transformers' own defaults or RoPE functions to be read exactly."""


class HFConfig:
    """config.json's fields as read-only attributes (a missing one raises AttributeError, as on an
    AutoConfig whose class lacks it); `rope_parameters` always holds the RoPE type and theta."""

    def __init__(self, values: dict[str, Any]) -> None:
        object.__setattr__(self, "_values", MappingProxyType(dict(values)))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("HFConfig is read-only")

    def to_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def __repr__(self) -> str:
        return f"HFConfig({dict(self._values)!r})"


def read_config(folder: Path) -> HFConfig:
    """config.json of `folder`, or NotPlainConfig when only transformers can read it exactly."""
    values = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    model_type = values.get("model_type")
    if model_type not in REQUIRED_FOR:
        raise NotPlainConfig(f"model_type {model_type!r}")
    missing = [k for k in (*REQUIRED, *REQUIRED_FOR[model_type]) if k not in values]
    if missing:
        raise NotPlainConfig(f"config.json lacks {missing} (transformers would fill class defaults)")
    if values.get("use_sliding_window"):  # the window and its layers come with class defaults and a fill-in
        raise NotPlainConfig("use_sliding_window")
    values["rope_parameters"] = _plain_rope(values)
    values.pop("rope_scaling", None)
    values.pop("rope_theta", None)
    return HFConfig(values)


def _plain_rope(values: dict[str, Any]) -> dict[str, Any]:
    """The unscaled RoPE as transformers 5 standardizes it: {'rope_type': 'default', 'rope_theta': θ}."""
    params = values.get("rope_parameters")
    if params is None:  # the older layout: rope_theta (+ rope_scaling) at the top level
        if values.get("rope_scaling") is not None or "rope_theta" not in values:
            raise NotPlainConfig("scaled or implicit RoPE")
        params = {"rope_type": "default", "rope_theta": values["rope_theta"]}
    if not isinstance(params, dict) or params.get("rope_type") != "default" \
            or not isinstance(params.get("rope_theta"), (int, float)) or set(params) - {"rope_type", "rope_theta"}:
        raise NotPlainConfig(f"RoPE parameters {params!r}")
    return {"rope_type": "default", "rope_theta": params["rope_theta"]}
