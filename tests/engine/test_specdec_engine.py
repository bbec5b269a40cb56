"""Speculative decoding through the decode worker's real batcher over a real paged pool: outputs equal
plain decoding (greedy with every drafter; sampled with point-mass drafts), the sampled distribution is
the target's (Algorithm 2), ragged steps, stops inside an accepted run, and no KV block leaks."""

from __future__ import annotations

import time

import pytest
import torch

from decode_worker.speculative import SpeculativeStepper
from engine.config import EngineConfig, SamplingParams
from engine.runner import ModelRunner
from engine.sampler import processed_probs
from engine.specdec import Draft, Verifier
from pdserve.bench.specdec import generate
from tests.engine.test_specdec import chi2, chi2_critical


def _runner(folder, block_size=4, **kw) -> ModelRunner:
    # One thread: tiny matmuls gain nothing from more, and OpenMP teams waiting on busy shared cores
    # made every step 40x slower.
    return ModelRunner(EngineConfig(model=str(folder), dtype="float32", device="cpu", block_size=block_size,
                                    num_threads=1, **kw))


def _prompts(seed=0):
    """Ragged prompts; two repeat a span, so prompt lookup finds matches."""
    gen = torch.Generator().manual_seed(seed)
    a, b, c = (torch.randint(0, 256, (n,), generator=gen).tolist() for n in (6, 19, 33))
    return [a, b + b[:9] + b, c]


@pytest.mark.parametrize("name", ["llama", "qwen3"])
@pytest.mark.parametrize("spec", ["ngram", "layers:1"])
@pytest.mark.parametrize("gamma", [3, "auto"])
def test_greedy_outputs_equal_plain_decoding(tiny_models, name, spec, gamma):
    runner = _runner(tiny_models[name])
    prompts = _prompts()
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (21, 40, 9)]
    plain = generate(runner, prompts, params)
    fast = generate(runner, prompts, params, spec, gamma)
    assert fast.outputs == plain.outputs
    assert fast.spec_steps > 0 and sum(r["drafted"] for r in fast.per_request) > 0


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_sampled_point_mass_drafts_write_plain_decodings_text(tiny_models, top_p):
    """ngram drafts are point masses: verification keeps a draft iff it equals the target's own keyed
    sample, so at temperature 1 the text is plain decoding's, token for token, whatever γ was."""
    runner = _runner(tiny_models["llama"])
    prompts = _prompts(1)
    params = [SamplingParams(max_tokens=30, temperature=1.0, top_p=top_p, seed=7 + i, ignore_eos=True)
              for i in range(3)]
    plain = generate(runner, prompts, params)
    for gamma in (2, 5):
        assert generate(runner, prompts, params, "ngram", gamma).outputs == plain.outputs


def _marginal_second_token(runner, prompt, prm) -> torch.Tensor:
    """The target's distribution of the first decoded token (output[1]), summed over output[0]."""
    first = processed_probs(runner.prefill([prompt], None), [prm])[0]
    support = first.nonzero().flatten().tolist()
    logits = runner.prefill([prompt + [t] for t in support], None)
    second = processed_probs(logits, [prm] * len(support))
    return (first[support, None] * second).sum(0)


@pytest.fixture(scope="module")
def peaked_llama(tmp_path_factory):
    """A tiny random Llama with larger weights (init std 0.4): peaked next-token distributions (~35
    tokens in the top-p 0.9 nucleus instead of ~220), on which one layer drafts far from two
    (α ≈ 0.3), so a wrong acceptance rule moves the output distribution visibly."""
    from transformers import LlamaConfig

    from tests.conftest import TINY_COMMON, _save_tiny

    cfg = LlamaConfig(**TINY_COMMON, initializer_range=0.4, tie_word_embeddings=False)
    return _save_tiny(tmp_path_factory.mktemp("peaked") / "llama", cfg)


@pytest.mark.parametrize("rule", ["chen", "resample_from_p"])
def test_sampled_self_drafts_keep_the_target_distribution(peaked_llama, rule):
    """layers:1 drafts are sampled from the draft's own q (temperature 1, top-p 0.9), so Algorithm 2
    decides. The first decoded token over 4,000 seeds follows the target's distribution; with the
    wrong residual (draw from p after a rejection) the same test rejects it."""
    runner = _runner(peaked_llama, block_size=16)
    prompt = _prompts()[0]
    n = 4000
    params = [SamplingParams(max_tokens=4, temperature=1.0, top_p=0.9, seed=s, ignore_eos=True) for s in range(n)]
    verifier = Verifier() if rule == "chen" else Verifier(residual=lambda p, q: p)

    def install(stepper: SpeculativeStepper) -> None:
        stepper.verifier = verifier

    out = generate(runner, [prompt] * n, params, "layers:1", 2, stepper_hook=install)
    assert out.spec_steps >= 1
    counts = torch.bincount(torch.tensor([o[1] for o in out.outputs]), minlength=runner.arch.vocab_size)
    stat, df = chi2(counts, _marginal_second_token(runner, prompt, params[0]))
    if rule == "chen":
        assert stat < chi2_critical(df), f"chi2 {stat:.1f} on {df} df: speculation changed the distribution"
    else:
        assert stat > chi2_critical(df), f"chi2 {stat:.1f} on {df} df: a wrong acceptance rule went unnoticed"


class ScriptedDrafter:
    """Drafts that are known right or wrong, so one step is ragged on purpose: sequence 0 gets the
    continuation plain decoding wrote (all γ stand), sequence 1 a wrong one (none stands), 2 none."""

    name, needs_prompt_ids = "scripted", False

    def __init__(self, reference: list[list[int]]) -> None:
        self.reference = reference

    def propose(self, seqs, gammas):
        drafts = []
        for i, (s, g) in enumerate(zip(seqs, gammas)):
            ref = self.reference[int(s.request_id)][len(s.output):len(s.output) + g]
            drafts.append(Draft(tuple(ref) if i == 0 else tuple((t + 1) % 256 for t in ref) if i == 1 else ()))
        return drafts


def test_ragged_step_and_stop_inside_an_accepted_run(tiny_models):
    runner = _runner(tiny_models["qwen3"])
    prompts = _prompts(2)
    params = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True) for _ in prompts]
    plain = generate(runner, prompts, params)
    steps: list[list[int]] = []

    def install(stepper: SpeculativeStepper) -> None:
        stepper.drafter = ScriptedDrafter(plain.outputs)
        before = stepper._append

        def recording(seq, new, now):
            steps.append([int(seq.request_id), len(new)])
            before(seq, new, now)
        stepper._append = recording

    fast = generate(runner, prompts, params, "ngram", 4, stepper_hook=install)
    assert fast.outputs == plain.outputs
    assert steps[:3] == [[0, 5], [1, 1], [2, 1]]  # one step: 4 drafts + 1 kept, 0 + 1, nothing drafted + 1
    # A stop token that plain decoding emits as token 6 of sequence 0: the run of 5 accepted tokens
    # that would carry it to token 10 is cut at the stop, as plain decoding stops there.
    stop = plain.outputs[0][6]
    params[0] = SamplingParams(max_tokens=24, temperature=0, stop_token_ids=(stop,))
    plain = generate(runner, prompts, params)
    fast = generate(runner, prompts, params, "ngram", 4, stepper_hook=install)
    assert fast.outputs == plain.outputs and fast.outputs[0][-1] == stop and len(fast.outputs[0]) <= 7


REWRITE = [
    "Repeat this sentence exactly: The quick brown fox jumps over the lazy dog near the river bank.",
    "Rewrite in the same words: Paris is the capital of France and its largest city.",
    "Copy the list: apples, oranges, bananas, grapes, pears, plums.",
]


def _chat(tokenizer, texts):
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"] for t in texts]


@pytest.fixture(scope="module")
def default_plain(default_model_dir, tokenizer):
    runner = ModelRunner(EngineConfig(dtype="float32", device="cpu", kv_cache_gib=0.05, num_threads=1))
    params = [SamplingParams(max_tokens=32, temperature=0) for _ in REWRITE]
    return runner, params, generate(runner, _chat(tokenizer, REWRITE), params, tokenizer=tokenizer)


@pytest.mark.parametrize("spec", ["ngram", "layers:28"])  # early exit at 8 or 16 of 30 layers: α = 0
def test_default_model_greedy_equals_plain_decoding(default_plain, tokenizer, spec):
    runner, params, plain = default_plain
    fast = generate(runner, _chat(tokenizer, REWRITE), params, spec, "auto", tokenizer=tokenizer)
    assert fast.outputs == plain.outputs
    assert sum(r["accepted"] for r in fast.per_request) > 0


def test_default_model_stop_string_inside_an_accepted_run(default_plain, tokenizer):
    """A stop string that plain decoding meets mid-output: speculation stops on the same token."""
    runner, params, plain = default_plain
    text = tokenizer.decode(plain.outputs[0][:12])
    stop = text[-6:].strip() or text[-6:]
    stopped = [SamplingParams(max_tokens=32, temperature=0, stop=(stop,)) for _ in REWRITE]
    ref = generate(runner, _chat(tokenizer, REWRITE), stopped, tokenizer=tokenizer)
    fast = generate(runner, _chat(tokenizer, REWRITE), stopped, "ngram", 5, tokenizer=tokenizer)
    assert fast.outputs == ref.outputs and len(ref.outputs[0]) <= 12


def test_decode_worker_speculates_and_returns_every_block(default_plain, tokenizer):
    """A real DecodeWorker (shared-memory pool, its own loop, the default model) with --speculative
    ngram: results equal plain decoding, carry drafted/accepted/α, and every KV block comes back."""
    from decode_worker.worker import DecodeWorker
    from engine.runner import pool_writer, token_slots
    from engine.sampler import sample
    from proto.messages import Admission, Reservation, WorkerConfig

    _, params, plain = default_plain
    prompts = _chat(tokenizer, REWRITE)
    engine = EngineConfig(dtype="float32", device="cpu", kv_cache_gib=0.05, num_threads=1,
                          speculative="ngram", num_speculative_tokens=3)
    worker = DecodeWorker(WorkerConfig(engine=engine, worker_id="d0", auth_token="t", transport="shm"))
    try:
        granted = worker.reserve([Reservation(str(i), len(p), sp.max_tokens, tuple(p))
                                  for i, (p, sp) in enumerate(zip(prompts, params))])
        tables = [list(granted[str(i)].block_table) for i in range(len(prompts))]
        bs = engine.block_size
        # The prefill worker's part, done here: the decode loop holds the worker's compute thread.
        logits = worker.runner.prefill(prompts, pool_writer(
            worker.pool, [token_slots(t, len(p), bs) for t, p in zip(tables, prompts)]))
        firsts = sample(logits, params, [0] * len(prompts)).tolist()
        refused = worker.admit([Admission(str(i), len(p), firsts[i], time.time(), sp, "shm")
                                for i, (p, sp) in enumerate(zip(prompts, params))])
        assert refused == []
        results = {}
        deadline = time.time() + 120
        while len(results) < len(prompts) and time.time() < deadline:
            results |= {r.request_id: r for r in worker.poll(0.5).results}
        assert [list(results[str(i)].token_ids) for i in range(len(prompts))] == plain.outputs
        spec = [results[str(i)].speculative for i in range(len(prompts))]
        assert sum(s["accepted"] for s in spec) > 0
        assert all(0 <= s["accepted"] <= s["drafted"] and 0 < s["alpha"] < 1 for s in spec)
        worker.blocks.assert_empty()
    finally:
        worker.shutdown()
