"""The generic path (transformers' modules over pdserve's paged KV cache) and the refusals, in fp32 against
transformers: GPT-2 and OPT (learned absolute positions, multi-head), GPT-NeoX (partial rotary, parallel
residual), Granite (RoPE, scaled embeddings / residuals / attention / logits) — none has a native path."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from engine.attention import PrefillAttention
from engine.config import EngineConfig, ModelImpl, UnsupportedArchitecture
from engine.families import read_arch
from engine.kv_cache import KVPool
from engine.loader import load_hf_config
from engine.model.generic import GenericCausalLM
from engine.runner import ModelRunner, pool_writer, token_slots
from tests.conftest import WINDOW
from tests.model_paths import (  # noqa: F401 (fixtures)
    GENERIC_NAMES,
    greedy_through_engine,
    hf_greedy,
    tiny_generic_models,
)

TOL = 1e-4


def _hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()


def _runner(folder, **kw) -> ModelRunner:
    return ModelRunner(EngineConfig(model=str(folder), dtype="float32", device="cpu", **kw))


@pytest.mark.parametrize("name", GENERIC_NAMES)
def test_generic_path_is_taken_and_logged(tiny_generic_models, name, caplog):  # noqa: F811
    with caplog.at_level(logging.INFO, logger="pdserve.runner"):
        runner = _runner(tiny_generic_models[name])
    assert isinstance(runner.model, GenericCausalLM) and runner.arch.impl is ModelImpl.TRANSFORMERS
    assert "generic (transformers modules) path" in caplog.text
    hf_cfg = load_hf_config(tiny_generic_models[name])
    assert runner.arch.num_layers == hf_cfg.num_hidden_layers
    kv_heads = getattr(hf_cfg, "num_key_value_heads", None) or hf_cfg.num_attention_heads
    assert runner.arch.num_kv_heads == kv_heads and runner.arch.head_dim == 16


@pytest.mark.parametrize("name", GENERIC_NAMES)
def test_packed_prefill_logits_match_transformers(tiny_generic_models, name):  # noqa: F811
    folder = tiny_generic_models[name]
    runner, hf = _runner(folder), _hf(folder)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 61, 23)]
    lens = [len(p) for p in prompts]
    ours = runner.model(torch.tensor(sum(prompts, [])), torch.cat([torch.arange(n) for n in lens]),
                        PrefillAttention(lens))
    start = 0
    for p in prompts:
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0]
        diff = (ours[start:start + len(p)] - ref).abs().max().item()
        assert diff < TOL, f"{name}: max |logit diff| {diff:.2e} for a {len(p)}-token sequence"
        start += len(p)


@pytest.mark.parametrize("name", GENERIC_NAMES)
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_paged_decode_and_extend_logits_match_transformers(tiny_generic_models, name, backend):  # noqa: F811
    folder = tiny_generic_models[name]
    runner, hf = _runner(folder, block_size=4, attention_backend=backend), _hf(folder)
    layout = runner.kv_layout(num_blocks=64)
    pool = KVPool.allocate(layout)
    gen = torch.Generator().manual_seed(2)
    full = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (22, 45)]
    prefix_lens, steps = [8, 29], 6
    tables = [list(range(0, 6)), list(range(20, 32))]
    prefixes = [s[:n] for s, n in zip(full, prefix_lens)]
    runner.prefill(prefixes, pool_writer(pool, [token_slots(t, len(p), 4) for t, p in zip(tables, prefixes)]))
    with torch.no_grad():
        refs = [hf(torch.tensor([s])).logits[0] for s in full]
    ends = [len(s) - steps for s in full]
    logits = runner.extend(pool, [s[n:e] for s, n, e in zip(full, prefix_lens, ends)], prefix_lens, tables,
                           all_logits=True)
    row = 0
    for ref, n, e in zip(refs, prefix_lens, ends):
        assert (logits[row:row + e - n] - ref[n:e]).abs().max().item() < TOL, f"{name}: extend"
        row += e - n
    bt = torch.tensor([t + [0] * (12 - len(t)) for t in tables])
    for step in range(steps):
        pos = torch.tensor([e + step for e in ends])
        out = runner.decode(pool, torch.tensor([s[int(p)] for s, p in zip(full, pos)]), pos, bt)
        for i, ref in enumerate(refs):
            diff = (out[i] - ref[int(pos[i])]).abs().max().item()
            assert diff < TOL, f"{name} decode step {step} seq {i}: max |logit diff| {diff:.2e}"


@pytest.mark.parametrize("name", GENERIC_NAMES)
@pytest.mark.parametrize("cached", [0, 12])
def test_greedy_equals_transformers_generate(tiny_generic_models, name, cached):  # noqa: F811
    folder = tiny_generic_models[name]
    runner, hf = _runner(folder, block_size=8), _hf(folder)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (13, 30, 21)]
    for p, o in zip(prompts, greedy_through_engine(runner, prompts, 16, cached)):
        ref = hf_greedy(hf, p, 16)
        assert o[:len(ref)] == ref, f"{name}: pdserve {o} != transformers {ref}"


def test_model_impl_transformers_runs_a_native_architecture_the_same(tiny_models):
    """--model-impl transformers on a Llama: the generic path, the native path's greedy tokens."""
    folder = tiny_models["qwen3"]
    native, generic = _runner(folder, block_size=8), _runner(folder, block_size=8, model_impl="transformers")
    assert native.arch.impl is ModelImpl.NATIVE and isinstance(generic.model, GenericCausalLM)
    assert (native.arch.num_kv_heads, native.arch.head_dim) == (generic.arch.num_kv_heads, generic.arch.head_dim)
    prompts = [list(range(5, 30)), list(range(40, 51))]
    assert greedy_through_engine(native, prompts, 12, 8) == greedy_through_engine(generic, prompts, 12, 8)


@pytest.mark.parametrize("cached", [0, 12])
def test_generic_path_attends_within_the_modules_sliding_window(tiny_models, cached):
    """Mistral's modules pass sliding_window to the attention function: the generic path attends within it
    (its layer spec), equal to transformers past the window, and the load-time self-check ran a prompt
    longer than it."""
    folder = tiny_models["mistral-sw"]
    runner, hf = _runner(folder, block_size=8, model_impl="transformers"), _hf(folder)
    assert isinstance(runner.model, GenericCausalLM) and runner.model.bridge.narrowest_window == WINDOW
    gen = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (13, 30, 21)]
    for p, o in zip(prompts, greedy_through_engine(runner, prompts, 16, cached)):
        ref = hf_greedy(hf, p, 16)
        assert o[:len(ref)] == ref, f"pdserve {o} != transformers {ref}"


def _config_only(folder, config) -> str:
    """A folder with a config.json and no weights: a refusal must come before any weight is read."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    return str(folder)


def _refused_configs():
    from transformers import FalconConfig, MambaConfig, RwkvConfig, T5Config

    return {
        "mamba": (MambaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2), "state-space"),
        "rwkv": (RwkvConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2), "recurrent"),
        "t5": (T5Config(vocab_size=256, d_model=64, num_layers=2), "encoder-decoder"),
        "falcon": (FalconConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
                   "no pluggable attention"),
    }


@pytest.mark.parametrize("name", ["mamba", "rwkv", "t5", "falcon"])
def test_models_whose_state_is_not_a_kv_cache_are_refused_at_start(tmp_path, name):
    config, why = _refused_configs()[name]
    folder = _config_only(tmp_path / name, config)
    with pytest.raises(UnsupportedArchitecture, match=f"architecture '{config.model_type}'.*{why}"):
        read_arch(load_hf_config(tmp_path / name))  # the driver's check, before any worker starts
    with pytest.raises(UnsupportedArchitecture, match=why):
        _runner(folder)  # a worker's load: refused before its weights (there are none) are looked for


def test_refusals_found_only_by_running_the_modules_name_the_reason(tmp_path):
    """Gemma 2 soft-caps its attention logits: forced onto the generic path (natively it runs), the probe
    forward sees it and refuses at load."""
    from transformers import Gemma2Config

    from tests.model_paths import save_tiny

    folder = save_tiny(tmp_path / "gemma2", Gemma2Config(vocab_size=256, hidden_size=64, intermediate_size=128,
                                                         num_hidden_layers=2, num_attention_heads=4,
                                                         num_key_value_heads=2, head_dim=16,
                                                         max_position_embeddings=64, sliding_window=128))
    with pytest.raises(UnsupportedArchitecture, match="soft-caps attention logits"):
        _runner(folder, model_impl="transformers")
    assert _runner(folder).arch.attn_softcap == 50.0  # auto: the native path, which soft-caps


def test_native_only_and_quantized_generic_are_refused_clearly(tiny_generic_models, tmp_path):  # noqa: F811
    folder = tiny_generic_models["gpt2"]
    with pytest.raises(UnsupportedArchitecture, match="has no native path"):
        _runner(folder, model_impl="native")
    with pytest.raises(UnsupportedArchitecture, match="native path only"):
        _runner(folder, quantization="int8", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="--model-impl"):
        EngineConfig(model_impl="vllm")


def test_workers_refuse_before_allocating_anything(tmp_path):
    """A prefill or decode worker given a refused model raises in its constructor: no pool, no endpoint."""
    from decode_worker.worker import DecodeWorker
    from prefill_worker.worker import PrefillWorker
    from proto.messages import WorkerConfig

    config, _ = _refused_configs()["mamba"]
    engine = EngineConfig(model=_config_only(tmp_path / "mamba", config), dtype="float32", device="cpu")
    for cls in (PrefillWorker, DecodeWorker):
        with pytest.raises(UnsupportedArchitecture, match="mamba"):
            cls(WorkerConfig(engine=engine, worker_id="w0", auth_token="t", transport="shm"))


def test_the_driver_refuses_before_starting_workers(tmp_path):
    """run-batch / serve read the model's limits first (pdserve.openai.limits.model_limits): a refused
    architecture stops there, before a Ray cluster or any worker exists."""
    from pdserve.openai.limits import model_limits

    config, _ = _refused_configs()["t5"]
    engine = EngineConfig(model=_config_only(tmp_path / "t5", config), dtype="float32", device="cpu")
    with pytest.raises(UnsupportedArchitecture, match="encoder-decoder"):
        model_limits(engine, 16, False)
