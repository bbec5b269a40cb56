"""`--kv-cache-dtype int8`: the quantizer, the pool layout, every store and decode path against the torch
reference over the same int8 pool (tight) and against the float pool (within a bound derived from the
quantization step), a tiny model's logits, and the capacity a pool of the same bytes gains."""

from __future__ import annotations

import math

import pytest
import torch

from engine.attention import TorchBackend, VarlenBatch, get_backend, torch_paged_decode
from engine.kv_cache import BlockManager, KVLayout, KVPool
from engine.kv_quant import dequantize_kv, quantize_kv


def test_round_trip_error_is_at_most_half_a_step_per_token_and_head():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, 64, generator=g) * torch.logspace(-6, 3, 50).view(50, 1, 1)
    x[3, 1] = 0.0  # a row of zeros: finite scale, zeros back
    x[4, 0, 5] = -x[4, 0].abs().max() * 2  # the most negative value sets the scale
    q, s = quantize_kv(x)
    assert q.dtype == torch.int8 and s.shape == (50, 3) and s.dtype == torch.float32
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    err = (dequantize_kv(q, s) - x).abs()
    assert bool((err <= s.unsqueeze(-1) * (0.5 + 1e-5)).all())  # + float32 rounding of x / s (|x / s| <= 127)
    assert torch.equal(dequantize_kv(q[3, 1], s[3, 1]), torch.zeros(64))
    assert torch.equal(quantize_kv(x.to(torch.bfloat16))[0], quantize_kv(x.to(torch.bfloat16).float())[0])


def test_int8_layout_keeps_scales_with_their_blocks_and_holds_more_blocks():
    kw = dict(num_layers=30, block_size=16, num_kv_heads=3, head_dim=64)
    bf16, fp32, int8 = (KVLayout(num_blocks=1, dtype=d, kv_cache_dtype=c, **kw)
                        for d, c in (("bfloat16", "auto"), ("float32", "auto"), ("bfloat16", "int8")))
    assert int8.token_bytes == 3 * (64 + 4) and bf16.token_bytes == 3 * 128
    budget = 2 << 30
    blocks = {n: KVLayout.for_budget(dtype=lay.dtype, kv_cache_dtype=lay.kv_cache_dtype, budget_bytes=budget, **kw)
              .num_blocks for n, lay in (("bf16", bf16), ("fp32", fp32), ("int8", int8))}
    assert blocks["int8"] / blocks["bf16"] == pytest.approx(128 / 68, rel=1e-3)  # 1.88x
    assert blocks["int8"] / blocks["fp32"] == pytest.approx(256 / 68, rel=1e-3)  # 3.76x
    # The goal: the same pool holds ~2x the requests (each needs prompt + max_tokens of blocks).
    need = 640
    fits = {}
    for name in ("bf16", "int8"):
        bm = BlockManager(blocks[name], 16)
        n = 0
        while bm.can_allocate(need):
            bm.allocate(f"r{n}", need)
            n += 1
        fits[name] = n
        for i in range(n):
            bm.free(f"r{i}")
        bm.assert_empty()
    assert fits["int8"] >= 1.85 * fits["bf16"], fits

    layout = KVLayout(2, 5, 4, 2, 8, "float32", "int8")
    pool = KVPool.allocate(layout)
    assert pool.tensor.dtype == torch.int8 and pool.scales.shape == (2, 2, 5, 4, 2)
    assert pool.buffer.numel() == layout.nbytes == 2 * 2 * 5 * layout.block_bytes
    k, v = torch.randn(7, 2, 8), torch.randn(7, 2, 8)
    slots = torch.tensor([4, 5, 6, 7, 16, 17, 0])  # block 1 whole, then block 4
    pool.write_tokens(1, slots, k, v)
    qk, sk = quantize_kv(k)
    assert torch.equal(pool.read_blocks(1, torch.tensor([1]))[0][0], qk[:4])
    assert torch.equal(pool.read_block_scales(1, torch.tensor([1]))[0][0], sk[:4])
    assert pool.tensor[0].count_nonzero() == 0 and pool.scales[0].count_nonzero() == 0
    with pytest.raises(ValueError, match="kv_cache_dtype int8"):
        pool.write_stored(0, slots, k, v)  # float rows into an int8 pool
    assert layout.compatible_with(KVLayout(2, 9, 4, 2, 8, "float32", "auto")) == "kv_cache_dtype: int8 != auto"


def _int8_case(b=5, h=8, kvh=2, d=32, bs=8, nb=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    kf = torch.randn(nb, bs, kvh, d, generator=g)
    vf = torch.randn(nb, bs, kvh, d, generator=g)
    (kq, ks), (vq, vs) = quantize_kv(kf), quantize_kv(vf)
    lens = torch.tensor([1, 7, 8, 9, 61][:b])
    mb = int(-(-lens.max() // bs))
    tables = torch.randperm(nb, generator=g)[: b * mb].view(b, mb)
    q = torch.randn(b, h, d, generator=g)
    return q, (kf, vf), (kq, vq, ks, vs), tables, lens, d ** -0.5


def _float_pool_bound(q: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, vf: torch.Tensor, scale: float) -> float:
    """|o_int8 - o_float| <= max s_v / 2 + (exp(2 delta) - 1) * max|v|, where delta bounds each score's error:
    scale * sum_d |q_d| * max s_k / 2 (softmax weights then move by at most a factor exp(+-2 delta))."""
    delta = scale * float(q.abs().sum(-1).max()) * float(ks.max()) / 2
    return float(vs.max()) / 2 + math.expm1(2 * delta) * float(vf.abs().max())


@pytest.mark.parametrize("backend_name", ["torch", "cpu"])
def test_decode_over_an_int8_pool(backend_name):
    backend = get_backend(backend_name, "cpu")
    assert backend.name == backend_name, "the native CPU kernel did not build (needs a C++ compiler)"
    q, (kf, vf), (kq, vq, ks, vs), tables, lens, scale = _int8_case()
    out = backend.paged_decode(q, kq, vq, tables, lens, scale, ks, vs)
    ref = torch_paged_decode(q, dequantize_kv(kq, ks), dequantize_kv(vq, vs), tables, lens, scale)
    assert (out - ref).abs().max().item() < 1e-5  # the same int8 pool, read directly vs dequantized
    exact = torch_paged_decode(q, kf, vf, tables, lens, scale)
    err = (out - exact).abs().max().item()
    assert 0 < err <= _float_pool_bound(q, ks, vs, vf, scale)


def test_cpu_extend_of_short_chunks_over_an_int8_pool():
    backend = get_backend("cpu", "cpu")
    q0, _, (kq, vq, ks, vs), _, _, scale = _int8_case()
    g = torch.Generator().manual_seed(3)
    q_lens, prefix = [3, 1, 4], [0, 9, 20]
    tables = torch.randperm(kq.shape[0], generator=g)[:12].view(3, 4)
    bs = kq.shape[1]
    rows = [(i, p + j) for i, (p, n) in enumerate(zip(prefix, q_lens)) for j in range(n)]
    k = torch.stack([dequantize_kv(kq, ks)[tables[i, pos // bs], pos % bs] for i, pos in rows])
    v = torch.stack([dequantize_kv(vq, vs)[tables[i, pos // bs], pos % bs] for i, pos in rows])
    q = torch.randn(sum(q_lens), q0.shape[1], q0.shape[2], generator=g)
    batch = VarlenBatch.build(q_lens, prefix, tables)
    out = backend.paged_extend(q, k, v, batch, kq, vq, scale, ks, vs)
    ref = TorchBackend().varlen_prefill(q, k, v, batch, kq, vq, scale, ks, vs)
    assert (out - ref).abs().max().item() < 1e-5


def test_torch_store_quantizes_and_skips_padding():
    kc, vc = torch.zeros(4, 4, 2, 8, dtype=torch.int8), torch.zeros(4, 4, 2, 8, dtype=torch.int8)
    ks, vs = torch.zeros(4, 4, 2), torch.zeros(4, 4, 2)
    k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    TorchBackend().store_kv(kc, vc, torch.tensor([5, -1, 15]), k, v, ks, vs)
    (qk, sk), (qv, sv) = quantize_kv(k), quantize_kv(v)
    assert torch.equal(kc.view(16, 2, 8)[[5, 15]], qk[[0, 2]]) and torch.equal(ks.view(16, 2)[[5, 15]], sk[[0, 2]])
    assert torch.equal(vc.view(16, 2, 8)[[5, 15]], qv[[0, 2]]) and torch.equal(vs.view(16, 2)[[5, 15]], sv[[0, 2]])
    assert int(ks.count_nonzero()) == 4  # two tokens x two heads; the padding row wrote nothing


# ---- Triton (CUDA; on a CPU under TRITON_INTERPRET=1, set in conftest) ---------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_store_quantizes_bit_exactly_like_the_reference(dtype):
    pytest.importorskip("triton", reason="Triton is not installed on this platform")
    from engine.kernels.triton_ops import store_kv

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(1)
    nb, bs, kvh, d = 6, 4, 3, 16
    qkv = torch.randn(6, 5 * kvh * d, generator=g).to(dtype).to(dev)  # k, v as strided views
    k, v = qkv[:, 3 * kvh * d: 4 * kvh * d].view(6, kvh, d), qkv[:, 4 * kvh * d:].view(6, kvh, d)
    k[2, 1] = 0  # a zero row
    slots = torch.tensor([5, 0, 23, -1, 12, 13], device=dev)
    got = [torch.zeros(nb, bs, kvh, d, dtype=torch.int8, device=dev) for _ in range(2)] + \
          [torch.zeros(nb, bs, kvh, device=dev) for _ in range(2)]
    want = [t.clone() for t in got]
    store_kv(got[0], got[1], slots, k, v, got[2], got[3])
    TorchBackend().store_kv(want[0], want[1], slots, k, v, want[2], want[3])
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("splits", [1, 4])
def test_triton_decode_over_an_int8_pool(splits):
    pytest.importorskip("triton", reason="Triton is not installed on this platform")
    from engine.kernels.triton_attention import paged_decode

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, (kf, vf), (kq, vq, ks, vs), tables, lens, scale = _int8_case()
    to = [t.to(dev) for t in (q, kq, vq, tables.int(), lens.int(), ks, vs)]
    out = paged_decode(*to[:5], scale, num_splits=splits, k_scale=to[5], v_scale=to[6]).cpu()
    ref = torch_paged_decode(q, dequantize_kv(kq, ks), dequantize_kv(vq, vs), tables, lens, scale)
    assert (out - ref).abs().max().item() < 2e-5
    exact = torch_paged_decode(q, kf, vf, tables, lens, scale)
    assert (out - exact).abs().max().item() <= _float_pool_bound(q, ks, vs, vf, scale)


def test_triton_extend_over_an_int8_prefix():
    pytest.importorskip("triton", reason="Triton is not installed on this platform")
    from engine.kernels.triton_attention import extend_attention

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    _, _, (kq, vq, ks, vs), _, _, scale = _int8_case()
    g = torch.Generator().manual_seed(5)
    q_lens, prefix = [1, 17, 5], [8, 0, 21]
    tables = torch.randperm(kq.shape[0], generator=g)[:15].view(3, 5).int()
    t = sum(q_lens)
    q, k, v = (torch.randn(t, n, 32, generator=g) for n in (8, 2, 2))
    batch = VarlenBatch.build(q_lens, prefix, tables, dev)
    out = extend_attention(q.to(dev), k.to(dev), v.to(dev), batch.cu_q, batch.max_q_len, batch.prefix_lens,
                           kq.to(dev), vq.to(dev), batch.block_tables, scale, ks.to(dev), vs.to(dev)).cpu()
    ref = TorchBackend().varlen_prefill(q, k, v, VarlenBatch.build(q_lens, prefix, tables), kq, vq, scale, ks, vs)
    assert (out - ref).abs().max().item() < 2e-5


# ---- a whole (tiny, random-weight) model ------------------------------------------------------------------

def _run(runner, pool, prompts, tables):
    from engine.runner import pool_writer, token_slots

    bs = pool.layout.block_size
    first = runner.prefill(prompts, pool_writer(pool, [token_slots(t, len(p), bs) for t, p in zip(tables, prompts)]))
    ext = runner.extend(pool, [[8, 8], [7, 2, 1]], [len(p) for p in prompts], tables, all_logits=True)
    dev = runner.device
    bt = torch.tensor([tables[0], tables[1] + [0]], device=dev)
    dec = runner.decode(pool, torch.tensor([2, 9], device=dev), torch.tensor([9, 6], device=dev), bt)
    return first, ext, dec


def test_tiny_model_logits_with_int8_kv(tiny_models):
    """Prefill (its own K/V in float), extend and decode (over the int8 pool) on each CPU backend: the same
    logits from every backend, and within a bound of the float pool's. The bound: each cached K/V value
    moves by at most 1/254 of its row's max; the logits of this random tiny model (spread ~1) may move by at
    most 20x that step, 0.08 absolute, and must move (the pool really is int8)."""
    from engine.config import EngineConfig
    from engine.runner import ModelRunner

    prompts, tables = [[3, 1, 4, 1, 5, 9, 2], [6, 5, 3]], [[9, 2, 7, 4], [0, 11, 5]]
    got = {}
    for kv in ("auto", "int8"):
        for backend in ("torch", "cpu"):
            runner = ModelRunner(EngineConfig(model=str(tiny_models["llama"]), dtype="float32", device="cpu",
                                              block_size=4, attention_backend=backend, kv_cache_dtype=kv))
            pool = KVPool.allocate(runner.kv_layout(num_blocks=16))
            assert pool.tensor.dtype == (torch.int8 if kv == "int8" else torch.float32)
            got[kv, backend] = _run(runner, pool, prompts, tables)
    for a, b in zip(got["int8", "torch"], got["int8", "cpu"]):
        assert (a - b).abs().max().item() < 1e-4
    for a, b in zip(got["auto", "torch"], got["int8", "torch"]):
        err = (a - b).abs().max().item()
        assert err <= 20 / 254, err
    assert (got["auto", "torch"][2] - got["int8", "torch"][2]).abs().max().item() > 0


def test_tiny_model_on_triton_with_int8_kv_matches_torch(tiny_models):
    pytest.importorskip("triton", reason="Triton is not installed on this platform")
    from engine.config import EngineConfig
    from engine.runner import ModelRunner

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("no GPU and Triton's interpreter is off")
    prompts, tables = [[3, 1, 4, 1, 5, 9, 2], [6, 5, 3]], [[9, 2, 7, 4], [0, 11, 5]]
    got = {}
    for backend in ("torch", "triton"):
        runner = ModelRunner(EngineConfig(model=str(tiny_models["qwen3"]), dtype="float32", device=dev,
                                          block_size=4, attention_backend=backend, kv_cache_dtype="int8"))
        pool = KVPool.allocate(runner.kv_layout(num_blocks=16), dev)
        got[backend] = [t.cpu() for t in _run(runner, pool, prompts, tables)]
    for a, b in zip(got["torch"], got["triton"]):
        assert (a - b).abs().max().item() < 1e-4


def test_bench_quant_kv_setting(tiny_models, tmp_path):
    """`pdserve bench quant`'s +kvint8 rows: the config, KV bytes per token, and perplexity through the pool
    (with a float pool it equals the prefill path's; with int8 it moves, a little)."""
    from engine.config import EngineConfig
    from engine.runner import ModelRunner
    from pdserve.bench.quant import base_setting, paged_perplexity, perplexity, setting_config

    engine = EngineConfig(model=str(tiny_models["llama"]), cache_dir=str(tmp_path))
    assert setting_config(engine, "int4+lmhead+kvint8").kv_cache_dtype == "int8"
    assert setting_config(engine, "bfloat16").kv_cache_dtype == "auto"
    assert base_setting("int4+kvint8+lmhead") == "int4+lmhead"
    with pytest.raises(ValueError, match="suffixes"):
        setting_config(engine, "bfloat16+kv4")
    ids = torch.randint(0, 256, (70,), generator=torch.Generator().manual_seed(0)).tolist()
    fp32 = ModelRunner(setting_config(engine, "float32"))
    kv8 = ModelRunner(setting_config(engine, "float32+kvint8"))
    assert fp32.kv_layout(1).bytes_per_token == 2 * 2 * 2 * 16 * 4  # layers x K/V x heads x D x fp32
    assert kv8.kv_layout(1).bytes_per_token == 2 * 2 * 2 * (16 + 4)
    exact = perplexity(fp32, ids, 32)
    assert paged_perplexity(fp32, ids, 32) == pytest.approx(exact, rel=1e-5)
    quantized = paged_perplexity(kv8, ids, 32)
    assert quantized == pytest.approx(exact, rel=0.02) and quantized != exact


@pytest.mark.parametrize("spec", ["ngram", "layers:1"])
def test_speculative_greedy_equals_plain_decoding_over_an_int8_pool(tiny_models, spec):
    """Verification attends to the drafts' K/V as stored (int8), as the plain decode steps do."""
    from engine.config import EngineConfig, SamplingParams
    from engine.runner import ModelRunner
    from pdserve.bench.specdec import generate

    runner = ModelRunner(EngineConfig(model=str(tiny_models["llama"]), dtype="float32", device="cpu", block_size=4,
                                      num_threads=1, kv_cache_dtype="int8"))
    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randint(0, 256, (n,), generator=gen).tolist() for n in (6, 19, 33))
    prompts = [a, b + b[:9] + b, c]
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (21, 40, 9)]
    plain = generate(runner, prompts, params)
    fast = generate(runner, prompts, params, spec, 3)
    assert fast.outputs == plain.outputs
    assert fast.spec_steps > 0 and sum(r["drafted"] for r in fast.per_request) > 0
