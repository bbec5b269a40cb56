"""--quantization gguf: a GGUF's own blocks read bit-exact against the gguf package's dequantization."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engine.config import EngineConfig
from engine.quant import QuantLinear, dequantize
from engine.quant.gguf_blocks import block_weight


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_synthetic_blocks_match_gguf_dequantize(kind):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize
    from gguf.quants import quantize as gguf_quantize

    qtype = GGMLQuantizationType[kind]
    w = np.random.default_rng(0).standard_normal((48, 128)).astype(np.float32) * 0.1
    w[0] = np.abs(w[0])  # all-positive row: Q4_1's offset > 0
    raw = gguf_quantize(w, qtype)
    tensor = SimpleNamespace(name=f"synthetic.{kind}", tensor_type=qtype, data=raw)
    qw = block_weight(tensor)
    assert qw.shape == (48, 128) and qw.group_size == 32
    ours, ref = dequantize(qw).numpy(), gguf_dequantize(raw, qtype)
    if kind == "Q4_0":  # q * d + (-8 d) is exact, as is d * (q - 8); only the sign of zero differs (+0 vs -0)
        ours, ref = ours + 0.0, ref + 0.0
    assert np.array_equal(_bits(ours), _bits(ref))


def test_unsupported_block_type_is_refused():
    from gguf import GGMLQuantizationType

    tensor = SimpleNamespace(name="x.weight", tensor_type=GGMLQuantizationType.Q6_K, data=np.zeros((2, 210), np.uint8))
    with pytest.raises(ValueError, match="Q6_K"):
        block_weight(tensor)


def test_default_model_blocks_match_gguf_and_the_converted_weights(default_model_dir):
    """The real SmolLM2 Q4_1/Q8_0 file: blocks bit-exact vs gguf, and the fused, un-permuted layers
    dequantize to exactly the converted checkpoint's float32 weights."""
    from gguf import GGUFReader
    from gguf.quants import dequantize as gguf_dequantize

    from engine.loader import default_gguf_path, load_state_dict
    from engine.runner import load_model

    tensors = {t.name: t for t in GGUFReader(str(default_gguf_path())).tensors}
    for name in ("blk.0.attn_q.weight", "blk.0.ffn_down.weight", "token_embd.weight"):
        t = tensors[name]
        assert np.array_equal(_bits(dequantize(block_weight(t)).numpy()), _bits(gguf_dequantize(t.data, t.tensor_type)))
    loaded = load_model(EngineConfig(quantization="gguf", quantize_lm_head=True, device="cpu"))
    model = loaded.model
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 4 * loaded.arch.num_layers + 1
    state = load_state_dict(default_model_dir)
    last = loaded.arch.num_layers - 1
    for i in (0, last):
        src, layer = f"model.layers.{i}.", model.layers[i]
        qkv = torch.cat([state[src + f"self_attn.{p}_proj.weight"] for p in "qkv"])
        assert torch.equal(dequantize(layer.qkv_proj.qw), qkv)
        assert torch.equal(dequantize(layer.o_proj.qw), state[src + "self_attn.o_proj.weight"])
        gate_up = torch.cat([state[src + "mlp.gate_proj.weight"], state[src + "mlp.up_proj.weight"]])
        assert torch.equal(dequantize(layer.mlp.gate_up_proj.qw), gate_up)
        assert torch.equal(dequantize(layer.mlp.down_proj.qw), state[src + "mlp.down_proj.weight"])
    assert torch.equal(dequantize(model.lm_head.qw), state["model.embed_tokens.weight"])
