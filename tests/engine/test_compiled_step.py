"""The compiled CPU decode step (engine/compiled_step.py) and the fused kernels it shares with the eager path.

The fused kernels round where the torch reference rounds: RoPE, the residual add and the int8 KV store equal
it bit for bit, RMSNorm and SiLU differ by the summation order / exp only. The compiled step runs the same
kernels as the eager CPU forward, in the same order, so its logits and KV writes equal the eager step's bit
for bit, in float32 and bf16, for every architecture we run, with float and int8 KV pools.
"""

from __future__ import annotations

import logging

import pytest
import torch

from engine.attention import TorchBackend, torch_paged_decode
from engine.compiled_step import compile_decode_step
from engine.config import EngineConfig
from engine.kernels import cpu_kernels
from engine.kv_cache import KVPool
from engine.kv_window import NO_BLOCK, blocks_before_window
from engine.model.ops import Rotary, torch_rms_norm, torch_rope, torch_silu_mul
from engine.model.rope import rope_tables
from engine.runner import ModelRunner

BF16_ULP = 2.0 ** -7  # relative spacing of bf16 values (8 bits of mantissa)


@pytest.fixture(scope="module")
def native():
    module = cpu_kernels()
    assert module is not None, "the native CPU kernels did not build (needs a C++ compiler)"
    return module


def _qkv(dtype, t=7, h=9, kvh=3, d=64, seed=0):
    """q and k as views of one fused projection output, as the model hands them to RoPE."""
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(t, (h + 2 * kvh) * d, generator=g) * 3).to(dtype)
    q = qkv[:, : h * d].view(t, h, d)
    k = qkv[:, h * d: (h + kvh) * d].view(t, kvh, d)
    return q, k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_equals_the_torch_reference_bit_for_bit(native, tiny_models, dtype):
    from transformers import AutoConfig

    cos, sin = rope_tables(AutoConfig.from_pretrained(tiny_models["llama-tied-llama3rope"]), 512, dtype)
    q, k = _qkv(dtype, d=16, h=4, kvh=2)
    positions = torch.tensor([0, 5, 31, 32, 100, 300, 511])
    got = native.rope(q, k, cos, sin, positions)
    want = torch_rope(q, k, Rotary(cos, sin, positions))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-6), (torch.bfloat16, BF16_ULP)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_matches_the_reference(native, dtype, rtol, with_residual):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(33, 576, generator=g) * 4).to(dtype)
    residual = (torch.randn(33, 576, generator=g) * 4).to(dtype) if with_residual else None
    weight = (1 + torch.randn(576, generator=g) * 0.1).to(dtype)
    h, res = native.add_rms_norm(x, residual, weight, 1e-5)
    ref_h, ref_res = torch_rms_norm(x, weight, 1e-5, residual)
    assert torch.equal(res, ref_res)  # the residual add rounds exactly as torch's
    if not with_residual:
        assert res is x or torch.equal(res, x)
    # only the sum of squares is ordered differently: at most one rounding step apart
    torch.testing.assert_close(h.float(), ref_h.float(), rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-6), (torch.bfloat16, BF16_ULP)])
def test_silu_mul_matches_the_reference(native, dtype, rtol):
    g = torch.Generator().manual_seed(2)
    gate_up = (torch.randn(9, 2 * 1536, generator=g) * 6).to(dtype)
    gate_up[0, :8] = torch.tensor([-100.0, -88.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 100.0]).to(dtype)
    torch.testing.assert_close(native.silu_mul(gate_up).float(), torch_silu_mul(gate_up).float(), rtol=rtol,
                               atol=1e-6)


def test_exp_is_accurate_to_a_few_ulp(native):
    x = torch.linspace(-87, 88, 200_001)
    got = native.exp(x).double()
    want = torch.exp(x.double())
    assert ((got - want).abs() / want).max().item() < 3e-7  # float32 ulp is 1.2e-7 relative


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.int8])
def test_store_kv_equals_the_backend_store(native, kv_dtype):
    """Slots < 0 (padding rows) write nothing; an int8 pool gets engine/kv_quant's codes and scales exactly."""
    nb, bs, kvh, d = 8, 4, 3, 64
    g = torch.Generator().manual_seed(3)
    k, v = _qkv(torch.bfloat16, t=6, h=3, kvh=kvh, d=d, seed=3)
    slots = torch.tensor([0, 5, -1, 17, 31, 12])
    caches = [torch.zeros(nb, bs, kvh, d, dtype=kv_dtype) for _ in range(4)]
    scales = [torch.zeros(nb, bs, kvh) for _ in range(4)] if kv_dtype == torch.int8 else [None] * 4
    if kv_dtype != torch.int8:
        for c in caches:
            c.copy_(torch.randn(c.shape, generator=g).to(kv_dtype))
        caches[2].copy_(caches[0]), caches[3].copy_(caches[1])
    TorchBackend().store_kv(caches[0], caches[1], slots, k, v, scales[0], scales[1])
    native.store_kv(caches[2], caches[3], slots, k, v, scales[2], scales[3])
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    if kv_dtype == torch.int8:
        assert torch.equal(scales[0], scales[2]) and torch.equal(scales[1], scales[3])


@pytest.mark.parametrize("h,kvh,d", [(9, 3, 64), (12, 2, 80), (10, 2, 32), (4, 4, 128)])
def test_attention_over_long_contexts_and_any_thread_count(h, kvh, d):
    """Contexts past one 512-token work item (merged chunks), head dims that are not a multiple of 16, query
    groups of 1-6 heads: the reference's values, and the same bits whatever the thread count."""
    attention = cpu_kernels()
    assert attention is not None
    g = torch.Generator().manual_seed(4)
    bs, nb = 16, 420
    lens = torch.tensor([1, 511, 512, 513, 1300])
    mb = int((lens.max() + bs - 1) // bs)
    tables = torch.randperm(nb, generator=g)[: len(lens) * mb].view(len(lens), mb)
    q = torch.randn(len(lens), h, d, generator=g)
    kp, vp = torch.randn(nb, bs, kvh, d, generator=g), torch.randn(nb, bs, kvh, d, generator=g)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(attention.paged_decode_attention(q, kp, vp, tables, lens, d ** -0.5))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])
    ref = torch_paged_decode(q, kp, vp, tables, lens, d ** -0.5)
    assert (outs[0] - ref).abs().max().item() < 1e-5


def _random_pool(runner, num_blocks: int, seed: int) -> KVPool:
    pool = KVPool.allocate(runner.kv_layout(num_blocks=num_blocks))
    g = torch.Generator().manual_seed(seed)
    if pool.scales is not None:
        pool.tensor.copy_(torch.randint(-127, 128, pool.tensor.shape, generator=g).to(torch.int8))
        pool.scales.copy_(torch.rand(pool.scales.shape, generator=g) * 0.05)
    else:
        pool.tensor.copy_(torch.randn(pool.tensor.shape, generator=g).to(pool.tensor.dtype))
    return pool


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "llama-tied-llama3rope"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_compiled_step_equals_the_eager_step_bit_for_bit(tiny_models, arch, dtype, kv_cache_dtype):
    runner = ModelRunner(EngineConfig(model=str(tiny_models[arch]), dtype=dtype, device="cpu",
                                      kv_cache_dtype=kv_cache_dtype, block_size=8))
    step = compile_decode_step(runner)
    assert step is not None
    for batch in (1, 3, 8):
        eager_pool = _random_pool(runner, 80, seed=batch)
        compiled_pool = KVPool(eager_pool.layout, eager_pool.buffer.clone())
        g = torch.Generator().manual_seed(batch)
        tables = torch.randperm(80, generator=g)[: batch * 9].view(batch, 9).to(torch.int32)
        positions = torch.randint(0, 72, (batch,), generator=g)
        tokens = torch.randint(0, runner.arch.vocab_size, (batch,), generator=g)
        eager = runner.decode(eager_pool, tokens, positions, tables)
        compiled = step.run(compiled_pool, tokens, positions, tables)
        assert torch.equal(compiled, eager), f"batch {batch}: logits differ"
        assert torch.equal(compiled_pool.buffer, eager_pool.buffer), f"batch {batch}: KV writes differ"


@pytest.mark.parametrize("arch", ["mistral-sw", "qwen2-sw", "qwen2-sw-all", "phi3-longrope"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compiled_step_runs_windows_exactly(tiny_models, arch, dtype):
    """Sliding windows (window 16, contexts to 72): each layer's window, per layer where they differ (qwen2-sw:
    layer 0 global). Where every layer is windowed, the blocks before the window are -1 in the tables and NaN in
    the pool: read, they would poison the logits. Logits and KV writes equal the eager step's bit for bit."""
    runner = ModelRunner(EngineConfig(model=str(tiny_models[arch]), dtype=dtype, device="cpu", block_size=8))
    step = compile_decode_step(runner)
    assert step is not None
    window = runner.kv_layout().kv_window
    assert (window is not None) == (arch in ("mistral-sw", "qwen2-sw-all")), window
    for batch in (1, 4):
        eager_pool = _random_pool(runner, 80, seed=batch)
        g = torch.Generator().manual_seed(10 + batch)
        tables = torch.randperm(80, generator=g)[: batch * 9].view(batch, 9).to(torch.int32)
        positions = torch.tensor([71, 40, 15, 17][:batch])
        for row, p in enumerate(positions.tolist()):
            dead = blocks_before_window(p, window, 8)
            eager_pool.tensor[:, :, tables[row, :dead].long()] = float("nan")
            tables[row, :dead] = NO_BLOCK
        compiled_pool = KVPool(eager_pool.layout, eager_pool.buffer.clone())
        tokens = torch.randint(0, runner.arch.vocab_size, (batch,), generator=g)
        eager = runner.decode(eager_pool, tokens, positions, tables)
        compiled = step.run(compiled_pool, tokens, positions, tables)
        assert not compiled.isnan().any()
        assert torch.equal(compiled, eager), f"batch {batch}: logits differ"
        assert torch.equal(compiled_pool.buffer, eager_pool.buffer), f"batch {batch}: KV writes differ"


@pytest.mark.parametrize("arch,reason", [("gemma2", "gemma2: rms_unit_offset norms"),
                                         ("gemma3", "gemma3_text: rms_unit_offset norms"),
                                         ("phi3", "phi3: partial rotary (8 of 16 dims)")])
def test_families_it_cannot_run_exactly_are_refused_and_run_eagerly(tiny_models, caplog, arch, reason):
    """Gemma's (1 + w) norms, softcapped logits and GeGLU, Phi-3's partial rotary: refused at load with one log
    line naming the feature; the batcher then runs the eager step (its forward is tested against transformers
    in tests/engine/test_model_families.py)."""
    runner = ModelRunner(EngineConfig(model=str(tiny_models[arch]), dtype="float32", device="cpu"))
    assert runner.backend.name == "cpu"
    with caplog.at_level(logging.INFO, logger="pdserve.compiled_step"):
        assert runner.compiled_step is None
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and messages[0].startswith(f"decode step runs eagerly: {reason}"), messages


def test_refusals_run_eagerly_and_say_why(tiny_models, caplog, monkeypatch):
    folder = str(tiny_models["llama"])
    cases = {
        "--enforce-eager": EngineConfig(model=folder, dtype="float32", device="cpu", enforce_eager=True),
        "attention backend 'torch'": EngineConfig(model=folder, dtype="float32", device="cpu",
                                                  attention_backend="torch"),
        "--quantization int8": EngineConfig(model=folder, dtype="float32", device="cpu", quantization="int8"),
    }
    for reason, config in cases.items():
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="pdserve.compiled_step"):
            assert compile_decode_step(ModelRunner(config)) is None
        messages = [r.getMessage() for r in caplog.records]
        assert len(messages) == 1 and messages[0].startswith(f"decode step runs eagerly: {reason}"), messages
    import engine.kernels

    monkeypatch.setattr(engine.kernels, "cpu_kernels", lambda: None)  # as on a machine without a compiler
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pdserve.compiled_step"):
        assert compile_decode_step(ModelRunner(EngineConfig(model=folder, dtype="float32", device="cpu"))) is None
    assert "cannot be built here" in caplog.text


def test_op_profile_counts_steps_and_sums_each_op(tiny_models):
    """Profiling on: each op's wall and thread-CPU seconds summed over the steps (their sum within the steps'
    own time); off: nothing more is counted; on again: from zero."""
    import time

    runner = ModelRunner(EngineConfig(model=str(tiny_models["llama"]), dtype="float32", device="cpu", block_size=8,
                                      num_threads=1))
    step = runner.compiled_step
    pool = _random_pool(runner, 40, seed=3)
    tables = torch.arange(40).view(4, 10).to(torch.int32)
    tokens, positions = torch.tensor([1, 2, 3, 4]), torch.tensor([5, 30, 60, 79])
    step.set_profiling(True)
    started = time.thread_time()
    for _ in range(3):
        step.run(pool, tokens, positions, tables)
    elapsed = time.thread_time() - started
    steps, times = step.op_times()
    assert steps == 3 and set(times) >= {"embed", "rms_norm", "qkv_proj", "attention", "lm_head", "down_proj"}
    assert all(wall >= 0 and cpu >= 0 for wall, cpu in times.values()) and times["attention"][0] > 0
    assert sum(cpu for _, cpu in times.values()) <= elapsed + 1e-3
    step.set_profiling(False)
    step.run(pool, tokens, positions, tables)
    assert step.op_times()[0] == 0  # reset when switched, nothing counted while off


def test_start_up_log_reports_the_kernel_cache_and_packing(tiny_models, caplog):
    with caplog.at_level(logging.INFO, logger="pdserve.compiled_step"):
        step = compile_decode_step(ModelRunner(EngineConfig(model=str(tiny_models["llama"]), dtype="bfloat16",
                                                            device="cpu")))
    assert step is not None and step.report.kernel_cached  # built by the fixtures above: a warm start
    assert "compiled decode step (native C++, bfloat16" in caplog.text and "cache hit" in caplog.text
