"""Sliding windows and logit softcaps on every attention backend (issue 26).

The torch reference is first checked against a plain float64 loop written from the definition
(query at position p sees keys p - W < j <= p; scores s -> c * tanh(s / c)); the native CPU kernel
and the Triton kernels (under TRITON_INTERPRET=1 without a GPU) are checked against the reference.
Table entries before every query's window are -1 (freed blocks): a backend that read one would fail.
"""

from __future__ import annotations

import math

import pytest
import torch

from engine.attention import TorchBackend, VarlenBatch, get_backend, torch_paged_decode

CASES = [(None, None), (16, None), (7, 50.0), (None, 5.0), (40, 2.0)]  # (window, softcap)


def naive(q_rows, keys, values, q_pos, k_pos, scale, window, softcap):
    """q_rows [n, H, D] at positions q_pos; keys/values [m, KVH, D] at k_pos: float64 by the definition."""
    n, h, d = q_rows.shape
    group = h // keys.shape[1]
    out = torch.zeros(n, h, d, dtype=torch.float64)
    for i in range(n):
        seen = [j for j in range(len(k_pos))
                if k_pos[j] <= q_pos[i] and (window is None or k_pos[j] > q_pos[i] - window)]
        for head in range(h):
            s = torch.stack([(q_rows[i, head].double() @ keys[j, head // group].double()) * scale for j in seen])
            if softcap is not None:
                s = softcap * torch.tanh(s / softcap)
            p = torch.softmax(s, 0)
            out[i, head] = sum(p[t] * values[j, head // group].double() for t, j in enumerate(seen))
    return out


def decode_case(dtype, window, b=5, h=6, kvh=2, d=16, bs=4, seed=0):
    """Decode rows with context lengths around and past the window; blocks wholly before it are -1."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor([1, 9, 17, 40, 63][:b])
    mb = int(-(-lens.max() // bs))
    nb = b * mb
    k_pool, v_pool = (torch.randn(nb, bs, kvh, d, generator=g).to(dtype) for _ in range(2))
    tables = torch.randperm(nb, generator=g)[: b * mb].view(b, mb)
    if window is not None:
        for i, n in enumerate(lens.tolist()):
            dead = max(0, (n - window) // bs)  # blocks wholly before position n - window
            tables[i, :dead] = -1
    q = torch.randn(b, h, d, generator=g).to(dtype)
    return q, k_pool, v_pool, tables, lens, d ** -0.5


def _gather(pool, table, n, bs):
    return torch.stack([pool[table[p // bs], p % bs] if table[p // bs] >= 0 else torch.full_like(pool[0, 0], math.nan)
                        for p in range(n)])


@pytest.mark.parametrize("window,softcap", CASES)
def test_reference_decode_matches_the_definition(window, softcap):
    q, kp, vp, tables, lens, scale = decode_case(torch.float32, window)
    bs = kp.shape[1]
    ref = torch_paged_decode(q, kp, vp, tables, lens, scale, window=window, softcap=softcap)
    for i, n in enumerate(lens.tolist()):
        keys, values = _gather(kp, tables[i], n, bs), _gather(vp, tables[i], n, bs)
        want = naive(q[i:i + 1], keys, values, [n - 1], list(range(n)), scale, window, softcap)
        assert (ref[i].double() - want[0]).abs().max().item() < 1e-5


@pytest.mark.parametrize("window,softcap", CASES)
def test_reference_prefill_with_prefix_matches_the_definition(window, softcap):
    g = torch.Generator().manual_seed(3)
    bs, kvh, h, d = 4, 2, 4, 8
    q_lens, prefix = [30, 5, 12], [0, 21, 9]
    mb = max(-(-(p + n) // bs) for p, n in zip(prefix, q_lens))
    kc, vc = (torch.randn(3 * mb, bs, kvh, d, generator=g) for _ in range(2))
    tables = torch.randperm(3 * mb, generator=g).view(3, mb)
    t = sum(q_lens)
    q, k, v = (torch.randn(t, n, d, generator=g) for n in (h, kvh, kvh))
    out = TorchBackend().varlen_prefill(q, k, v, VarlenBatch.build(q_lens, prefix, tables), kc, vc, d ** -0.5,
                                        window=window, softcap=softcap)
    row = 0
    for i, (n, p) in enumerate(zip(q_lens, prefix)):
        keys = torch.cat([_gather(kc, tables[i], p, bs), k[row:row + n]]) if p else k[row:row + n]
        values = torch.cat([_gather(vc, tables[i], p, bs), v[row:row + n]]) if p else v[row:row + n]
        want = naive(q[row:row + n], keys, values, list(range(p, p + n)), list(range(p + n)), d ** -0.5, window,
                     softcap)
        assert (out[row:row + n].double() - want).abs().max().item() < 1e-5
        row += n


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("window,softcap", CASES)
def test_cpu_kernel_decode(dtype, tol, window, softcap):
    backend = get_backend("cpu", "cpu")
    assert backend.name == "cpu", "the native CPU kernel did not build (needs a C++ compiler)"
    q, kp, vp, tables, lens, scale = decode_case(dtype, window)
    ref = torch_paged_decode(q.float(), kp.float(), vp.float(), tables, lens, scale, window=window, softcap=softcap)
    out = backend.paged_decode(q, kp, vp, tables, lens, scale, window=window, softcap=softcap)
    assert (out.float() - ref).abs().max().item() < tol


def test_cpu_kernel_reads_nothing_before_the_window():
    """Poison every slot before each row's window (and the -1 entries point nowhere): the output stays."""
    backend = get_backend("cpu", "cpu")
    window = 16
    q, kp, vp, tables, lens, scale = decode_case(torch.float32, window)
    out = backend.paged_decode(q, kp, vp, tables, lens, scale, window=window)
    kp2, vp2 = kp.clone(), vp.clone()
    bs = kp.shape[1]
    for i, n in enumerate(lens.tolist()):
        for pos in range(0, max(0, n - window)):
            blk = int(tables[i, pos // bs])
            if blk >= 0:
                kp2[blk, pos % bs] = 1e4
                vp2[blk, pos % bs] = 1e4
    assert torch.equal(backend.paged_decode(q, kp2, vp2, tables, lens, scale, window=window), out)
    assert not torch.equal(backend.paged_decode(q, kp2, vp2, tables.clamp_min(0), lens, scale), out)


@pytest.mark.parametrize("window,softcap", CASES)
def test_cpu_extend_of_short_chunks(window, softcap):
    """Speculative verification's shape through the native kernel, windowed: rows past a prefix."""
    backend = get_backend("cpu", "cpu")
    g = torch.Generator().manual_seed(5)
    nb, bs, kvh, h, d = 64, 4, 2, 4, 16
    q_lens, prefix = [4, 1, 8], [0, 37, 20]
    kc, vc = (torch.randn(nb, bs, kvh, d, generator=g) for _ in range(2))
    mb = max(-(-(p + n) // bs) for p, n in zip(prefix, q_lens))
    tables = torch.randperm(nb, generator=g)[: 3 * mb].view(3, mb)
    q = torch.randn(sum(q_lens), h, d, generator=g)
    rows = [(i, p + j) for i, (p, n) in enumerate(zip(prefix, q_lens)) for j in range(n)]
    k = torch.stack([kc[tables[i, pos // bs], pos % bs] for i, pos in rows])
    v = torch.stack([vc[tables[i, pos // bs], pos % bs] for i, pos in rows])
    batch = VarlenBatch.build(q_lens, prefix, tables)
    out = backend.paged_extend(q, k, v, batch, kc, vc, d ** -0.5, window=window, softcap=softcap)
    ref = TorchBackend().varlen_prefill(q, k, v, batch, kc, vc, d ** -0.5, window=window, softcap=softcap)
    assert (out - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window,softcap", CASES)
@pytest.mark.parametrize("splits", [1, 4])
def test_triton_decode(dtype, window, softcap, splits):
    pytest.importorskip("triton", reason="Triton is not installed on this platform")
    from engine.kernels.triton_attention import paged_decode

    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, kp, vp, tables, lens, scale = decode_case(dtype, window)
    ref = torch_paged_decode(q.float(), kp.float(), vp.float(), tables, lens, scale, window=window, softcap=softcap)
    out = paged_decode(q.to(device), kp.to(device), vp.to(device), tables.to(torch.int32).to(device),
                       lens.to(torch.int32).to(device), scale, num_splits=splits, window=window, softcap=softcap)
    assert (out.float().cpu() - ref).abs().max().item() < (2e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window,softcap", CASES)
def test_triton_extend(dtype, window, softcap):
    """Ragged new tokens over cached prefixes, windowed: prefix blocks before every query's window are -1."""
    pytest.importorskip("triton", reason="Triton is not installed on this platform")
    from engine.kernels.triton_attention import extend_attention

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(11)
    bs, h, kvh, d = 4, 4, 2, 16
    q_lens, prefix = [1, 17, 70, 5], [0, 4, 50, 33]
    mb = max(-(-(p + n) // bs) for p, n in zip(prefix, q_lens))
    kc, vc = (torch.randn(4 * mb, bs, kvh, d, generator=g).to(dtype) for _ in range(2))
    tables = torch.randperm(4 * mb, generator=g).view(4, mb).to(torch.int32)
    if window is not None:
        for i, p in enumerate(prefix):
            tables[i, :max(0, (p - window + 1) // bs)] = -1
    t = sum(q_lens)
    q, k, v = (torch.randn(t, n, d, generator=g).to(dtype) for n in (h, kvh, kvh))
    batch = VarlenBatch.build(q_lens, prefix, tables)
    ref = TorchBackend().varlen_prefill(q.float(), k.float(), v.float(), batch, kc.float(), vc.float(), d ** -0.5,
                                        window=window, softcap=softcap)
    dev = VarlenBatch.build(q_lens, prefix, tables, device)
    out = extend_attention(q.to(device), k.to(device), v.to(device), dev.cu_q, dev.max_q_len, dev.prefix_lens,
                           kc.to(device), vc.to(device), dev.block_tables, d ** -0.5, window=window, softcap=softcap)
    assert (out.float().cpu() - ref).abs().max().item() < (2e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("window,softcap", [(16, None), (7, 50.0)])
def test_int8_pools_with_a_window(window, softcap):
    """--kv-cache-dtype int8: the CPU kernel and Triton read the window with its scales, as the reference."""
    from engine.kv_quant import quantize_kv

    q, kp, vp, tables, lens, scale = decode_case(torch.float32, window)
    (kq, ks), (vq, vs) = quantize_kv(kp), quantize_kv(vp)
    ref = torch_paged_decode(q, kq, vq, tables, lens, scale, ks, vs, window=window, softcap=softcap)
    out = get_backend("cpu", "cpu").paged_decode(q, kq, vq, tables, lens, scale, ks, vs, window=window,
                                                 softcap=softcap)
    assert (out - ref).abs().max().item() < 1e-5
    pytest.importorskip("triton", reason="Triton is not installed on this platform")
    from engine.kernels.triton_attention import paged_decode

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = paged_decode(q.to(device), kq.to(device), vq.to(device), tables.to(torch.int32).to(device),
                       lens.to(torch.int32).to(device), scale, k_scale=ks.to(device), v_scale=vs.to(device),
                       window=window, softcap=softcap)
    assert (out.cpu() - ref).abs().max().item() < 2e-5
