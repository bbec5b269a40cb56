"""Sampling: greedy, temperature, top-k, top-p, and per-request reproducibility."""

from __future__ import annotations

import torch

from engine.config import SamplingParams
from engine.sampler import sample


def logits_batch(rows=4, vocab=50, seed=0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))


def test_greedy_is_argmax():
    logits = logits_batch()
    params = [SamplingParams(temperature=0)] * 4
    assert torch.equal(sample(logits, params, [0] * 4), logits.argmax(-1))


def test_same_seed_and_step_same_token_regardless_of_batch():
    logits = logits_batch()
    p = SamplingParams(temperature=1.0, seed=1234)
    alone = sample(logits[2:3], [p], [7])
    batched = sample(logits, [SamplingParams(temperature=0), SamplingParams(temperature=0.5, seed=9), p,
                              SamplingParams(temperature=0)], [0, 3, 7, 1])
    assert int(alone[0]) == int(batched[2])
    other_step = [int(sample(logits[2:3], [p], [s])[0]) for s in range(20)]
    assert len(set(other_step)) > 1  # the step changes the draw


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = logits_batch(rows=3)
    for p in (SamplingParams(temperature=1.5, top_k=1, seed=1), SamplingParams(temperature=1.5, top_p=1e-6, seed=1)):
        for step in range(10):
            assert torch.equal(sample(logits, [p] * 3, [step] * 3), logits.argmax(-1))


def test_top_k_never_leaves_the_top_k():
    logits = logits_batch(rows=1, vocab=100)
    top5 = set(logits[0].topk(5).indices.tolist())
    p = SamplingParams(temperature=2.0, top_k=5, seed=3)
    drawn = {int(sample(logits, [p], [s])[0]) for s in range(300)}
    assert drawn <= top5 and len(drawn) > 1


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = SamplingParams(temperature=1.0, top_p=0.7, seed=5)  # keeps 0.5 and 0.3 (0.5 < 0.7 <= 0.8)
    drawn = {int(sample(logits, [p], [s])[0]) for s in range(300)}
    assert drawn == {0, 1}


def test_temperature_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = torch.log(probs)[None, :]
    p = SamplingParams(temperature=1.0, seed=11)
    n = 3000
    counts = torch.bincount(torch.tensor([int(sample(logits, [p], [s])[0]) for s in range(n)]), minlength=3)
    freq = counts.float() / n
    assert torch.allclose(freq, probs, atol=0.04), freq


def test_keyed_uniforms_are_uniform_and_keyed():
    from engine.sampler import keyed_uniform

    u = keyed_uniform([5], [3], salt=0, n=200_000)[0]
    assert 0 < float(u.min()) and float(u.max()) < 1
    # Each decile holds a tenth of the draws (binomial sd ~ 0.0007 at this n).
    hist = torch.histc(u, bins=10, min=0, max=1) / u.numel()
    assert (hist - 0.1).abs().max() < 0.005, hist
    assert torch.equal(keyed_uniform([5], [3], 0, 64), keyed_uniform([5, 9], [3, 3], 0, 64)[:1])
    for other in (keyed_uniform([6], [3], 0, 64), keyed_uniform([5], [4], 0, 64), keyed_uniform([5], [3], 1, 64)):
        assert not torch.equal(other, keyed_uniform([5], [3], 0, 64))
    # Neighbouring columns and neighbouring steps are uncorrelated.
    v = keyed_uniform(list(range(2000)), [0] * 2000, 0, 2)
    assert abs(float(torch.corrcoef(v.T)[0, 1])) < 0.08
    w = keyed_uniform([1] * 2000, list(range(2000)), 0, 1)[:, 0]
    assert abs(float(torch.corrcoef(torch.stack([w[:-1], w[1:]]))[0, 1])) < 0.08


def test_sampling_tensors_need_no_host_values_per_step():
    """The device-resident form: one SamplingTensors for the batch, only the steps change per step."""
    from engine.sampler import SamplingTensors, sample_t

    logits = logits_batch(rows=3, vocab=40)
    params = [SamplingParams(temperature=0.8, top_k=7, seed=1), SamplingParams(temperature=0),
              SamplingParams(temperature=1.2, top_p=0.5, seed=2)]
    st = SamplingTensors.build(params, "cpu")
    for step in range(5):
        steps = torch.tensor([step, step, step + 1])
        assert torch.equal(sample_t(logits, st, steps), sample(logits, params, steps.tolist()))
    assert int(sample_t(logits, st, torch.tensor([0, 0, 0]))[1]) == int(logits[1].argmax())


def test_top_p_on_candidates_equals_the_full_sort():
    """The CPU path looks for each nucleus among the top 256, then 4096 tokens, and sorts only the rows
    whose nucleus reaches further: the kept sets must equal those of one sort of every row (the GPU's
    path). Rows are peaked (nucleus within 256), medium (within 4096) and flat (past both), with top_p = 1
    rows mixed in; then rows with ties (bf16-rounded logits) and top_p exactly on a prefix's mass."""
    from engine.sampler import _outside_top_p, _outside_top_p_by_sort

    gen = torch.Generator().manual_seed(0)
    vocab = 12_000
    logits = torch.randn(9, vocab, generator=gen) * torch.tensor([8.0, 8, 8, 2, 2, 2, 0.3, 0.3, 0.3])[:, None]
    # each row's top_p set halfway between the mass of its top n - 1 and top n tokens: a nucleus of n
    # tokens, n = 10 (peaked), 1000 (medium), 6000 (flat)
    sizes = [10, 0, 3, 1000, 600, 0, 6000, 9000, 0]  # 0: top_p = 1
    mass = logits.softmax(-1).sort(dim=-1, descending=True).values.cumsum(-1)
    top_p = torch.tensor([float(mass[r, n - 1] + mass[r, n - 2]) / 2 if n else 1.0
                          for r, n in enumerate(sizes)])
    got = _outside_top_p(logits, top_p)
    assert torch.equal(got, _outside_top_p_by_sort(logits.softmax(-1), top_p))
    kept = (~got).sum(-1).tolist()
    assert kept == [n or vocab for n in sizes]  # each candidate stage and the full sort were exercised
    # ties: bf16 logits repeat values, and topk and sort may order equal ones differently; top_p exactly
    # the mass of a prefix (a boundary where adding in another order could flip the decision)
    scale = torch.tensor([3.0, 3, 1.5, 1.5, 0.5, 0.5])[:, None]
    tied = (torch.randn(6, vocab, generator=gen) * scale).bfloat16().float()
    p = tied.softmax(-1)
    top = p.topk(256, dim=-1).values
    top_p = torch.tensor([0.9, float(top[1].sum()), 0.95, float(top[3, :100].sum()), 0.9, 0.5])
    got = _outside_top_p(tied, top_p)
    assert torch.equal(got, _outside_top_p_by_sort(p, top_p))
    for row in range(6):
        kept_p = p[row][~got[row]]
        floor = kept_p.min()
        assert not (p[row][got[row]] >= floor).any()  # every token as probable as one kept is kept
        assert kept_p.sum() >= top_p[row] * (1 - 1e-6)  # reaches top_p
        assert p[row][p[row] > floor].sum() < top_p[row]  # the strictly more probable ones do not


def test_inverse_cdf_draw_never_picks_an_impossible_token():
    from engine.sampler import draw_from

    probs = torch.zeros(4, 50)
    probs[:, 7] = 0.5
    probs[:, 19] = 0.25
    probs[:, 49] = 0.25
    u = torch.tensor([1e-9, 0.5, 0.75, 1 - 1e-7])
    assert draw_from(probs, u).tolist() == [7, 7, 19, 49]
    many = draw_from(probs[:1].expand(5000, -1), torch.rand(5000, generator=torch.Generator().manual_seed(1)))
    assert set(many.tolist()) == {7, 19, 49}
    counts = torch.bincount(many, minlength=50)[[7, 19, 49]].float() / 5000
    assert torch.allclose(counts, torch.tensor([0.5, 0.25, 0.25]), atol=0.03), counts
