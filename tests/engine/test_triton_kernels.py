"""Triton kernels against the torch reference. On a machine without a GPU they run under
TRITON_INTERPRET=1 (set in conftest.py before Triton is imported), in fp32 and fp16 (the
interpreter has no bfloat16); on a GPU they run for real."""

from __future__ import annotations

import pytest
import torch

from engine.attention import TorchBackend, VarlenBatch, torch_paged_decode

triton = pytest.importorskip("triton", reason="Triton is not installed on this platform")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 2e-3}


def _pool(nb, bs, kvh, d, dtype, gen):
    return (torch.randn(nb, bs, kvh, d, generator=gen).to(dtype).to(DEVICE),
            torch.randn(nb, bs, kvh, d, generator=gen).to(dtype).to(DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bs,h,kvh,d", [(16, 9, 3, 64), (4, 8, 8, 32), (32, 4, 1, 16)])
@pytest.mark.parametrize("splits", [1, 4])
def test_paged_decode(dtype, bs, h, kvh, d, splits):
    from engine.kernels.triton_attention import paged_decode

    gen = torch.Generator().manual_seed(bs + h + d)
    lens = torch.tensor([1, bs - 1, bs, bs + 1, 3 * bs + 5, 130])
    mb = int(-(-lens.max() // bs)) + 1  # one spare column: padding entries must never be read
    nb = len(lens) * mb
    kc, vc = _pool(nb, bs, kvh, d, dtype, gen)
    tables = torch.randperm(nb, generator=gen)[: len(lens) * mb].view(len(lens), mb).to(torch.int32)
    q = torch.randn(len(lens), h, d, generator=gen).to(dtype).to(DEVICE)
    out = paged_decode(q, kc, vc, tables.to(DEVICE), lens.to(torch.int32).to(DEVICE), d ** -0.5, num_splits=splits)
    ref = torch_paged_decode(q.float(), kc.float(), vc.float(), tables.to(DEVICE), lens.to(DEVICE), d ** -0.5)
    assert out.dtype == dtype
    assert (out.float() - ref).abs().max().item() < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bs,h,kvh,d", [(16, 9, 3, 64), (4, 4, 2, 32)])
@pytest.mark.parametrize("with_prefix", [False, True])
def test_extend_attention(dtype, bs, h, kvh, d, with_prefix):
    """Ragged new tokens (1 to 70) over cached prefixes (0 to 50 tokens, on and off block bounds)."""
    from engine.kernels.triton_attention import extend_attention

    gen = torch.Generator().manual_seed(7 + bs + d)
    q_lens = [1, 17, 70, 5]
    prefix = [0, bs, 50, 3] if with_prefix else [0] * 4
    mb = max(-(-(p + n) // bs) for p, n in zip(prefix, q_lens))
    nb = 4 * mb
    kc, vc = _pool(nb, bs, kvh, d, dtype, gen)
    tables = torch.randperm(nb, generator=gen)[: 4 * mb].view(4, mb).to(torch.int32)
    t = sum(q_lens)
    q = torch.randn(t, h, d, generator=gen).to(dtype).to(DEVICE)
    k = torch.randn(t, kvh, d, generator=gen).to(dtype).to(DEVICE)
    v = torch.randn(t, kvh, d, generator=gen).to(dtype).to(DEVICE)
    batch = VarlenBatch.build(q_lens, prefix, tables, DEVICE)
    out = extend_attention(q, k, v, batch.cu_q, batch.max_q_len, batch.prefix_lens if with_prefix else None,
                           kc, vc, batch.block_tables, d ** -0.5)
    ref = TorchBackend().varlen_prefill(q.float(), k.float(), v.float(), batch, kc.float(), vc.float(), d ** -0.5)
    assert (out.float() - ref).abs().max().item() < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_store_kv_writes_each_token_to_its_slot_and_skips_padding(dtype):
    from engine.kernels.triton_ops import store_kv

    gen = torch.Generator().manual_seed(1)
    nb, bs, kvh, d = 8, 4, 3, 16
    kc = torch.zeros(nb, bs, kvh, d, dtype=dtype, device=DEVICE)
    vc = torch.zeros_like(kc)
    qkv = torch.randn(6, (3 + 2) * kvh * d, generator=gen).to(dtype).to(DEVICE)  # k, v are strided views
    k = qkv[:, 3 * kvh * d: 4 * kvh * d].view(6, kvh, d)
    v = qkv[:, 4 * kvh * d:].view(6, kvh, d)
    slots = torch.tensor([5, 0, 31, -1, 12, 13], device=DEVICE)
    store_kv(kc, vc, slots, k, v)
    ref_k, ref_v = torch.zeros_like(kc), torch.zeros_like(vc)
    TorchBackend().store_kv(ref_k, ref_v, slots, k, v)
    assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)
    assert int((kc != 0).any(-1).any(-1).sum()) == 5  # the padding row wrote nothing


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("norm_kind", ["rms", "rms_unit_offset"])  # the second: Gemma's (1 + w) in float32
def test_rms_norm(dtype, with_residual, norm_kind):
    from engine.config import Norm
    from engine.kernels.triton_ops import rms_norm
    from engine.model.llama import RMSNorm

    gen = torch.Generator().manual_seed(2)
    norm = RMSNorm(576, 1e-5, Norm(norm_kind))
    with torch.no_grad():
        norm.weight.copy_(torch.randn(576, generator=gen))
    norm = norm.to(dtype).to(DEVICE)
    x = torch.randn(5, 576, generator=gen).to(dtype).to(DEVICE)
    r = torch.randn(5, 576, generator=gen).to(dtype).to(DEVICE) if with_residual else None
    out, new_r = rms_norm(x, norm.weight, 1e-5, r, unit_offset=norm.unit_offset)
    summed = x + r if with_residual else x
    assert torch.equal(new_r, summed)
    assert (out.float() - norm(summed).float()).abs().max().item() < (1e-5 if dtype == torch.float32 else 4e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rotary", [64, 32])  # 32 of 64: partial rotary (Phi), the other dims pass through
def test_rope(dtype, rotary):
    from engine.kernels.triton_ops import rope
    from engine.model.rope import apply_rope

    gen = torch.Generator().manual_seed(3)
    t, h, kvh, d = 7, 9, 3, 64
    cos = torch.randn(100, rotary, generator=gen).to(dtype).to(DEVICE)
    sin = torch.randn(100, rotary, generator=gen).to(dtype).to(DEVICE)
    qkv = torch.randn(t, (h + 2 * kvh) * d, generator=gen).to(dtype).to(DEVICE)
    q, k, _ = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
    q, k = q.view(t, h, d), k.view(t, kvh, d)
    pos = torch.tensor([0, 5, 99, 3, 3, 42, 7], device=DEVICE)
    ref_q, ref_k = apply_rope(q.float(), cos[pos].float(), sin[pos].float()), apply_rope(k.float(), cos[pos].float(),
                                                                                         sin[pos].float())
    rope(q, k, cos, sin, pos)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (q.float() - ref_q).abs().max().item() < tol and (k.float() - ref_k).abs().max().item() < tol


def test_whole_forward_on_the_triton_backend_matches_torch(tiny_models):
    """A tiny Llama and Qwen3 run prefill, extend over a cached prefix and paged decode with every
    Triton kernel (attention, KV store, fused add + RMSNorm, RoPE): logits equal the torch path's."""
    from engine.config import EngineConfig
    from engine.kv_cache import KVPool
    from engine.runner import ModelRunner, pool_writer, token_slots

    for name in ("llama", "qwen3"):
        runners = {b: ModelRunner(EngineConfig(model=str(tiny_models[name]), dtype="float32", device=DEVICE,
                                               block_size=4, attention_backend=b)) for b in ("torch", "triton")}
        assert runners["triton"].backend.name == "triton"
        prompts = [[3, 1, 4, 1, 5, 9, 2], [6, 5, 3]]
        tables = [[9, 2, 7, 4], [0, 11, 5]]
        got = {}
        for b, runner in runners.items():
            pool = KVPool.allocate(runner.kv_layout(num_blocks=16), DEVICE)
            sink = pool_writer(pool, [token_slots(t, len(p), 4) for t, p in zip(tables, prompts)])
            first = runner.prefill(prompts, sink)
            ext = runner.extend(pool, [[8, 8], [7, 2, 1]], [7, 3], tables, all_logits=True)
            bt = torch.tensor([tables[0], tables[1] + [0]], device=DEVICE)
            dec = runner.decode(pool, torch.tensor([2, 9], device=DEVICE), torch.tensor([9, 6], device=DEVICE), bt)
            got[b] = (first, ext, dec)
        for a, b in zip(got["torch"], got["triton"]):
            assert (a - b).abs().max().item() < 1e-4, name
