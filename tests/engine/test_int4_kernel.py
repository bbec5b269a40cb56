"""Our native int4 GEMV (engine/kernels/int4_gemv_cpu.cpp) against the exact product it stands for.

It computes dequant(W) (scale and min rounded to float16) times the activations quantized to int8 per
block of 32: that product in float64 is `int4_kernel.reference`, and the kernel may differ from it by
float32 summation order only. Against dequantize-then-matmul in float32 it may differ by what the
activation and float16 roundings move, a bound derived per output below. Both inner loops are checked
where the CPU runs them (the AVX2 one built a second time with -mavx2 on an AVX-512 CPU).
"""

from __future__ import annotations

import pytest
import torch

from engine.cpu_features import cpu_flags
from engine.kernels import cpu_int4_gemv
from engine.quant import int4_kernel
from engine.quant.cpu import CPUQuantMatmul
from engine.quant.scheme import dequantize, quantize, unpack_int4

AVX2_CFLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp")
F32_EPS = 2.0**-24  # one float32 rounding, relative
F16_EPS = 2.0**-11


def _native():
    module = cpu_int4_gemv()
    if module is None:
        pytest.skip("the int4 GEMV did not build here (no C++ compiler or not an AVX2 CPU): torch's op serves")
    return module


def _avx2():
    native = _native()
    if native.isa() == "avx2":
        return native
    if "avx2" not in cpu_flags():
        pytest.skip("this CPU cannot run AVX2 code")
    module = cpu_int4_gemv(AVX2_CFLAGS, "avx2test")
    assert module is not None and module.isa() == "avx2"
    return module


MODULES = {"native": _native, "avx2": _avx2}


def _weight(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0] = 0  # zero row
    w[1 % n] = w[1 % n].abs() + 0.01  # all positive: min > 0
    return w


def _x(m: int, k: int, seed: int) -> torch.Tensor:
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    x[0, :32] = 0  # an all-zero activation block: d = 0
    x[-1, 5] = 40.0  # an outlier: its block's step is coarse
    return x


def _summation_bound(qw, xq, d) -> torch.Tensor:
    """float32 evaluation of the per-block terms and their sum: (blocks + 4) roundings of sum |terms|."""
    k = qw.shape[1]
    abs_terms = int4_kernel.reference(_abs(qw), xq.abs(), d)
    return (k // 32 + 4) * F32_EPS * abs_terms * 2 + 1e-30


def _abs(qw):
    """The weight with |scale|, |min|: |dequant| <= q|s| + |m| bounds every term's magnitude."""
    from engine.quant.scheme import QuantizedWeight

    return QuantizedWeight("int4", qw.group_size, qw.qweight, qw.scales.abs(), qw.zeros.abs())


@pytest.mark.parametrize("which", ["native", "avx2"])
@pytest.mark.parametrize("n,k,gs", [(48, 64, 32), (37, 96, 32), (5, 128, 64), (200, 256, 128)])
def test_kernel_equals_the_int8_product_it_stands_for(which, n, k, gs):
    module = MODULES[which]()
    qw = quantize(_weight(n, k, seed=n), "int4", gs)
    gemv = int4_kernel.Int4Gemv(qw, module)
    for rows in (1, 2, 3, 4, 5, 7, 16):
        x = _x(rows, k, seed=rows)
        xq, d = module.quantize_activations(x)
        out = gemv(x)
        assert out.shape == (rows, n) and out.dtype == torch.float32
        exact = int4_kernel.reference(qw, xq, d)
        err = (out.double() - exact).abs()
        assert (err <= _summation_bound(qw, xq, d)).all(), f"rows={rows}: max err {err.max().item():.3e}"


@pytest.mark.parametrize("which", ["native", "avx2"])
def test_activation_rounding_is_the_documented_one(which):
    module = MODULES[which]()
    x = _x(3, 160, seed=9)
    x[1, 40:72] = torch.tensor([0.5, -0.5, 1.5, 2.5] * 8) * (127 / 2.5)  # exact ties: round half to even
    xq, d = module.quantize_activations(x)
    ref_q, ref_d = int4_kernel.quantize_activations(x)
    assert torch.equal(xq, ref_q) and torch.equal(d, ref_d)
    blocks = x.reshape(3, -1, 32)
    assert torch.equal(d, blocks.abs().amax(-1) / 127)
    step = d[..., None].expand_as(blocks)
    assert ((blocks - xq.reshape(3, -1, 32).float() * step).abs() <= step / 2 * (1 + 1e-6)).all()
    assert xq.abs().max() == 127 and d[0, 0] == 0 and (xq[0, :32] == 0).all()


@pytest.mark.parametrize("which", ["native", "avx2"])
def test_kernel_against_dequantize_then_matmul(which):
    """|y - x @ deq^T| <= |x - xd| @ |w16|^T + |x| @ |deq - w16|^T (+ float32 sums), per output."""
    module = MODULES[which]()
    n, k = 70, 192
    qw = quantize(_weight(n, k, seed=3), "int4", 32)
    x = _x(6, k, seed=4)
    out = int4_kernel.Int4Gemv(qw, module)(x)
    deq = dequantize(qw).double()
    ref = x.double() @ deq.T
    half_step = (x.abs().reshape(6, -1, 32).amax(-1, keepdim=True) / 127 / 2).expand(6, k // 32, 32).reshape(6, k)
    s, m = (t.repeat_interleave(32, dim=1).double() for t in (qw.scales, qw.zeros))
    w16_err = F16_EPS / 2 * (unpack_int4(qw.qweight).double() * s.abs() + m.abs())  # fp16 rounding of s and m
    bound = half_step.double() @ (deq.abs() + w16_err).T + x.abs().double() @ w16_err.T
    bound = bound * (1 + 1e-5) + 1e-5 * (x.abs().double() @ deq.abs().T) + 1e-6
    err = (out.double() - ref).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3e}"
    assert err.max() > 0  # the int8 path really ran
    # the derived bound is a real one: activation rounding moves outputs by a good share of it
    assert err.max() > 0.01 * bound.max()


@pytest.mark.parametrize("which", ["native", "avx2"])
def test_a_nan_or_inf_activation_makes_its_outputs_nan(which):
    """Not a finite number made up from casting NaN to int: what dequantize-then-matmul gives (NaN; inf
    times weights of both signs), so a numerical bug upstream shows instead of becoming wrong tokens."""
    module = MODULES[which]()
    qw = quantize(_weight(20, 64, seed=5), "int4", 32)
    gemv = int4_kernel.Int4Gemv(qw, module)
    x = _x(3, 64, seed=6)
    clean = gemv(x)
    x[0, 3], x[2, 40] = float("nan"), float("inf")
    out = gemv(x)
    assert out[0].isnan().all() and out[2].isnan().all()
    assert torch.equal(out[1], clean[1])  # other rows untouched


def test_packed_layout_and_refusals():
    qw = quantize(_weight(17, 64, seed=1), "int4", 32)
    packed = int4_kernel.pack(qw)
    assert packed.shape == (2, 2, 64 + 32 * 8) and packed.dtype == torch.uint8  # 17 rows -> 2 tiles of 16
    # tile 0, group 1, step 0: row 3's 4 bytes hold inputs 32..35 (low) and 36..39 (high)
    q = unpack_int4(qw.qweight)
    row3 = packed[0, 1, 64 + 3 * 4: 64 + 4 * 4]
    assert torch.equal(row3 & 0xF, q[3, 32:36]) and torch.equal(row3 >> 4, q[3, 36:40])
    assert torch.equal(packed[0, 1, :32].view(torch.float16), qw.scales[:16, 1].half())
    assert (packed[1, :, 2:32] == 0).all()  # padding rows 17..31: scale 0
    for bad in (quantize(_weight(16, 64, seed=1), "int4", 16), quantize(_weight(16, 64, seed=1), "int8", 32)):
        assert not int4_kernel.supports(bad)
        with pytest.raises(ValueError, match="multiple of 32"):
            int4_kernel.pack(bad)
    module = _native()
    gemv = int4_kernel.Int4Gemv(qw, module)
    with pytest.raises(RuntimeError, match="inputs"):
        module.int4_gemv(torch.zeros(1, 32), gemv.packed, 17, 64, 32)
    with pytest.raises(RuntimeError, match="bytes"):
        module.int4_gemv(torch.zeros(1, 64), gemv.packed[:1], 17, 64, 32)


def test_cpu_matmul_selects_the_kernel_and_falls_back(monkeypatch):
    qw = quantize(_weight(32, 64, seed=2), "int4", 32)
    module = _native()
    mm = CPUQuantMatmul(qw)
    assert mm.gemv is not None and mm.gemv.module is module and not mm.int4pack
    x = _x(3, 64, seed=5)
    assert torch.equal(mm(x), mm.gemv(x))
    assert mm(x.bfloat16()).dtype == torch.bfloat16
    # no compiler here: torch's packed op serves decode instead
    import engine.kernels

    monkeypatch.setattr(engine.kernels, "cpu_int4_gemv", lambda: None)
    fallback = CPUQuantMatmul(qw)
    assert fallback.gemv is None and fallback.int4pack and fallback.fast_decode
    # groups of 16 are not the kernel's: torch's op (groups of 32..256) or dequantize
    assert CPUQuantMatmul(quantize(_weight(32, 64, seed=2), "int4", 16)).gemv is None


def test_packed_weights_share_huge_page_chunks():
    module = _native()
    arena = int4_kernel.HugePageArena(module, chunk=4096)
    qws = [quantize(_weight(n, 64, seed=n), "int4", 32) for n in (16, 5, 40, 100, 48)]
    placed = [arena.place(int4_kernel.pack(qw)) for qw in qws]
    assert [t.numel() for t in placed] == [640, 640, 1920, 4480, 1920]  # tiles x 2 groups x (64 + 256)
    for qw, t in zip(qws, placed):
        assert torch.equal(t, int4_kernel.pack(qw)) and t.is_contiguous() and t.data_ptr() % 64 == 0
    first = placed[0].data_ptr()
    assert first % (2 << 20) == 0  # a chunk starts on a 2 MiB boundary
    assert [t.data_ptr() - first for t in placed[1:3]] == [640, 1280]  # one after another
    assert placed[3].data_ptr() % (2 << 20) == 0  # larger than a chunk: a buffer of its own
    assert placed[4].data_ptr() % (2 << 20) == 0 and placed[4].data_ptr() != first  # 3200 + 1920 > 4096: a new chunk
    x = _x(2, 64, seed=1)
    for qw in qws:  # the kernel reads them where they were placed
        gemv = int4_kernel.Int4Gemv(qw, module)
        assert gemv.packed.data_ptr() % 64 == 0
        xq, d = module.quantize_activations(x)
        assert ((gemv(x).double() - int4_kernel.reference(qw, xq, d)).abs() <= _summation_bound(qw, xq, d)).all()


def test_per_call_benchmark_times_both_paths():
    from pdserve.bench.int4_kernel import run

    _native()
    lines: list[str] = []
    rows = run((1, 3), shapes=((32, 64),), print_fn=lines.append)
    assert [(r["n"], r["k"], r["rows"]) for r in rows] == [(32, 64, 1), (32, 64, 3)]
    assert all(r["ours_us"] > 0 and r["torch_us"] > 0 for r in rows) and len(lines) == 4
