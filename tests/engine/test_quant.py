"""Weight quantization: round-trip bounds, each kernel against dequantize-then-matmul, a model through ModelRunner."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.kv_cache import KVPool
from engine.quant import QuantLinear, dequantize, quantize
from engine.quant.cpu import CPUQuantMatmul
from engine.quant.scheme import unpack_int4
from engine.runner import ModelRunner, pool_writer, token_slots

BF16_EPS = 2.0**-8  # bfloat16 keeps 8 significant bits: one rounding is within half of this, relative


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0, :] = 0  # an all-zero row: scale must not be 0
    w[1, :] = w[1, :].abs() + 0.01  # all positive
    w[2, :] = -w[2, :].abs()  # all negative
    return w


def _scales_per_input(qw) -> torch.Tensor:
    return qw.scales.repeat_interleave(qw.group_size, dim=1)  # [N, K]


@pytest.mark.parametrize("scheme,group_size", [("int8", 32), ("int8", 96), ("int4", 32), ("int4", 64),
                                               ("int4", 2)])
def test_round_trip_within_half_a_step(scheme, group_size):
    w = _weight(24, 192)
    qw = quantize(w, scheme, group_size)
    assert qw.shape == (24, 192) and qw.scales.shape == (24, 192 // group_size)
    deq = dequantize(qw)
    step = _scales_per_input(qw)
    err = (w - deq).abs()
    assert (err <= step / 2 * (1 + 1e-6) + 1e-9).all(), f"max err/step {(err / step).max().item():.4f} > 0.5"
    assert (deq[0] == 0).all(), "an all-zero row must come back exactly"
    if scheme == "int8":
        assert qw.qweight.dtype == torch.int8 and qw.qweight.abs().max() <= 127
        assert qw.zeros is None
    else:
        q = unpack_int4(qw.qweight)
        assert qw.qweight.shape == (24, 96) and q.max() <= 15
        assert torch.equal(q[:, 0::2], qw.qweight & 0xF) and torch.equal(q[:, 1::2], qw.qweight >> 4)
        # every group's 16 levels span exactly its own range: both ends come back exactly
        lo = w.reshape(24, -1, group_size).amin(-1)
        hi = w.reshape(24, -1, group_size).amax(-1)
        nonzero = hi > lo
        assert torch.allclose(qw.scales[nonzero], ((hi - lo) / 15)[nonzero]) and torch.equal(qw.zeros, lo)
        dg = deq.reshape(24, -1, group_size)
        assert torch.allclose(dg.amin(-1), lo, atol=1e-7) and torch.allclose(dg.amax(-1), hi, atol=1e-7)


def test_bad_group_size_is_refused():
    with pytest.raises(ValueError, match="must divide"):
        quantize(torch.randn(8, 100), "int8", 64)
    with pytest.raises(ValueError, match="even"):
        quantize(torch.randn(8, 99), "int4", 3)
    with pytest.raises(ValueError, match="--quantization"):
        EngineConfig(quantization="int3")


def _cpu_tolerance(x: torch.Tensor, qw) -> torch.Tensor:
    """Error of the bf16-activation packed ops vs fp32 dequantize-then-matmul, bound per output.

    Roundings to bf16 of x, of the scales (int4: also of the float zero m + 8 s), and of the output,
    each within BF16_EPS / 2 relative."""
    deq = dequantize(qw)
    ref = x @ deq.T
    w_err = deq.abs()
    if qw.scheme == "int4":  # (q - 8) * s + (m + 8 s): the two roundings scale with |q - 8| s and |m + 8 s|
        s, m = _scales_per_input(qw), qw.zeros.repeat_interleave(qw.group_size, dim=1)
        w_err = w_err + 8 * s + (m + 8 * s).abs()
    return ref, BF16_EPS / 2 * (x.abs() @ (deq.abs() + w_err).T + ref.abs()) * 1.5 + 1e-6


@pytest.mark.parametrize("scheme,group_size", [("int8", 0), ("int4", 32), ("int4", 64)])
@pytest.mark.parametrize("rows", [1, 7])
def test_cpu_decode_path_matches_dequantized_matmul(scheme, group_size, rows):
    w = _weight(96, 128, seed=1)
    qw = quantize(w, scheme, group_size or 128)
    mm = CPUQuantMatmul(qw, native=False)  # torch's ops; our int4 kernel: tests/engine/test_int4_kernel.py
    assert mm.fast_decode, "this shape must take the packed torch op"
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(3))
    ref, tol = _cpu_tolerance(x, qw)
    out = mm(x)
    assert out.dtype == torch.float32
    assert ((out - ref).abs() <= tol).all(), f"max excess {((out - ref).abs() - tol).max().item():.3e}"
    assert (out - ref).abs().max() > 0 or rows == 0  # the bf16 path really ran (not the fp32 reference)


@pytest.mark.parametrize("scheme,group_size", [("int8", 32), ("int8", 0), ("int4", 64)])
def test_cpu_prefill_path_matches_dequantized_matmul(scheme, group_size):
    w = _weight(96, 128, seed=2)
    qw = quantize(w, scheme, group_size or 128)
    x = torch.randn(80, 128, generator=torch.Generator().manual_seed(4))
    ref = x @ dequantize(qw).T
    out = CPUQuantMatmul(qw)(x)  # 80 rows (> DECODE_MAX_ROWS): dequantize + float GEMM, fp32 throughout
    tol = 1e-6 * (x.abs() @ dequantize(qw).abs().T) + 1e-6
    assert ((out - ref).abs() <= tol).all()


def test_quant_linear_keeps_bias_and_shape():
    lin = torch.nn.Linear(64, 48, bias=True)
    qw = quantize(lin.weight, "int8", 32)
    ql = QuantLinear(qw, lin.bias)
    x = torch.randn(2, 3, 64)
    ref = torch.nn.functional.linear(x, dequantize(qw), lin.bias)
    assert torch.allclose(ql(x), ref, atol=1e-5) and ql(x).shape == (2, 3, 48)


TRITON_CHECK = textwrap.dedent("""
    import os, sys
    assert os.environ["TRITON_INTERPRET"] == "1"
    import torch
    from engine.quant.scheme import quantize, dequantize
    from engine.quant.triton_gemm import TritonQuantMatmul
    g = torch.Generator().manual_seed(0)
    bad = []
    for scheme, gs, m, n, k in [("int8", 32, 1, 40, 96), ("int8", 96, 19, 72, 96), ("int4", 32, 5, 70, 64),
                                ("int4", 48, 17, 33, 96)]:
        w = torch.randn(n, k, generator=g) * 0.05
        x = torch.randn(m, k, generator=g)
        qw = quantize(w, scheme, gs)
        deq = dequantize(qw)
        out, ref = TritonQuantMatmul(qw)(x), x @ deq.T
        tol = 1e-6 * (x.abs() @ deq.abs().T) + 1e-6  # fp32 accumulation in a different order
        if not ((out - ref).abs() <= tol).all():
            bad.append((scheme, gs, m, n, k, (out - ref).abs().max().item()))
    print("checked", bad)
    sys.exit(1 if bad else 0)
""")


def test_triton_kernel_matches_dequantized_matmul_under_interpreter():
    """The CUDA kernel's code, run by Triton's CPU interpreter (which @triton.jit picks at import)."""
    pytest.importorskip("triton", reason="triton is not installed on this platform")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, cwd=root, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def _dequantized_reference(folder: Path, config: EngineConfig) -> ModelRunner:
    """An unquantized fp32 runner whose linear weights are replaced by dequant(quant(w))."""
    from engine.quant.apply import linear_targets, resolve_group_size

    runner = ModelRunner(replace(config, quantization="none", quantize_lm_head=False))
    with torch.no_grad():
        for m in linear_targets(runner.model, config.quantize_lm_head).values():
            gs = resolve_group_size(config.quantization, config.quant_group_size, m.in_features)
            m.weight.copy_(dequantize(quantize(m.weight, config.quantization, gs)))
    return runner


@pytest.mark.parametrize("scheme,lm_head", [("int8", False), ("int4", True)])
def test_quantized_model_prefill_and_decode_match_dequantized_fp32(tiny_models, tmp_path, scheme, lm_head):
    folder = tiny_models["qwen2"]  # qkv bias too
    config = EngineConfig(model=str(folder), dtype="float32", device="cpu", quantization=scheme,
                          quantize_lm_head=lm_head, cache_dir=str(tmp_path), block_size=4)
    runner = ModelRunner(config)
    n_quant = sum(isinstance(m, QuantLinear) for m in runner.model.modules())
    assert n_quant == 4 * runner.arch.num_layers + lm_head
    cached = list((tmp_path / "derived").glob("*.safetensors"))
    assert len(cached) == 1 and scheme in cached[0].name
    ref = _dequantized_reference(folder, config)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (50, 30)]  # 80 rows: prefill path
    steps = 6
    logits, ref_logits = [], []
    for r, out in ((runner, logits), (ref, ref_logits)):
        layout = r.kv_layout(num_blocks=32)
        pool = KVPool.allocate(layout)
        tables = [list(range(0, 16)), list(range(16, 32))]
        out.append(r.prefill(prompts, pool_writer(pool, [token_slots(t, len(p), 4) for t, p in zip(tables, prompts)])))
        bt = torch.tensor(tables)
        for step in range(steps):
            pos = torch.tensor([len(p) + step for p in prompts])
            toks = torch.tensor([(7 * step + i) % 256 for i in range(2)])
            out.append(r.decode(pool, toks, pos, bt))
    # prefill (80 rows) is fp32 throughout, but for the 2 rows of the LM head; decode rows go through
    # bf16 activations in torch's packed ops, or int8 ones (per block of 32) in our int4 kernel
    scale = max(t.abs().max().item() for t in ref_logits)
    assert (logits[0] - ref_logits[0]).abs().max() < (4 * BF16_EPS * scale if lm_head else 1e-4)
    for a, b in zip(logits[1:], ref_logits[1:]):
        assert (a - b).abs().max().item() < 4 * BF16_EPS * scale, (a - b).abs().max().item()
    # a second start reads the cache and quantizes identically
    again = ModelRunner(config)
    a, b = again.model.layers[0].qkv_proj.qw, runner.model.layers[0].qkv_proj.qw
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales)


@pytest.mark.parametrize("rows", [1, 16, 70])
def test_w8a8_equals_the_int8_product_it_stands_for(rows):
    """The int32 GEMM is exact: the result is (xq @ wq^T) * s_x * s_w up to float32 rounding, and within
    the two roundings' bound of the float product."""
    from engine.quant.w8a8 import DynamicInt8Matmul, quantize_rows

    w = _weight(96, 160)
    qw = quantize(w, "int8", 160)
    x = torch.randn(rows, 160, generator=torch.Generator().manual_seed(rows)) * 3
    x[0] = 0  # an all-zero row
    y = DynamicInt8Matmul(qw)(x)
    xq, s = quantize_rows(x)
    assert (xq.float() * s - x).abs().max() <= s.max() / 2 + 1e-6
    exact = (xq.double() @ qw.qweight.double().T) * s.double() * qw.scales[:, 0].double()
    assert torch.allclose(y.double(), exact, rtol=1e-6, atol=1e-6)
    assert torch.equal(y[0], torch.zeros(96))
    # |x w - xq s wq t| <= |x - xq s| |w| + |xq s| |w - wq t|, each error within half a step
    t = qw.scales[:, 0]
    bound = (s / 2) * w.abs().sum(1) + (xq.float().abs() * s).sum(1, keepdim=True) * (t / 2)
    assert ((y - x @ w.T).abs() <= bound + 1e-5).all()


def test_w8a8_keeps_bf16_activations_dtype_and_refuses_groups():
    from engine.quant.w8a8 import DynamicInt8Matmul

    qw = quantize(_weight(32, 64), "int8", 64)
    assert DynamicInt8Matmul(qw)(torch.randn(5, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="one scale per output channel"):
        DynamicInt8Matmul(quantize(_weight(32, 64), "int8", 32))
    with pytest.raises(ValueError, match="--quant-group-size"):
        ModelRunner(EngineConfig(dtype="float32", device="cpu", quantization="w8a8", quant_group_size=32))


def test_w8a8_model_matches_float_within_activation_rounding(tiny_with_tokenizer, tmp_path):
    """Smoothed int8 layers (down_proj stays float), calibrated once and cached; logits close to fp32,
    same greedy tokens; the stored weight dequantizes back to W (the smoothing undone)."""
    from engine.quant.smooth import FLOAT_LAYERS

    folder = tiny_with_tokenizer  # calibration tokenizes text
    base = EngineConfig(model=str(folder), dtype="float32", device="cpu", cache_dir=str(tmp_path), block_size=4)
    runners = {q: ModelRunner(replace(base, quantization=q)) for q in ("none", "w8a8")}
    modules = dict(runners["w8a8"].model.named_modules())
    quantized = {n: m for n, m in modules.items() if isinstance(m, QuantLinear)}
    assert quantized and {type(m.kernel).__name__ for m in quantized.values()} == {"DynamicInt8Matmul"}
    assert all(n.endswith(FLOAT_LAYERS) == (n not in quantized) for n, m in modules.items()
               if isinstance(m, (torch.nn.Linear, QuantLinear)) and n != "lm_head")
    float_modules = dict(runners["none"].model.named_modules())
    for name, m in quantized.items():
        w, qw = float_modules[name].weight.float(), m.qw
        assert qw.smooth is not None and (qw.smooth > 0).all()
        step = qw.scales[:, :1] / qw.smooth[None, :]  # one int8 step of W * diag(s), in W's units
        assert ((dequantize(qw) - w).abs() <= step / 2 + 1e-6).all()
    prompt = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    logits = {}
    for q, r in runners.items():
        pool = KVPool.allocate(r.kv_layout(num_blocks=16))
        logits[q] = r.prefill([prompt], pool_writer(pool, [token_slots(list(range(16)), len(prompt), 4)]))
    ref = logits["none"]
    err = (logits["w8a8"] - ref).abs().max().item()
    assert 0 < err < 0.05 * ref.abs().max().item(), err
    assert (logits["w8a8"].argmax(-1) == ref.argmax(-1)).all()
    assert len(list((tmp_path / "derived").glob("*w8a8*.safetensors"))) == 1
    again = ModelRunner(replace(base, quantization="w8a8"))  # from the cache: the same factors and weights
    a = dict(again.model.named_modules())[next(iter(quantized))].qw
    b = next(iter(quantized.values())).qw
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.smooth, b.smooth)
