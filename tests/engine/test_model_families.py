"""Issue 26's dense families through the engine directly, against transformers in fp32.

Tiny random-weight Mistral (sliding window), Qwen2 (sliding layers), Gemma 2, Gemma 3 and Phi-3 models
(tests/conftest.py, window 16/24 tokens) with prompts longer than the window: packed prefill logits,
then greedy tokens equal to transformers' `generate` through prefill + paged decode, and through a
prefill of a cached prefix + extend + paged decode, on the torch, native CPU and Triton backends.
Where every layer is windowed, the blocks a decode step no longer reads are freed as it moves on
(their table entries -1, the blocks poisoned with NaN): the tokens must not change.
"""

from __future__ import annotations

import pytest
import torch

from engine.attention import PrefillAttention
from engine.config import EngineConfig, UnsupportedArchitecture
from engine.families import read_arch
from engine.kv_cache import KVPool
from engine.kv_window import NO_BLOCK, blocks_before_window
from engine.runner import ModelRunner, pool_writer, token_slots
from tests.conftest import WINDOW

FAMILIES = ["mistral-sw", "qwen2-sw", "qwen2-sw-all", "gemma2", "gemma3", "phi3", "phi3-longrope"]
PROMPT_LENS = (7, 19, 40, 70)  # around and well past the windows (16; phi3: 24)
NEW_TOKENS = 24


def _hf(folder):
    from transformers import AutoModelForCausalLM

    # eager: transformers' sdpa path refuses Gemma 2's attention softcap
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def _prompts(seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=gen).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def references(tiny_models) -> dict[str, list[list[int]]]:
    """transformers' greedy tokens for each family and prompt (attention_mask given: pad == eos here), EOS ignored
    (eos_token_id=-1, as our engine runs without stop checks here) so every sequence runs NEW_TOKENS long."""
    out = {}
    for name in FAMILIES:
        hf = _hf(tiny_models[name])
        out[name] = []
        for p in _prompts():
            ids = torch.tensor([p])
            gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                              eos_token_id=-1)
            out[name].append(gen[0, len(p):].tolist())
    return out


def engine_greedy(runner: ModelRunner, prompts: list[list[int]], n: int, cached: int = 0,
                  free_behind: bool = False) -> list[list[int]]:
    """Greedy tokens through our pool: prefill (or prefill the first `cached` tokens, then extend the rest over
    them), then paged decode. `free_behind`: blocks before every layer's window become -1 and NaN as it goes."""
    bs = runner.config.block_size
    layout = runner.kv_layout(num_blocks=sum(layout_blocks(len(p) + n, bs) for p in prompts) + 1)
    pool = KVPool.allocate(layout)
    perm = torch.randperm(layout.num_blocks, generator=torch.Generator().manual_seed(5)).tolist()  # scattered
    tables, start = [], 0
    for p in prompts:
        tables.append(perm[start:start + layout_blocks(len(p) + n, bs)])
        start += len(tables[-1])
    if cached:
        heads = [p[:min(cached, len(p) - 1)] for p in prompts]
        runner.prefill(heads, pool_writer(pool, [token_slots(t, len(h), bs) for t, h in zip(tables, heads)]))
        logits = runner.extend(pool, [p[len(h):] for p, h in zip(prompts, heads)], [len(h) for h in heads], tables)
    else:
        slots = [token_slots(t, len(p), bs) for t, p in zip(tables, prompts)]
        logits = runner.prefill(prompts, pool_writer(pool, slots))
    out = [[int(t)] for t in logits.argmax(-1)]
    window = layout.kv_window
    for _ in range(n - 1):
        pos = [len(p) + len(o) - 1 for p, o in zip(prompts, out)]
        if free_behind:
            for table, at in zip(tables, pos):
                for b in range(blocks_before_window(at, window, bs)):
                    if table[b] != NO_BLOCK:
                        for layer in range(layout.num_layers):
                            pool.layer(layer)[:, table[b]] = float("nan")
                        table[b] = NO_BLOCK
        width = max(len(t) for t in tables)
        bt = torch.tensor([t + [0] * (width - len(t)) for t in tables])
        logits = runner.decode(pool, torch.tensor([o[-1] for o in out]), torch.tensor(pos), bt)
        for o, t in zip(out, logits.argmax(-1).tolist()):
            o.append(t)
    return out


def layout_blocks(tokens: int, bs: int) -> int:
    return -(-tokens // bs)


def _runner(folder, backend: str = "torch", block_size: int = 4) -> ModelRunner:
    return ModelRunner(EngineConfig(model=str(folder), dtype="float32", device="cpu", block_size=block_size,
                                    attention_backend=backend))


@pytest.mark.parametrize("name", FAMILIES)
def test_packed_prefill_logits_match_transformers(tiny_models, name):
    runner = _runner(tiny_models[name])
    hf = _hf(tiny_models[name])
    prompts = _prompts(1)
    lens = [len(p) for p in prompts]
    ours = runner.model(torch.tensor(sum(prompts, [])), torch.cat([torch.arange(n) for n in lens]),
                        PrefillAttention(lens))
    start = 0
    for p in prompts:
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0]
        assert (ours[start:start + len(p)] - ref).abs().max().item() < 1e-4, f"{name}, a {len(p)}-token prompt"
        start += len(p)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_equals_generate(tiny_models, references, name, backend):
    runner = _runner(tiny_models[name], backend)
    assert runner.attention_backend == backend
    assert engine_greedy(runner, _prompts(), NEW_TOKENS) == references[name]


@pytest.mark.parametrize("name", FAMILIES)
def test_extend_over_a_cached_prefix_equals_generate(tiny_models, references, name):
    """Prefix-cached prefill: the first 33 tokens come from the pool (past the window), the rest extend them."""
    runner = _runner(tiny_models[name], "cpu", block_size=8)
    assert engine_greedy(runner, _prompts(), NEW_TOKENS, cached=33) == references[name]


@pytest.mark.parametrize("name", ["mistral-sw", "qwen2-sw-all", "phi3"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_blocks_behind_the_window_are_never_read(tiny_models, references, name, backend):
    runner = _runner(tiny_models[name], backend)
    assert runner.kv_layout(1).kv_window is not None  # every layer windowed: blocks fall out as decoding goes
    assert engine_greedy(runner, _prompts(), NEW_TOKENS, free_behind=True) == references[name]


@pytest.mark.parametrize("name", ["mistral-sw", "gemma2", "gemma3"])
def test_triton_backend_greedy_equals_generate(tiny_models, references, name):
    """The Triton kernels (interpreted on a CPU) in the whole forward: windows, softcaps, sandwich norms."""
    pytest.importorskip("triton", reason="Triton is not installed on this platform")
    runner = _runner(tiny_models[name], "triton")
    n = 6  # the interpreter is slow; the first tokens already cross every window
    assert engine_greedy(runner, _prompts()[2:], n, cached=21) == [r[:n] for r in references[name][2:]]


def test_the_window_changes_the_answer(tiny_models, references, tmp_path):
    """Without its window the same Mistral weights answer differently: the parity above is not vacuous."""
    import json
    import shutil

    folder = tmp_path / "mistral-no-window"
    shutil.copytree(tiny_models["mistral-sw"], folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["sliding_window"] == WINDOW
    config["sliding_window"] = None
    (folder / "config.json").write_text(json.dumps(config))
    ours = engine_greedy(_runner(folder, "cpu"), _prompts(), NEW_TOKENS)
    ref = references["mistral-sw"]
    # Output j of the 7-token prompt comes from the query at position 6 + j: while that is below 16, the
    # window hides nothing and the two agree.
    assert ours[0][:10] == ref[0][:10]
    assert any(a != b for a, b in zip(ours, ref))


def _config(model_type: str, **fields):
    from engine.hf_config import HFConfig

    base = dict(model_type=model_type, vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=512,
                tie_word_embeddings=False, eos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    return HFConfig({**base, **fields})


def test_unsupported_architectures_are_refused_by_name():
    with pytest.raises(UnsupportedArchitecture, match=r"unsupported architecture 'gpt2'; native: llama, .*gemma2"):
        read_arch(_config("gpt2"))
    with pytest.raises(UnsupportedArchitecture, match="'mamba' .*not a KV cache"):
        read_arch(_config("mamba"))


def test_features_we_do_not_run_are_refused_by_name():
    dynamic = {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}
    with pytest.raises(ValueError, match="RoPE type 'dynamic'"):
        read_arch(_config("llama", rope_parameters=dynamic))
    longrope = {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                "original_max_position_embeddings": 128}
    with pytest.raises(ValueError, match="'longrope' switches from its short to its long factors once a sequence "
                                         "passes 128 positions"):
        read_arch(_config("phi3", rope_parameters=longrope))
    static = dict(longrope, original_max_position_embeddings=512)  # one factor set serves every position
    assert read_arch(_config("phi3", rope_parameters=static)).model_type == "phi3"
    with pytest.raises(ValueError, match="MLP activation 'relu'"):
        read_arch(_config("llama", hidden_act="relu"))
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        read_arch(_config("gemma3_text", use_bidirectional_attention=True, head_dim=16,
                                  query_pre_attn_scalar=16, sliding_window=8, hidden_activation="gelu_pytorch_tanh"))
    with pytest.raises(ValueError, match=r"layer types \['chunked_attention'\]"):
        read_arch(_config("qwen2", use_sliding_window=True, sliding_window=8,
                                  layer_types=["chunked_attention", "full_attention"]))


def test_gemma3_config_of_the_hub_layout(tiny_models, tmp_path):
    """Gemma 3 checkpoints on the Hub give `rope_theta` (global), `rope_local_base_freq` (local layers) and a
    `rope_scaling` for the global ones, and `sliding_window_pattern` instead of layer_types: same logits."""
    import json
    import shutil

    folder = tmp_path / "gemma3-hub"
    shutil.copytree(tiny_models["gemma3"], folder)
    config = json.loads((folder / "config.json").read_text())
    for key in ("rope_parameters", "layer_types"):
        config.pop(key, None)
    config.update(rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0},
                  sliding_window_pattern=2)  # layers: local, global, local
    (folder / "config.json").write_text(json.dumps(config))
    runner = _runner(folder)
    assert [s.sliding_window for s in runner.arch.layers] == [WINDOW, None, WINDOW]
    prompt = _prompts(2)[3]
    ours = runner.model(torch.tensor(prompt), torch.arange(len(prompt)), PrefillAttention([len(prompt)]))
    with torch.no_grad():
        ref = _hf(folder)(torch.tensor([prompt])).logits[0]
    assert (ours - ref).abs().max().item() < 1e-4
    assert runner.model.rope["sliding_attention"][0][5, 1] != runner.model.rope["full_attention"][0][5, 1]


def test_a_legacy_su_rope_that_switches_is_refused_with_its_remedy(tiny_models, tmp_path):
    """Phi-3-128k's config.json (rope_scaling type 'su', read as longrope by transformers): the long factors
    apply past 512 positions here, so it is refused, saying how to serve it with its short factors."""
    import json
    import shutil

    from transformers import AutoConfig

    folder = tmp_path / "phi3-su"
    shutil.copytree(tiny_models["phi3"], folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("rope_parameters", None)
    config.update(max_position_embeddings=2048, original_max_position_embeddings=512, rope_theta=10000.0,
                  rope_scaling={"type": "su", "short_factor": [1.0] * 8, "long_factor": [4.0] * 8})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'longrope' switches .* passes 512 positions .* set max_position_embeddings "
                                         "to 512"):
        read_arch(AutoConfig.from_pretrained(folder))
    config["max_position_embeddings"] = 512  # the remedy: one factor set for every position it allows
    (folder / "config.json").write_text(json.dumps(config))
    assert read_arch(AutoConfig.from_pretrained(folder)).max_position_embeddings == 512


def test_layer_specs_follow_transformers(tiny_models):
    """Which layers are windowed, per family, as transformers' own config classes decide."""
    from transformers import AutoConfig

    def windows(name):
        return [s.sliding_window for s in read_arch(AutoConfig.from_pretrained(tiny_models[name])).layers]

    assert windows("mistral-sw") == [WINDOW, WINDOW]
    assert windows("qwen2-sw") == [None, WINDOW]  # max_window_layers=1: the first layer attends to everything
    assert windows("qwen2-sw-all") == [WINDOW, WINDOW]
    assert windows("qwen2") == [None, None]  # use_sliding_window false: its sliding_window is not read
    assert windows("gemma2") == [WINDOW, None]
    assert windows("gemma3") == [WINDOW, None, WINDOW]
    assert windows("phi3") == [24, 24]
    arch = read_arch(AutoConfig.from_pretrained(tiny_models["gemma3"]))
    assert [s.rope for s in arch.layers] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert arch.qk_norm and arch.sandwich_norms and arch.final_softcap == 20.0 and arch.attn_softcap is None
    assert read_arch(AutoConfig.from_pretrained(tiny_models["phi3"])).rotary_dim == 8
