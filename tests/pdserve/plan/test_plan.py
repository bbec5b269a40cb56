"""`pdserve plan`: the simulated router against closed forms and against answers worked out by hand
(one prompt per call is a FIFO queue; the router's batching, buckets, mailbox, decode joins and busy
neighbours on small traces), the search's direction (more prefill workers when prefill dominates, more
decode workers when decode does), unstable loads, the profile's JSON round trip, and the command end to
end on a real model."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from pdserve.cli import main
from pdserve.observability.metrics import SLO
from pdserve.plan.model import Config, LengthDist, Resources, Workload, max_rate, predict, search
from pdserve.plan.profile import DecodeFit, PrefillFit, StageProfile, fit_decode, fit_prefill
from pdserve.plan.report import render
from pdserve.plan.simulate import ONE_PROMPT_PER_CALL, ROUTER_DEFAULTS, RouterPolicy, StageTimes, simulate


def profile(a=0.0, b=0.01, c=0.05, d=0.01, e=0.0, threads=1) -> StageProfile:
    return StageProfile(PrefillFit(a, b), DecodeFit(c, d, e), kv_bytes_per_token=1000, num_layers=10,
                        threads=threads, description="hand-made")


def workload(rate, prompt="100", output="11", ttft=2.0, tpot=0.08, samples=400) -> Workload:
    return Workload(rate, LengthDist.parse(prompt), LengthDist.parse(output), SLO(ttft_s=ttft, tpot_s=tpot),
                    samples=samples)


FREE_TRANSFER = Resources(total=2, transfer_gbps=0)


def times(a=0.0, b=0.0, c=0.0, d=0.0, e=0.0, **kw) -> StageTimes:
    return StageTimes(PrefillFit(a, b), DecodeFit(c, d, e), **kw)


def run(t: StageTimes, arrivals, prompts, outputs, p=1, d=1, max_batch=8, policy=ROUTER_DEFAULTS):
    return simulate(t, np.array(arrivals, dtype=float), np.array(prompts), np.array(outputs), p, d, max_batch, policy)


# ---- references: closed forms ------------------------------------------------------------------
def md1_wait(rate: float, service_s: float) -> float:
    """Mean queueing wait of an M/D/1 queue; inf when rho >= 1."""
    rho = rate * service_s
    return math.inf if rho >= 1 else rho * service_s / (2 * (1 - rho))


def mg1_wait(rate: float, mean_s: float, second_moment_s2: float) -> float:
    """Pollaczek-Khinchine mean wait of an M/G/1 queue; inf when rho >= 1."""
    rho = rate * mean_s
    return math.inf if rho >= 1 else rate * second_moment_s2 / (2 * (1 - rho))


def test_queue_formulas_by_hand():
    # M/D/1, rho = 0.5, S = 1 s: Wq = rho * S / (2 (1 - rho)) = 0.5 s
    assert md1_wait(0.5, 1.0) == pytest.approx(0.5)
    # P-K with a deterministic service (E[S^2] = S^2) is M/D/1
    assert mg1_wait(0.5, 1.0, 1.0) == pytest.approx(0.5)
    # P-K with exponential service (E[S^2] = 2 S^2) is M/M/1: Wq = rho / (mu - lambda) = 0.5 / 0.5 = 1 s
    assert mg1_wait(0.5, 1.0, 2.0) == pytest.approx(1.0)
    assert math.isinf(md1_wait(1.0, 1.0)) and math.isinf(mg1_wait(2.0, 1.0, 1.0))


@pytest.mark.parametrize("rho", [0.5, 0.8])
def test_one_prompt_per_call_is_the_fifo_queue(rho):
    """With one prompt per call and no mailbox the router is a FIFO single-server queue: every request's
    TTFT equals Lindley's recursion on the same arrivals, and the mean wait is Pollaczek-Khinchine's."""
    rng = np.random.default_rng(1)
    prompts = rng.integers(16, 513, 20_000)
    service = 0.002 * prompts
    rate = rho / service.mean()
    arrivals = np.cumsum(rng.exponential(1 / rate, len(prompts)))
    wait = np.zeros(len(prompts))
    for i in range(1, len(prompts)):
        wait[i] = max(0.0, wait[i - 1] + service[i - 1] - (arrivals[i] - arrivals[i - 1]))
    sim = run(times(b=0.002), arrivals, prompts, np.ones(len(prompts), int), policy=ONE_PROMPT_PER_CALL)
    assert sim.ttft_s == pytest.approx(wait + service, abs=1e-9)
    assert sim.prompts_per_call == 1
    assert wait.mean() == pytest.approx(mg1_wait(rate, service.mean(), (service ** 2).mean()), rel=0.1)


# ---- the router's batching, by hand ----------------------------------------------------------------
def test_calls_are_cut_when_a_mailbox_slot_opens():
    """Prefill 0.1 s + 1 ms/token, four 100-token prompts at 0, 10, 20, 30 ms, two calls in flight:
    [r0] runs 0-0.2; r1 finds the mailbox free and is sent alone, runs 0.2-0.4; r2 and r3 wait in the
    router and leave together when r0 returns, running 0.4-0.7 (0.1 + 200 tokens)."""
    sim = run(times(a=0.1, b=0.001), [0, 0.01, 0.02, 0.03], [100] * 4, [1] * 4)
    assert sim.ttft_s == pytest.approx([0.2, 0.39, 0.68, 0.67])
    assert sim.prompts_per_call == pytest.approx(4 / 3)
    assert sim.prefill_wait_s == pytest.approx([0, 0.19, 0.38, 0.37])


def test_length_buckets_keep_short_and_long_prompts_apart():
    """One call in flight. While [r0] runs (0-0.2), prompts of 20, 200 and 25 tokens queue; the oldest
    head's bucket (under 32 tokens) goes first with both short prompts, [r1, r3] 0.2-0.345, then [r2]."""
    sim = run(times(a=0.1, b=0.001), [0, 0.01, 0.02, 0.03], [100, 20, 200, 25], [1] * 4,
              policy=RouterPolicy(prefill_batches_in_flight=1))
    assert sim.ttft_s == pytest.approx([0.2, 0.335, 0.625, 0.315])
    # a token budget of 40 splits the short pair; then the older head (r2's) goes first:
    # [r1] 0.2-0.32, [r2] 0.32-0.62, [r3] 0.62-0.745
    tight = run(times(a=0.1, b=0.001), [0, 0.01, 0.02, 0.03], [100, 20, 200, 25], [1] * 4,
                policy=RouterPolicy(prefill_batches_in_flight=1, max_prefill_tokens=40))
    assert tight.ttft_s == pytest.approx([0.2, 0.31, 0.6, 0.715])


def test_decode_joins_at_step_boundaries_by_hand():
    """Prefill 0.1 s a call; steps 20 ms + 10 ms per sequence. r0 (11 tokens: 10 steps) starts decoding
    at 0.1, stepping alone every 30 ms; r1 (3 tokens: 2 steps) arrives at 0.05, waits in the mailbox, is
    prefilled 0.1-0.2 and joins at the step boundary at 0.22: two steps of 40 ms together (to 0.30),
    then r0 finishes its last 4 steps alone at 0.42."""
    sim = run(times(a=0.1, c=0.02, d=0.01), [0, 0.05], [10, 10], [11, 3])
    assert sim.ttft_s == pytest.approx([0.1, 0.15])
    assert sim.tpot_s == pytest.approx([(0.42 - 0.1) / 10, (0.30 - 0.2) / 2])
    assert sim.rows_per_step == pytest.approx(12 / 10)  # 12 sequence-steps in 10 steps
    # max batch 1: r1 waits for r0 to finish at 0.40, then steps alone to 0.46
    one = run(times(a=0.1, c=0.02, d=0.01), [0, 0.05], [10, 10], [11, 3], max_batch=1)
    assert one.tpot_s == pytest.approx([0.03, (0.46 - 0.2) / 2])


def test_a_step_pays_for_its_sequences_contexts():
    """One request, a 10-token prompt and 4 output tokens: 3 steps at contexts 11, 12, 13 with
    t = 20 ms + 10 ms/seq + 1 ms/context token: 41 + 42 + 43 ms."""
    sim = run(times(c=0.02, d=0.01, e=0.001), [0], [10], [4])
    assert sim.tpot_s == pytest.approx([(0.041 + 0.042 + 0.043) / 3])


def test_busy_neighbours_slow_the_calls_and_steps_they_overlap():
    """Prefill 0.1 s a call (0.2 s beside a busy decode step), a step 0.1 s (0.3 s beside a busy prefill
    call). r0 (2 steps) is prefilled alone 0-0.1 and takes its first step alone 0.1-0.2; r1 arrives at
    0.15 while that step runs: its prefill takes 0.2 s (to 0.35), and r0's second step, which starts
    at 0.2 beside it, takes 0.3 s (to 0.5). r1's one step then runs alone 0.5-0.6."""
    busy = times(a=0.1, c=0.1, prefill_busy=PrefillFit(0.2, 0.0), decode_busy=DecodeFit(0.3, 0.0, 0.0))
    sim = run(busy, [0, 0.15], [10, 10], [3, 2])
    assert sim.ttft_s == pytest.approx([0.1, 0.2])
    assert sim.tpot_s == pytest.approx([0.2, 0.25])
    # without busy fits (workers on separate devices): r1 is prefilled 0.15-0.25 and joins at 0.3
    alone = run(times(a=0.1, c=0.1), [0, 0.15], [10, 10], [3, 2])
    assert alone.ttft_s == pytest.approx([0.1, 0.1]) and alone.tpot_s == pytest.approx([0.1, 0.15])
    # a busy fit measured faster than solo (noise) never speeds a stage up
    faster = times(a=0.1, c=0.1, prefill_busy=PrefillFit(0.05, 0.0), decode_busy=DecodeFit(0.01, 0.0, 0.0))
    assert run(faster, [0, 0.15], [10, 10], [3, 2]).tpot_s == pytest.approx(alone.tpot_s)


def test_a_call_costs_its_tokens_its_prompts_attention_and_at_least_the_floor():
    """t = max(floor, a + b*T + g*sum L^2): packing prompts saves their attention (each attends only to
    itself); below some size every call costs about one read of the weights."""
    fit = PrefillFit(0.03, 0.001, 1e-7, floor_s=0.09)
    assert fit.time(16) == pytest.approx(0.09)  # the line says 0.046: the floor holds
    assert fit.time(512) == pytest.approx(0.03 + 0.512 + 1e-7 * 512 ** 2)  # one prompt
    assert fit.time(512, 8 * 64 ** 2) == pytest.approx(0.03 + 0.512 + 1e-7 * 8 * 64 ** 2)  # eight of 64
    t = times(a=0.03, b=0.001)
    assert replace(t, prefill=fit, scale=2.0).prefill_s(16, 0) == pytest.approx(0.18)
    # in the simulation a call of two 100-token prompts pays 2 * 100^2, not 200^2
    packed = run(times(a=0.1, b=0.001, c=0.01), [0, 0.01, 0.02], [100] * 3, [1] * 3,
                 policy=RouterPolicy(prefill_batches_in_flight=1))
    quad = run(replace(times(c=0.01), prefill=PrefillFit(0.1, 0.001, 1e-6)), [0, 0.01, 0.02], [100] * 3, [1] * 3,
               policy=RouterPolicy(prefill_batches_in_flight=1))
    assert packed.ttft_s == pytest.approx([0.2, 0.49, 0.48])  # [r0] 0-0.2, [r1, r2] 0.2-0.5
    assert quad.ttft_s == pytest.approx([0.21, 0.21 + 0.32 - 0.01, 0.21 + 0.32 - 0.02])  # + 1e-6 * 2 * 100^2


def test_a_calls_requests_step_together_on_an_idle_decode_worker():
    """Three prompts prefilled in one call reach an idle decode worker together: one step of 3 rows,
    not one row and then two."""
    sim = run(times(a=0.1, c=0.02, d=0.01), [0, 0.01, 0.02, 0.03], [10] * 4, [1, 2, 2, 2],
              policy=RouterPolicy(prefill_batches_in_flight=1))
    # [r0] 0-0.1 (one token: done); [r1, r2, r3] 0.1-0.2, then a step of 3 rows: 0.02 + 0.03 = 0.05
    assert sim.ttft_s == pytest.approx([0.1, 0.19, 0.18, 0.17])
    assert sim.tpot_s == pytest.approx([0, 0.05, 0.05, 0.05]) and sim.rows_per_step == 3


def test_batch_admissions_hold_prefilled_requests_until_prefill_is_idle():
    """r0 is prefilled 0-0.1 while r1's call waits in the mailbox (0.1-0.2): held, r0 starts decoding only
    at 0.2, with r1; at once, r0 steps alone from 0.1."""
    args = (times(a=0.1, c=0.02, d=0.01), [0, 0.05], [10, 10], [3, 3])
    eager, held = run(*args), run(*args, policy=RouterPolicy(batch_admissions=True))
    assert eager.tpot_s[0] == pytest.approx(0.03)  # 2 steps of 30 ms from 0.1
    assert held.tpot_s == pytest.approx([(0.2 + 0.08 - 0.1) / 2, 0.04])  # from 0.2, 2 steps of 40 ms
    from router.router import RouterConfig

    assert RouterPolicy.of(RouterConfig(), shared_cores=True).batch_admissions
    assert not RouterPolicy.of(RouterConfig(batch_admissions=False), shared_cores=True).batch_admissions


def test_shared_memory_copies_the_whole_kv_inside_the_call():
    """1000 bytes a token at 1 GB/s: 1 us a token. Over shared memory (CPU) a 100-token prompt's call
    takes all 100 us more; a streaming transport (GPU: CUDA IPC) shows only the last of 10 layers."""
    prof = profile(a=0.1, b=0.0)
    wl = workload(1e-4, output="1")  # no request waits for another
    cpu = predict(prof, wl, Resources(total=2, transfer_gbps=1.0), Config(1, 1, 8))
    gpu = predict(prof, wl, Resources(total=2, kind="gpu", transfer_gbps=1.0), Config(1, 1, 8))
    assert cpu.ttft_mean_s == pytest.approx(0.1 + 1e-4) and gpu.ttft_mean_s == pytest.approx(0.1 + 1e-5)


def test_bursty_arrivals_cost_attainment():
    """Gamma gaps of CV 3 at the same mean rate bunch requests: more wait, lower attainment."""
    prof, res, cfg = profile(a=0.05, b=0.001), FREE_TRANSFER, Config(1, 1, 32)
    wl = workload(5.0, ttft=0.5, tpot=1.0, samples=2000)
    gaps = np.diff(replace(wl, cv=3.0).arrivals(20_000))
    assert gaps.mean() == pytest.approx(0.2, rel=0.05) and gaps.std() / gaps.mean() == pytest.approx(3, rel=0.1)
    assert predict(prof, replace(wl, cv=3.0), res, cfg).attainment < predict(prof, wl, res, cfg).attainment


def simulate_decode(arrivals: np.ndarray, steps: int, c: float, d: float, max_batch: int):
    """An independent reference: one decode worker step by step; requests join at step boundaries (up to the
    max batch, FIFO), each step takes c + d * batch. Returns each request's TPOT."""
    n = len(arrivals)
    now, nxt, running, waiting, tpots = 0.0, 0, [], [], []
    while nxt < n or running or waiting:
        while nxt < n and arrivals[nxt] <= now:
            waiting.append(arrivals[nxt])
            nxt += 1
        while waiting and len(running) < max_batch:
            running.append([waiting.pop(0), steps])
        if not running:
            now = arrivals[nxt]
            continue
        now += c + d * len(running)
        for r in running:
            r[1] -= 1
        tpots += [(now - r[0]) / steps for r in running if r[1] == 0]
        running = [r for r in running if r[1] > 0]
    return np.array(tpots)


@pytest.mark.parametrize("rate,max_batch", [(1.0, 8), (3.0, 16), (6.0, 8)])
def test_decode_matches_an_independent_step_simulation(rate, max_batch):
    """Free prefill: each request decodes from its arrival. Every TPOT equals the reference's (the last
    rate overloads the max batch of 8, so requests also wait for a slot)."""
    arrivals = np.cumsum(np.random.default_rng(0).exponential(1 / rate, 3000))
    sim = run(times(c=0.05, d=0.01), arrivals, [100] * 3000, [11] * 3000, max_batch=max_batch)
    assert np.sort(sim.tpot_s) == pytest.approx(np.sort(simulate_decode(arrivals, 10, 0.05, 0.01, max_batch)))


def test_router_policy_defaults_are_the_routers():
    from router.router import RouterConfig

    assert RouterPolicy.of(RouterConfig()) == RouterPolicy()
    assert RouterPolicy.of(RouterConfig(max_prefill_tokens=512)).max_prefill_tokens == 512


# ---- predictions ------------------------------------------------------------------------------------
def test_batching_raises_the_rate_a_prefill_worker_sustains():
    """A call's fixed cost dominates short prompts (50 ms + 0.1 ms/token, 50 tokens): one prompt per call
    saturates near 1 / 55 ms = 18 req/s; the router's packed calls sustain well above that."""
    prof, res, cfg = profile(a=0.05, b=0.0001, c=0.0, d=0.0), FREE_TRANSFER, Config(1, 1, 64)
    wl = workload(1.0, prompt="50", output="2", ttft=0.5, tpot=1.0, samples=2000)
    single = max_rate(prof, wl, res, cfg, policy=ONE_PROMPT_PER_CALL)
    packed = max_rate(prof, wl, res, cfg)
    assert 0.5 / 0.055 < single < 1 / 0.055 and packed > 1.5 * single
    p = predict(prof, replace(wl, rate_rps=packed), res, cfg)
    assert p.prefill_batch > 1.5 and p.attainment >= 0.9


def test_prefill_heavy_profile_gets_more_prefill_workers():
    heavy = profile(b=0.01, c=0.001, d=0.0001)  # prefill 1 s per request, decode ~1 ms per step
    ranked = search(heavy, workload(1.5, tpot=0.1, ttft=5.0), Resources(total=4, transfer_gbps=0))
    # 1 prefill worker: 1.5 s of prefill work per second, unstable even with full calls
    assert ranked[0].config.prefill_workers >= 2 and ranked[0].config.decode_workers == 1, ranked[0]
    assert ranked[0].attainment > 0.9 and ranked[0].limiting_stage == "prefill"
    one_prefill = [p for p in ranked if p.config.prefill_workers == 1]
    assert one_prefill and all(not p.stable and p.attainment == 0 for p in one_prefill)


def test_decode_heavy_profile_gets_more_decode_workers():
    heavy = profile(b=0.0001, c=0.05, d=0.02)  # prefill 10 ms; a decode step 50 ms + 20 ms per sequence
    # TPOT 100 ms allows about two sequences per step: 4 req/s * 10 steps needs several decode workers
    ranked = search(heavy, workload(4.0, tpot=0.1, ttft=5.0), Resources(total=4, transfer_gbps=0))
    assert ranked[0].config.prefill_workers == 1 and ranked[0].config.decode_workers == 3, ranked[0]
    assert ranked[0].limiting_stage == "decode"
    by_decode = {p.config.decode_workers: p.tpot_attainment for p in ranked if p.config.prefill_workers == 1}
    assert by_decode[1] < by_decode[2] < by_decode[3]


def test_overload_is_unstable_with_zero_attainment(tmp_path, capsys):
    ranked = search(profile(), workload(50.0), Resources(total=4, transfer_gbps=0))
    assert all(not p.stable and p.attainment == 0 and p.goodput_rps(50.0) == 0 for p in ranked)
    text = render(profile(), workload(50.0), Resources(total=4, transfer_gbps=0), ranked, with_max_rate=False)
    assert "UNSTABLE" in text and "no configuration" in text
    profile().save(tmp_path / "p.json")  # the command says so too, and its JSON stays strict (no Infinity)
    assert main(["plan", "--profile", str(tmp_path / "p.json"), "--rate", "50", "--prompt-len", "100",
                 "--output-len", "11", "--cpus", "4", "--json", str(tmp_path / "plan.json")]) == 0
    assert "UNSTABLE: prefill load" in capsys.readouterr().out
    plan = json.loads((tmp_path / "plan.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert all(p["prefill_wait_s"] is None and p["attainment"] == 0 and not p["stable"] for p in plan["predictions"])


def test_max_rate_is_the_edge_of_90_percent():
    prof, wl, res, cfg = profile(), workload(1.0), FREE_TRANSFER, Config(1, 1, 16)
    r = max_rate(prof, wl, res, cfg)
    assert 0 < r < 1.0  # 100-token prompts at 10 ms/token: prefill saturates at 1 req/s
    assert predict(prof, replace(wl, rate_rps=r), res, cfg).attainment >= 0.9
    assert predict(prof, replace(wl, rate_rps=r * 1.01), res, cfg).attainment < 0.9


def test_fits_move_toward_their_busy_fit_by_the_share():
    solo, busy = DecodeFit(0.04, 0.002, 1e-6), DecodeFit(0.06, 0.004, 3e-6)
    assert solo.toward(busy, 0.5) == DecodeFit(pytest.approx(0.05), pytest.approx(0.003), pytest.approx(2e-6))
    assert solo.toward(None, 1.0) == solo and solo.toward(busy, 0.0) == solo
    assert PrefillFit(0.01, 0.001).toward(PrefillFit(0.03, 0.002), 2.0) == PrefillFit(  # two busy neighbours
        pytest.approx(0.05), pytest.approx(0.003))


def test_workers_on_separate_devices_ignore_the_busy_fits():
    solo = profile(c=0.02, d=0.005)
    with_busy = replace(solo, decode_busy=DecodeFit(0.06, 0.015, 0.0), prefill_busy=PrefillFit(0.5, 0.02))
    separate = Resources(total=2, transfer_gbps=0, shared=False)
    assert predict(with_busy, workload(0.5), separate, Config(1, 1, 8)) == predict(solo, workload(0.5), separate,
                                                                                     Config(1, 1, 8))
    shared = Resources(total=2, transfer_gbps=0)
    assert predict(with_busy, workload(0.5), shared, Config(1, 1, 8)).tpot_mean_s > predict(
        solo, workload(0.5), shared, Config(1, 1, 8)).tpot_mean_s
    assert not Resources(total=2, kind="gpu").interfere and Resources(total=2).interfere


def test_fits_recover_known_coefficients():
    def call(n, t):
        return 0.05 + 0.001 * t + 1e-6 * t * t / n

    # the 16-token call sits at the floor (the line says 0.066): it sets the floor, not the line
    pf = fit_prefill([(1, 16, 0.09)] + [(n, t, call(n, t)) for n, t in ((1, 64), (1, 256), (4, 256), (16, 1024))])
    assert (pf.a_s, pf.b_s_per_token) == (pytest.approx(0.05), pytest.approx(0.001))
    assert pf.g_s_per_token2 == pytest.approx(1e-6) and pf.floor_s == pytest.approx(0.09)
    assert fit_prefill([(1, t, 0.02 + 0.001 * t) for t in (16, 64, 256)]).floor_s == pytest.approx(0.036)
    dc = fit_decode([(b, c, 0.01 + 0.002 * b + 1e-6 * b * c) for b in (1, 4, 16) for c in (32, 128)])
    assert dc.c_s == pytest.approx(0.01) and dc.d_s_per_seq == pytest.approx(0.002)
    assert dc.e_s_per_seq_token == pytest.approx(1e-6)
    # noise that makes a slope negative: that term is dropped, never a negative time per token
    noisy = fit_prefill([(1, 16, 0.30), (1, 64, 0.28), (1, 128, 0.29)])
    assert noisy.b_s_per_token == 0 and noisy.a_s == pytest.approx(0.29)


def test_profile_json_round_trip(tmp_path):
    p = StageProfile(PrefillFit(0.01, 0.0002, 1e-8, 0.1), DecodeFit(0.02, 0.001, 1e-7), kv_bytes_per_token=4608,
                     num_layers=30, threads=2, description="x", prefill_points=((1, 16, 0.1), (4, 256, 0.2)),
                     decode_points=((1, 32, 0.03),))
    p.save(tmp_path / "p.json")
    assert StageProfile.load(tmp_path / "p.json") == p
    busy = replace(p, prefill_busy=PrefillFit(0.02, 0.0003, 0.0, 0.2), decode_busy=DecodeFit(0.03, 0.002, 2e-7),
                   prefill_busy_points=((1, 16, 0.2),), decode_busy_points=((1, 32, 0.05),))
    busy.save(tmp_path / "busy.json")
    assert StageProfile.load(tmp_path / "busy.json") == busy
    old = json.loads(p.to_json())
    old["version"] = 1  # written before the busy-neighbour fits existed: still read
    for k in ("prefill_busy", "decode_busy", "prefill_busy_points", "decode_busy_points"):
        del old[k]
    old["prefill"] = {"a_s": 0.01, "b_s_per_token": 0.0002}  # and before packed calls: single prompts
    old["prefill_points"] = [[16, 0.1], [64, 0.2]]
    (tmp_path / "v1.json").write_text(json.dumps(old))
    assert StageProfile.load(tmp_path / "v1.json") == replace(
        p, prefill=PrefillFit(0.01, 0.0002, 0.0, 0.1), prefill_points=((1, 16, 0.1), (1, 64, 0.2)))
    (tmp_path / "bad.json").write_text('{"version": 99}')
    with pytest.raises(ValueError, match="profile"):
        StageProfile.load(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text('{"version": 1, "prefill": {"a_s": 0}}')
    with pytest.raises(ValueError, match="malformed pdserve plan profile"):
        StageProfile.load(tmp_path / "bad.json")


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    prof = tmp_path / "p.json"
    profile().save(prof)
    assert main(["plan", "--profile", str(prof), "--prompt-len", "50:10"]) == 2
    assert "low <= high" in capsys.readouterr().err
    assert main(["plan", "--profile", str(prof), "--cpus", "1"]) == 2
    assert "cannot hold one prefill and one decode worker" in capsys.readouterr().err
    with pytest.raises(ValueError):
        Resources(total=2, kind="tpu")


def test_plan_quick_end_to_end(tiny_models, tmp_path, capsys):
    """Profiles a real (tiny) model in-process, writes the profile, then plans again from it alone."""
    out = tmp_path / "profile.json"
    assert main(["plan", "--quick", "--model", str(tiny_models["llama"]), "--dtype", "float32", "--device", "cpu",
                 "--cpus", "3", "--rate", "2", "--prompt-len", "16:128", "--output-len", "4:32",
                 "--profile-out", str(out), "--json", str(tmp_path / "plan.json")]) == 0
    first = capsys.readouterr().out
    assert "recommended:" in first and ("limiting stage" in first or "no configuration" in first)
    assert ("note: extrapolated beyond the profile (prefill calls pack up to 2048 tokens, profiled up to 128; "
            "contexts up to 160 tokens, decode profiled up to 96)") in first
    prof = StageProfile.load(out)
    assert [(n, t) for n, t, _ in prof.prefill_points] == [(1, 16), (1, 64), (1, 128), (4, 128)]
    assert len(prof.decode_points) == 4
    # on CPU cores the workers share a node: each stage was timed again beside a busy neighbour process
    assert [p[:2] for p in prof.prefill_busy_points] == [p[:2] for p in prof.prefill_points]
    assert [p[:2] for p in prof.decode_busy_points] == [p[:2] for p in prof.decode_points]
    assert prof.prefill_busy is not None and prof.decode_busy is not None
    assert "beside a busy prefill neighbour" in first
    assert all(s > 0 for *_, s in prof.prefill_points) and prof.threads == 1
    assert prof.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4  # layers * K,V * kv heads * head dim * fp32
    import json

    plan = json.loads((tmp_path / "plan.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert {(p["config"]["prefill_workers"], p["config"]["decode_workers"]) for p in plan["predictions"]} == {
        (1, 1), (1, 2), (2, 1)}  # 3 cores, 1 each
    assert plan["colocated"]["workers"] == 3 and "which mode:" in first  # --mode colocated on the same 3 cores
    # from the profile alone (the model path does not exist: nothing is loaded), same samples: same answer
    assert main(["plan", "--quick", "--profile", str(out), "--model", str(tmp_path / "absent"), "--cpus", "3",
                 "--rate", "2", "--prompt-len", "16:128", "--output-len", "4:32"]) == 0
    again = capsys.readouterr().out
    assert again.splitlines()[-6:] == first.splitlines()[-6:]
    assert np.isfinite(prof.prefill.a_s) and np.isfinite(prof.decode.c_s)


def test_profile_sizes_stay_within_the_models_positions(tiny_models):
    """The tiny model has 512 positions: larger sizes are clamped, and the points record what was timed."""
    from engine.config import EngineConfig
    from engine.runner import ModelRunner
    from pdserve.plan.profile import ProfileSizes, measure

    runner = ModelRunner(EngineConfig(model=str(tiny_models["llama"]), dtype="float32", device="cpu"))
    prof = measure(runner, ProfileSizes(prefill_tokens=(8, 600), prefill_packed=((2, 600),), decode_batches=(2,),
                                        decode_contexts=(8, 600), repeats=1), threads=1)
    assert [(n, t) for n, t, _ in prof.prefill_points] == [(1, 8), (1, 512), (2, 1024)]
    assert [(b, c) for b, c, _ in prof.decode_points] == [(2, 8), (2, 510)]
    assert all(s > 0 for *_, s in prof.decode_points)


def test_a_neighbour_that_cannot_start_says_why_and_is_gone(tmp_path):
    from engine.config import EngineConfig
    from pdserve.plan.neighbour import Neighbour
    from pdserve.plan.profile import QUICK_SIZES

    other = Neighbour(EngineConfig(model=str(tmp_path / "absent"), dtype="float32", device="cpu"), 1, QUICK_SIZES)
    with pytest.raises(RuntimeError, match=r"neighbour process did not start 'idle': it exited with code 1"):
        other.__enter__()  # what `with other:` runs first
    assert other._proc.poll() == 1


def test_loguniform_prompts_as_bench_serve_draws_them():
    dist = LengthDist.parse("16:256", "loguniform")
    draw = dist.sample(np.random.default_rng(0), 20_000)
    assert draw.min() >= 16 and draw.max() <= 256 and str(dist) == "16:256 loguniform"
    assert draw.mean() == pytest.approx((256 - 16) / math.log(16), rel=0.03)  # the log-uniform mean
    assert (draw < 64).mean() == pytest.approx(0.5, abs=0.02)  # as many from 16 to 64 as from 64 to 256
    with pytest.raises(ValueError, match="one of uniform, loguniform"):
        LengthDist(1, 2, "normal")


def test_an_overloaded_split_shows_the_max_batch_closest_to_keeping_up():
    """Prefill overloaded whatever the max batch: the row shown is not the smallest max batch (whose decode
    is overloaded too) but the one whose decode keeps up."""
    ranked = search(profile(b=0.02, c=0.05, d=0.001), workload(2.0, output="101"), Resources(total=2, transfer_gbps=0),
                    max_batches=(2, 64))
    assert ranked[0].attainment == 0 and ranked[0].prefill_load >= 1
    assert ranked[0].config.max_batch == 64 and ranked[0].decode_util < 1


# ---- --mode colocated ---------------------------------------------------------------------------------
def colocated(t: StageTimes, arrivals, prompts, outputs, workers=1, max_batch=8, budget=512, backlog=8):
    from pdserve.plan.colocated import simulate_colocated

    return simulate_colocated(t, np.array(arrivals, dtype=float), np.array(prompts), np.array(outputs), workers,
                              max_batch, budget, RouterPolicy(colocated_backlog=backlog))


def test_colocated_chunks_a_long_prompt_over_steps():
    """A 700-token prompt under a 512-token budget: chunks of 512 and 188 tokens, each step a prefill of its
    tokens (0.1 s + 1 ms/token); then 2 decode steps of 30 ms."""
    sim = colocated(times(a=0.1, b=0.001, c=0.02, d=0.01), [0], [700], [3])
    assert sim.ttft_s == pytest.approx([0.612 + 0.288]) and sim.tpot_s == pytest.approx([0.03])
    assert sim.prompts_per_call == 1 and sim.rows_per_step == pytest.approx(2 / 4)


def test_colocated_mixes_a_prompt_into_the_running_decode_step():
    """r0 (10-token prompt, 11 tokens out) prefills 0-0.11 and decodes alone every 30 ms; r1 (100 tokens,
    3 out) arrives at 0.12 and rides the step at 0.14 with r0's decode row: a prefill call of 100 tokens
    (0.2 s) plus the row's own cost (10 ms), so r1's first token is at 0.35. Both decode (40 ms a step)
    until r1 is done at 0.43; r0's last 6 steps run alone to 0.61."""
    sim = colocated(times(a=0.1, b=0.001, c=0.02, d=0.01), [0, 0.12], [10, 100], [11, 3])
    assert sim.ttft_s == pytest.approx([0.11, 0.23])
    assert sim.tpot_s == pytest.approx([(0.61 - 0.11) / 10, 0.04])


def test_colocated_workers_take_requests_side_by_side_and_the_router_holds_the_rest():
    same = times(a=0.1, b=0.001)
    two = colocated(same, [0, 0.001], [100, 100], [1, 1], workers=2)
    assert two.ttft_s == pytest.approx([0.2, 0.2])  # one each, no neighbours
    # one worker holding at most 1 request (max batch 1, no backlog), 8 tokens a step: 100 tokens take
    # 12 steps of 8 and one of 4 (12 * 0.108 + 0.104 = 1.4 s); the second request waits in the router
    held = colocated(same, [0, 0.001], [100, 100], [1, 1], max_batch=1, budget=8, backlog=0)
    assert held.ttft_s == pytest.approx([1.4, 2.8 - 0.001])
    assert held.prefill_wait_s == pytest.approx([0, 1.4 - 0.001])


def test_plan_compares_pd_with_colocated_on_the_same_units():
    from pdserve.plan.model import max_rate_colocated, predict_colocated, search_colocated

    prof, res = profile(a=0.03, b=0.001, c=0.03, d=0.002), Resources(total=2, transfer_gbps=0)
    wl = workload(2.0, prompt="16:256", output="16:64", ttft=2.0, tpot=0.15)
    colo = search_colocated(prof, wl, res)
    assert colo.workers == 2 and colo.batched_tokens == 512 and 0 < colo.attainment <= 1
    rate = max_rate_colocated(prof, wl, res, colo.workers, colo.max_batch)
    assert predict_colocated(prof, replace(wl, rate_rps=rate), res, 2, colo.max_batch).attainment >= 0.9
    assert predict_colocated(prof, replace(wl, rate_rps=rate * 1.01), res, 2, colo.max_batch).attainment < 0.9
    over = predict_colocated(prof, replace(wl, rate_rps=100.0), res, 2, colo.max_batch)
    assert not over.stable and over.attainment == 0
    text = render(prof, wl, res, search(prof, wl, res), colocated=colo)
    assert f"at >= 90% attainment: colocated sustains {rate:.3f} req/s" in text and "which mode:" in text


def test_which_mode_is_judged_per_unit():
    """PD's best split may leave units idle: 1P+1D sustaining 1.0 req/s on 2 of 4 cores serves more per core
    than 4 colocated workers sustaining 1.5 req/s on all 4."""
    from pdserve.plan.model import ColocatedPrediction, Prediction
    from pdserve.plan.report import compare_modes

    pd = Prediction(Config(1, 1, 8), 2.0, 0.5, 0.5, 0.5, 1.0, 0.1, 0.5, 2.0, 0.05, 1.0, 1.0, 1.0)
    colo = ColocatedPrediction(4, 8, 512, 4.0, 0.3, 0.2, 2.0, 0.4, 0.06, 1.0, 1.0, 1.0)
    lines = compare_modes(pd, colo, 1.0, 1.5, workload(0.5), Resources(total=4))
    assert "which mode: PD serves more within the SLOs per core" in lines[-1]
    assert "which mode: colocated" in compare_modes(pd, colo, 1.0, 2.2, workload(0.5), Resources(total=4))[-1]


def test_cached_prompt_tokens_are_neither_computed_nor_sent():
    """A 100-token prompt with 60 cached: the call computes 40 tokens whose attention reaches the whole
    prompt (100^2 - 60^2), and ships their KV only. Colocated: the chunk starts after the cached tokens."""
    fit = PrefillFit(0.1, 0.001, 1e-6)
    t = replace(times(), prefill=fit, exposed_transfer_s_per_token=1e-4)
    sim = simulate(t, np.array([0.0]), np.array([100]), np.array([1]), 1, 1, 8, cached=np.array([60]))
    assert sim.ttft_s == pytest.approx([0.1 + 0.04 + 1e-6 * (100 ** 2 - 60 ** 2) + 40 * 1e-4])
    colo = colocated(replace(t, exposed_transfer_s_per_token=0.0), [0], [100], [1])
    from pdserve.plan.colocated import simulate_colocated

    cached = simulate_colocated(replace(t, exposed_transfer_s_per_token=0.0), np.array([0.0]), np.array([100]),
                                np.array([1]), 1, 8, 512, cached=np.array([60]))
    assert colo.ttft_s == pytest.approx([0.1 + 0.1 + 1e-6 * 100 ** 2])
    assert cached.ttft_s == pytest.approx([0.1 + 0.04 + 1e-6 * (100 ** 2 - 60 ** 2)])
    # the workload's cached tokens stop short of each prompt's last token, which prefill always computes
    wl = replace(workload(1.0), cached_tokens=60)
    assert wl.cached(np.array([100, 40, 1])).tolist() == [60, 39, 0]
    assert predict(profile(a=0.1), wl, FREE_TRANSFER, Config(1, 1, 8)).ttft_mean_s < predict(
        profile(a=0.1), workload(1.0), FREE_TRANSFER, Config(1, 1, 8)).ttft_mean_s


def test_the_front_ends_cpu_is_taken_from_the_workers_cores():
    """A front end spending 50 ms of CPU a request at 4 req/s takes 0.2 of the 2 cores' 2: each worker keeps
    0.9 of its core, so every call and step takes 1/0.9 as long. On GPUs (the front end is on the CPU) or
    on separate nodes it takes nothing."""
    res = Resources(total=2, transfer_gbps=0, front_end_cpu_s_per_request=0.05)
    assert res.time_scale(profile(), 4.0) == pytest.approx(1 / 0.9)
    assert res.time_scale(profile(), 40.0) == math.inf  # the front end alone would fill the cores
    assert replace(res, kind="gpu").time_scale(profile(), 4.0) == 1.0
    assert replace(res, shared=False).time_scale(profile(), 4.0) == 1.0
    wl = workload(4.0, output="1")
    fast = predict(profile(a=0.1, b=0.0), replace(wl, rate_rps=1e-4), replace(res, front_end_cpu_s_per_request=0.0),
                   Config(1, 1, 8))
    slowed = predict(profile(a=0.1, b=0.0), replace(wl, rate_rps=1e-4), replace(res, front_end_cpu_s_per_request=500.0),
                     Config(1, 1, 8))  # 1e-4 req/s * 500 s = 0.05 cores of 2
    assert fast.ttft_mean_s == pytest.approx(0.1) and slowed.ttft_mean_s == pytest.approx(0.1 / (1 - 0.025))
