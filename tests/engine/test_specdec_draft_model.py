"""`--speculative model:PATH`: a separate draft model over its own paged KV, through the decode worker's
real batcher and pool. Greedy outputs equal plain decoding; a draft identical to the target has every
draft stand (its KV is caught up right, step after step); a draft with another vocabulary or another
tokenizer is refused at start; every draft KV block comes back."""

from __future__ import annotations

import json

import pytest
import torch

from decode_worker.speculative import SpeculativeStepper
from engine.config import EngineConfig, SamplingParams
from engine.runner import ModelRunner
from engine.specdec import make_drafter
from pdserve.bench.specdec import generate
from tests.conftest import TINY_COMMON, _save_tiny
from tests.engine.test_specdec import chi2, chi2_critical
from tests.engine.test_specdec_engine import _marginal_second_token, _runner, peaked_llama  # noqa: F401 (a fixture)


def _prompts(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (6, 19, 33)]


@pytest.fixture(scope="module")
def small_draft(tmp_path_factory):
    """A one-layer Llama with other weights and the tiny target's vocabulary (256)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(**{**TINY_COMMON, "num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64},
                      tie_word_embeddings=False)
    return _save_tiny(tmp_path_factory.mktemp("draft") / "llama1", cfg)


def _first_layer_only(src, folder):
    """`src`'s first layer, embedding, final norm and LM head as a model of its own."""
    from safetensors.torch import load_file, save_file

    cfg = json.loads((src / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    weights = load_file(src / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".layers.1." not in k}, folder / "model.safetensors")
    return folder


@pytest.fixture(scope="module")
def truncated_draft(tiny_models, tmp_path_factory):
    """The tiny target's first layer as a separate draft: it agrees with the target often but not
    always (drafts stand part-way)."""
    return _first_layer_only(tiny_models["llama"], tmp_path_factory.mktemp("truncated"))


def _run(runner, prompts, params, spec, gamma):
    seen: list[SpeculativeStepper] = []
    out = generate(runner, prompts, params, spec, gamma, stepper_hook=seen.append)
    drafter = seen[0].drafter
    drafter.blocks.assert_empty()  # leak check: every draft block came back
    assert drafter.blocks.num_free == drafter.pool.layout.num_blocks and not drafter._state
    return out


@pytest.mark.parametrize("gamma", [3, "auto"])
def test_greedy_outputs_equal_plain_decoding(tiny_models, small_draft, gamma):
    runner = _runner(tiny_models["llama"])
    prompts = _prompts()
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (21, 40, 9)]
    plain = generate(runner, prompts, params)
    fast = _run(runner, prompts, params, f"model:{small_draft}", gamma)
    assert fast.outputs == plain.outputs
    assert fast.spec_steps > 0 and sum(r["drafted"] for r in fast.per_request) > 0


def test_target_as_its_own_draft_has_every_draft_stand(tiny_models):
    """The draft's KV is right only if the catch-up after each step is: a draft identical to the target
    then proposes exactly the target's greedy tokens, and all of them stand."""
    runner = _runner(tiny_models["llama"])
    prompts = _prompts(2)
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (17, 30, 12)]
    plain = generate(runner, prompts, params)
    fast = _run(runner, prompts, params, f"model:{tiny_models['llama']}", 4)
    assert fast.outputs == plain.outputs
    drafted = sum(r["drafted"] for r in fast.per_request)
    assert drafted > 0 and sum(r["accepted"] for r in fast.per_request) == drafted
    assert fast.rows < sum(len(o) - 1 for o in fast.outputs)  # more than one token per target forward


@pytest.mark.parametrize("prefill_chunk", [256, 5])
def test_drafts_are_the_draft_models_own_greedy_continuation(tiny_models, truncated_draft, prefill_chunk):
    """With a draft unlike the target, drafts are rejected part-way, and with plain steps in between
    the context moves past positions whose draft KV came from rejected drafts: the catch-up must
    rewrite exactly those. Every step's drafts must equal what the draft model writes greedily from
    the whole context prefilled afresh. With a 5-token prefill chunk, prompts are prefilled over
    several steps (those sequences draft nothing until theirs is whole)."""
    runner = _runner(tiny_models["llama"])
    prompts = _prompts(3)
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (25, 30, 14)]
    records: list[tuple[list[int], tuple[int, ...]]] = []

    def spy(stepper: SpeculativeStepper) -> None:
        stepper.drafter.prefill_chunk = prefill_chunk
        propose = stepper.drafter.propose

        def recording(seqs, gammas):
            drafts = propose(seqs, gammas)
            records.extend((list(s.prompt_token_ids) + s.output, d.tokens) for s, d in zip(seqs, drafts) if d.tokens)
            return drafts

        stepper.drafter.propose = recording
        choose, calls = stepper.chooser.choose, []

        def every_third_plain(alphas):  # plain steps in between move the context past stale drafts
            calls.append(1)
            return 0 if len(calls) % 3 == 0 else choose(alphas)

        stepper.chooser.choose = every_third_plain

    out = generate(runner, prompts, params, f"model:{truncated_draft}", 3, stepper_hook=spy)
    accepted = sum(r["accepted"] for r in out.per_request)
    assert 0 < accepted < sum(r["drafted"] for r in out.per_request)  # some stood, some did not
    fresh = _runner(truncated_draft)
    for j in range(3):
        rows = [(ctx + list(toks[:j]), toks[j]) for ctx, toks in records if len(toks) > j]
        picks = fresh.prefill([r[0] for r in rows], None).argmax(-1).tolist()
        assert picks == [r[1] for r in rows], f"draft token {j} differs from the draft model's own greedy one"


def test_sampled_rows_draft_and_finish(tiny_models, small_draft):
    """Sampled rows hand q to Algorithm 2; the run completes with the right lengths and no leak."""
    runner = _runner(tiny_models["llama"])
    params = [SamplingParams(max_tokens=15, temperature=1.0, top_p=0.9, seed=3 + i, ignore_eos=True)
              for i in range(3)]
    out = _run(runner, _prompts(1), params, f"model:{small_draft}", 3)
    assert [len(o) for o in out.outputs] == [15] * 3 and out.spec_steps > 0


@pytest.mark.parametrize("rule", ["chen", "resample_from_p"])
def test_sampled_drafts_keep_the_target_distribution(peaked_llama, tmp_path, rule):  # noqa: F811
    """Drafts sampled from the draft model's own q (temperature 1, top-p 0.9) go through Algorithm 2:
    the first decoded token over 4,000 seeds follows the target's distribution; with a wrong residual
    (draw from p after a rejection) the same test rejects it."""
    from engine.specdec import Verifier

    draft = _first_layer_only(peaked_llama, tmp_path)
    runner = _runner(peaked_llama, block_size=16)
    prompt = _prompts()[0]
    n = 4000
    params = [SamplingParams(max_tokens=4, temperature=1.0, top_p=0.9, seed=s, ignore_eos=True) for s in range(n)]
    verifier = Verifier() if rule == "chen" else Verifier(residual=lambda p, q: p)

    def install(stepper: SpeculativeStepper) -> None:
        stepper.verifier = verifier
        stepper.drafter.prefill_chunk = 6 * n  # every prompt's draft KV at the first step: all draft

    out = generate(runner, [prompt] * n, params, f"model:{draft}", 2, stepper_hook=install)
    drafted = sum(r["drafted"] for r in out.per_request)
    assert drafted >= n and sum(r["accepted"] for r in out.per_request) < drafted
    assert out.spec_steps >= 1
    counts = torch.bincount(torch.tensor([o[1] for o in out.outputs]), minlength=runner.arch.vocab_size)
    stat, df = chi2(counts, _marginal_second_token(runner, prompt, params[0]))
    if rule == "chen":
        assert stat < chi2_critical(df), f"chi2 {stat:.1f} on {df} df: speculation changed the distribution"
    else:
        assert stat > chi2_critical(df), f"chi2 {stat:.1f} on {df} df: a wrong acceptance rule went unnoticed"


def test_other_vocabulary_is_refused_at_start(tiny_models, tmp_path):
    from transformers import LlamaConfig

    other = _save_tiny(tmp_path / "v300", LlamaConfig(**{**TINY_COMMON, "vocab_size": 300}))
    runner = _runner(tiny_models["llama"])
    pool_layout = runner.kv_layout(num_blocks=8)
    from engine.kv_cache import KVPool

    pool = KVPool.allocate(pool_layout)
    with pytest.raises(ValueError, match=r"vocabulary has 300 tokens.*256.*share the target's tokenizer") as e:
        make_drafter(f"model:{other}", runner.model, pool, runner.backend, runner)
    assert str(other) in str(e.value) and str(tiny_models["llama"]) in str(e.value)


def _word_tokenizer(folder, order):
    """A word-level tokenizer over 256 tokens with ids in `order`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{t}": i for i, t in enumerate(order)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(folder)


def test_other_tokenizer_same_size_is_refused(tiny_models, tmp_path):
    """Same vocabulary size, other token -> id map: refused, naming both folders."""
    from transformers import LlamaConfig

    target = _save_tiny(tmp_path / "target", LlamaConfig(**TINY_COMMON))
    same = _save_tiny(tmp_path / "same", LlamaConfig(**{**TINY_COMMON, "num_hidden_layers": 1}))
    other = _save_tiny(tmp_path / "other", LlamaConfig(**{**TINY_COMMON, "num_hidden_layers": 1}))
    _word_tokenizer(target, range(256))
    _word_tokenizer(same, range(256))
    _word_tokenizer(other, list(range(255, -1, -1)))
    assert json.loads((other / "tokenizer.json").read_text())["model"]["vocab"]["w0"] == 255
    from engine.specdec.draft_model import check_same_tokenizer

    check_same_tokenizer(target, same, 256, 256)  # the same tokenizer passes
    with pytest.raises(ValueError, match="maps tokens to other ids") as e:
        check_same_tokenizer(target, other, 256, 256)
    assert str(target) in str(e.value) and str(other) in str(e.value)
    with pytest.raises(ValueError, match="no tokenizer files"):
        check_same_tokenizer(target, tiny_models["llama"], 256, 256)


def test_config_accepts_model_path_and_refuses_an_empty_one():
    assert EngineConfig(speculative="model:/some/draft").speculative == "model:/some/draft"
    with pytest.raises(ValueError, match="model:PATH"):
        EngineConfig(speculative="model:")


def test_an_aborted_sequence_frees_its_draft_blocks_at_the_next_step(tiny_models, small_draft):
    """A sequence aborted by the router just stops showing up in steps: its draft KV goes then."""
    from decode_worker.batcher import DecodeSequence
    from engine.kv_cache import KVPool

    runner = _runner(tiny_models["llama"])
    pool = KVPool.allocate(runner.kv_layout(num_blocks=64))
    drafter = make_drafter(f"model:{small_draft}", runner.model, pool, runner.backend, runner)
    prm = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    a, b = (DecodeSequence(rid, len(p), prm, [], [7], [], prompt_token_ids=tuple(p))
            for rid, p in zip("ab", _prompts()))
    drafts = drafter.propose([a, b], [3, 2])
    assert [len(d.tokens) for d in drafts] == [3, 2]
    both = drafter.blocks.num_used
    drafter.propose([a], [3])  # b was aborted
    assert drafter.blocks.num_used == both - drafter.blocks.blocks_for(b.prompt_len + 12) > 0
    drafter.release("a")
    drafter.blocks.assert_empty()


@pytest.mark.slow
def test_run_batch_with_a_draft_model_equals_plain_decoding(ray_cluster, tmp_path, default_model_dir, tokenizer):
    """Through a real Ray cluster (shared memory transport), the default model drafting for itself
    (its tokenizer files are checked against themselves): outputs equal plain decoding, drafts stand,
    no target KV block leaks."""
    from pdserve.batch.run import BatchOptions, run_batch
    from pdserve.runtime.cluster import ClusterConfig
    from router.router import RouterConfig
    from tests.engine.test_specdec_engine import REWRITE, _chat

    texts = REWRITE[:2]
    runner = ModelRunner(EngineConfig(dtype="float32", device="cpu", kv_cache_gib=0.05, num_threads=1))
    params = [SamplingParams(max_tokens=16, temperature=0) for _ in texts]
    plain = generate(runner, _chat(tokenizer, texts), params, tokenizer=tokenizer).outputs
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                       "body": {"model": "SmolLM2-135M-Instruct", "max_tokens": 16, "temperature": 0,
                                                "messages": [{"role": "user", "content": t}]}}) + "\n"
                           for i, t in enumerate(texts)))
    summary = run_batch(inp, out, EngineConfig(dtype="float32", device="cpu", kv_cache_gib=0.25,
                                               speculative=f"model:{default_model_dir}", num_speculative_tokens=3),
                        ClusterConfig(transport="shm"), RouterConfig(max_prefill_tokens=512),
                        BatchOptions(progress=False))
    assert summary.succeeded == len(texts) and summary.kv_blocks_leaked == 0
    records = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    for i, ref in enumerate(plain):
        ext = records[f"r{i}"]["pdserve"]
        assert ext["output_token_ids"] == ref
        assert ext["speculative"]["drafted"] > 0 and ext["speculative"]["accepted"] > 0
