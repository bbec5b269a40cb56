"""The measurements `pdserve bench quant` makes, checked on a tiny model against independent references."""

from __future__ import annotations

import math

import pytest
import torch

from engine.config import EngineConfig
from engine.quant import weight_bytes
from engine.runner import ModelRunner
from pdserve.bench.quant import HELDOUT, agreement, decode_rates, greedy, perplexity, setting_config


def test_perplexity_matches_transformers(tiny_models):
    from transformers import AutoModelForCausalLM

    folder = tiny_models["llama"]
    runner = ModelRunner(EngineConfig(model=str(folder), dtype="float32", device="cpu"))
    ids = torch.randint(0, 256, (41,), generator=torch.Generator().manual_seed(0)).tolist()
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0]
    ref = math.exp(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item())
    assert perplexity(runner, ids, window=64) == pytest.approx(ref, rel=1e-5)
    # windows of 16: each window scored on its own, so the figure moves but stays close
    assert perplexity(runner, ids, window=16) == pytest.approx(ref, rel=0.2)


def test_weight_bytes_count_the_quantized_layout(tiny_models, tmp_path):
    folder = tiny_models["llama"]
    fp32 = ModelRunner(EngineConfig(model=str(folder), dtype="float32", device="cpu"))
    int4 = ModelRunner(EngineConfig(model=str(folder), dtype="float32", device="cpu", quantization="int4",
                                    cache_dir=str(tmp_path)))
    linear = sum(m.weight.numel() for n, m in fp32.model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n != "lm_head")
    # int4, groups of 32: half a byte per weight + a float32 scale and offset per 32 weights
    assert weight_bytes(int4.model) == weight_bytes(fp32.model) - 4 * linear + linear // 2 + linear // 32 * 8


def test_agreement_and_decode_rates(tiny_models, tmp_path):
    assert agreement([[1, 2, 3, 4]], [[1, 2, 9, 4]]) == 0.5
    assert agreement([[1, 2], [5, 6]], [[1, 2], [7, 6]]) == 0.5
    folder = tiny_models["llama"]
    runner = ModelRunner(setting_config(EngineConfig(model=str(folder), cache_dir=str(tmp_path)), "int8+lmhead"))
    assert runner.config.quantization == "int8" and runner.config.quantize_lm_head
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    out = greedy(runner, prompts, 5)
    assert [len(o) for o in out] == [5, 5] and agreement(out, out) == 1.0
    rates = decode_rates(runner, [1, 2, 3], batch=3, steps=2, repeats=2)
    assert len(rates) == 2 and all(r > 0 for r in rates)
    with pytest.raises(ValueError, match="setting"):
        setting_config(EngineConfig(), "int3")
    with pytest.raises(ValueError, match="setting"):
        setting_config(EngineConfig(), "bfloat16+bf16")
    served = setting_config(EngineConfig(), "w8a8+bf16")
    assert (served.dtype, served.quantization) == ("bfloat16", "w8a8")
    assert setting_config(EngineConfig(), "w8a8").dtype == "float32"


def test_heldout_text_is_not_the_benchmark_corpus():
    from pdserve.bench.workload import CORPUS

    held, corpus = HELDOUT.read_text(), CORPUS.read_text()
    assert len(held) > 4000
    sentences = [s.strip() for s in held.split(".") if len(s.strip()) > 40]
    assert not any(s in corpus for s in sentences)


def test_llamacpp_baseline_decodes_the_same_gguf(default_model_dir):
    """The optional llama.cpp row: greedy decode of the default GGUF at batch 1, timed like our rows."""
    from engine.loader import gguf_source
    from pdserve.bench import llamacpp

    if llamacpp.available() is None:
        pytest.skip("llama-cpp-python is not installed (an optional baseline: it compiles llama.cpp from source)")
    rates = llamacpp.decode_rates(gguf_source(None), [1, 2, 3, 4], steps=2, repeats=2, threads=1)
    assert len(rates) == 2 and all(r > 0 for r in rates)


def test_kernel_perplexity_runs_every_matmul_through_the_int4_kernel(tiny_models, tmp_path):
    """`kernel ppl`: with decode_path_for_all_rows the prefill-sized calls take the int8-activation kernel, so
    the figure moves off the dequantized one by the activation rounding (and only then)."""
    from engine.quant.cpu import decode_path_for_all_rows
    from engine.quant.int4_kernel import Int4Gemv
    from pdserve.bench.quant import uses_int4_kernel

    runner = ModelRunner(setting_config(EngineConfig(model=str(tiny_models["llama"]), cache_dir=str(tmp_path)),
                                        "int4+lmhead"))
    if not uses_int4_kernel(runner.model):
        pytest.skip("the native int4 kernel did not build here (no C++ compiler or no AVX2)")
    calls = []
    orig = Int4Gemv.__call__
    Int4Gemv.__call__ = lambda self, x: calls.append(x.shape[0]) or orig(self, x)
    try:
        ids = torch.randint(0, 256, (97,), generator=torch.Generator().manual_seed(1)).tolist()
        plain = perplexity(runner, ids, window=96)
        assert calls == []  # 96 rows: the prefill path dequantizes
        with decode_path_for_all_rows():
            through_kernel = perplexity(runner, ids, window=96)
        assert calls and set(calls) == {96}
        assert perplexity(runner, ids, window=96) == plain and len(set(calls)) == 1  # the limit is back
    finally:
        Int4Gemv.__call__ = orig
    assert through_kernel != plain and through_kernel == pytest.approx(plain, rel=0.05)
