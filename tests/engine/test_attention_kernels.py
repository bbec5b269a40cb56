"""Attention backends against the torch reference (gather + masked SDPA in float32)."""

from __future__ import annotations

import pytest
import torch

from engine.attention import BACKENDS, get_backend, torch_paged_decode


def case(dtype, b=7, h=9, kvh=3, d=64, bs=16, nb=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    k_pool = torch.randn(nb, bs, kvh, d, generator=g).to(dtype)
    v_pool = torch.randn(nb, bs, kvh, d, generator=g).to(dtype)
    lens = torch.tensor([1, 15, 16, 17, 100, 250, 333][:b])
    mb = int((lens.max() + bs - 1) // bs)
    tables = torch.randperm(nb, generator=g)[: b * mb].view(b, mb)  # scattered blocks
    q = torch.randn(b, h, d, generator=g).to(dtype)
    return q, k_pool, v_pool, tables, lens, d ** -0.5


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_cpu_kernel_matches_reference(dtype, tol):
    backend = get_backend("cpu", "cpu")
    assert backend.name == "cpu", "the native CPU kernel did not build (needs a C++ compiler)"
    kernel = backend.paged_decode
    q, kp, vp, tables, lens, scale = case(dtype)
    ref = torch_paged_decode(q.float(), kp.float(), vp.float(), tables, lens, scale)
    out = kernel(q, kp, vp, tables, lens, scale)
    assert out.dtype == dtype and out.shape == q.shape
    assert (out.float() - ref).abs().max().item() < tol


def test_cpu_kernel_ignores_blocks_past_the_context():
    kernel = get_backend("cpu", "cpu").paged_decode
    q, kp, vp, tables, lens, scale = case(torch.float32)
    out = kernel(q, kp, vp, tables, lens, scale)
    # Poison every slot past each sequence's length: the output must not move.
    kp2, vp2 = kp.clone(), vp.clone()
    bs = kp.shape[1]
    for b, n in enumerate(lens.tolist()):
        for pos in range(n, tables.shape[1] * bs):
            blk = int(tables[b, pos // bs])
            kp2[blk, pos % bs] = 1e4
            vp2[blk, pos % bs] = 1e4
    assert torch.equal(kernel(q, kp2, vp2, tables, lens, scale), out)


def test_registry_and_fallback():
    assert set(BACKENDS) >= {"torch", "cpu", "triton"}
    assert get_backend("torch", "cpu").name == "torch"
    assert get_backend("auto", "cpu").name == "cpu"
    with pytest.raises(ValueError):
        get_backend("nonexistent", "cpu")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_cpu_extend_of_short_chunks_matches_reference(dtype, tol):
    """Speculative verification's shape: a few new tokens per sequence, already stored in the pool."""
    from engine.attention import TorchBackend, VarlenBatch

    backend = get_backend("cpu", "cpu")
    gen = torch.Generator().manual_seed(4)
    nb, bs, kvh, h, d = 64, 16, 3, 9, 64
    q_lens, prefix = [4, 1, 8, 3], [0, 17, 40, 15]
    kc = torch.randn(nb, bs, kvh, d, generator=gen).to(dtype)
    vc = torch.randn(nb, bs, kvh, d, generator=gen).to(dtype)
    mb = max(-(-(p + n) // bs) for p, n in zip(prefix, q_lens))
    tables = torch.randperm(nb, generator=gen)[: 4 * mb].view(4, mb)
    q = torch.randn(sum(q_lens), h, d, generator=gen).to(dtype)
    rows = [(i, p + j) for i, (p, n) in enumerate(zip(prefix, q_lens)) for j in range(n)]
    k = torch.stack([kc[tables[i, pos // bs], pos % bs] for i, pos in rows])  # the new tokens, as stored
    v = torch.stack([vc[tables[i, pos // bs], pos % bs] for i, pos in rows])
    batch = VarlenBatch.build(q_lens, prefix, tables)
    out = backend.paged_extend(q, k, v, batch, kc, vc, d ** -0.5)
    ref = TorchBackend().varlen_prefill(q.float(), k.float(), v.float(), batch, kc.float(), vc.float(), d ** -0.5)
    assert (out.float() - ref).abs().max().item() < tol
