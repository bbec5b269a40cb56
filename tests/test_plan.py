"""`pdserve plan`: the queueing arithmetic on hand-made profiles with answers worked out by hand, the
search's direction (more prefill workers when prefill dominates, more decode workers when decode
does), unstable loads, the profile's JSON round trip, and the command end to end on a real model."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from pdserve.cli import main
from pdserve.observability.metrics import SLO
from pdserve.plan.model import Config, LengthDist, Resources, Workload, max_rate, md1_wait, mg1_wait, predict, search
from pdserve.plan.profile import DecodeFit, PrefillFit, StageProfile, fit_decode, fit_prefill
from pdserve.plan.report import render


def profile(a=0.0, b=0.01, c=0.05, d=0.01, e=0.0, threads=1) -> StageProfile:
    return StageProfile(PrefillFit(a, b), DecodeFit(c, d, e), kv_bytes_per_token=1000, num_layers=10,
                        threads=threads, description="hand-made")


def workload(rate, prompt="100", output="11", ttft=2.0, tpot=0.08) -> Workload:
    return Workload(rate, LengthDist.parse(prompt), LengthDist.parse(output), SLO(ttft_s=ttft, tpot_s=tpot),
                    samples=400)


FREE_TRANSFER = Resources(total=2, transfer_gbps=0)


def test_queue_formulas_by_hand():
    # M/D/1, rho = 0.5, S = 1 s: Wq = rho * S / (2 (1 - rho)) = 0.5 s
    assert md1_wait(0.5, 1.0) == pytest.approx(0.5)
    # P-K with a deterministic service (E[S^2] = S^2) is M/D/1
    assert mg1_wait(0.5, 1.0, 1.0) == pytest.approx(0.5)
    # P-K with exponential service (E[S^2] = 2 S^2) is M/M/1: Wq = rho / (mu - lambda) = 0.5 / 0.5 = 1 s
    assert mg1_wait(0.5, 1.0, 2.0) == pytest.approx(1.0)
    # rho = 0.8, S = 0.2 s: 0.8 * 0.2 / 0.4 = 0.4 s
    assert md1_wait(4.0, 0.2) == pytest.approx(0.4)
    assert math.isinf(md1_wait(1.0, 1.0)) and math.isinf(mg1_wait(2.0, 1.0, 1.0))


def test_prefill_model_against_a_simulated_queue():
    """The reference: a FIFO queue simulated request by request (Lindley's recursion) with Poisson arrivals
    and uniform prompt lengths. P-K's mean wait and the attainment from its tail shape must match it."""
    rng = np.random.default_rng(1)
    prof = profile(a=0.0, b=0.002)
    for rho, slo in ((0.5, 2.0), (0.8, 3.0), (0.8, 6.0)):
        service = 0.002 * rng.integers(16, 513, 60_000)
        rate = rho / service.mean()
        gaps = rng.exponential(1 / rate, len(service))
        wait = np.zeros(len(service))
        for i in range(1, len(service)):
            wait[i] = max(0.0, wait[i - 1] + service[i - 1] - gaps[i])
        p = predict(prof, Workload(rate, LengthDist(16, 512), LengthDist(1, 1), SLO(ttft_s=slo), samples=20_000),
                    FREE_TRANSFER, Config(1, 1, 8))
        assert p.prefill_wait_s == pytest.approx(wait.mean(), rel=0.1)
        assert p.ttft_attainment == pytest.approx(((wait + service) <= slo).mean(), abs=0.03)


def test_prefill_prediction_by_hand():
    # 100-token prompts at 10 ms/token: S = 1 s; 0.5 req/s on one worker: rho 0.5, M/D/1 wait 0.5 s
    p = predict(profile(), workload(0.5), FREE_TRANSFER, Config(1, 1, 8))
    assert p.prefill_util == pytest.approx(0.5)
    assert p.prefill_wait_s == pytest.approx(0.5)
    assert p.ttft_mean_s == pytest.approx(1.5)
    # slack 2 - 1 = 1 s; P(W <= 1) = 1 - rho * exp(-1 * rho / Wq) = 1 - 0.5 / e
    assert p.ttft_attainment == pytest.approx(1 - 0.5 * math.exp(-1))
    # two prefill workers halve each one's rate: rho 0.25, wait 0.25 * 1 / 1.5
    p2 = predict(profile(), workload(0.5), Resources(total=3, transfer_gbps=0), Config(2, 1, 8))
    assert p2.prefill_util == pytest.approx(0.25) and p2.prefill_wait_s == pytest.approx(1 / 6)


def test_transfer_adds_the_last_layers_share():
    # 100 tokens * 1000 bytes / 1 GB/s / 10 layers = 10 us
    with_t = predict(profile(), workload(0.5), Resources(total=2, transfer_gbps=1.0), Config(1, 1, 8))
    assert with_t.ttft_mean_s == pytest.approx(1.5 + 1e-5)


def poisson_cdf(mean: float, most: int) -> float:
    return sum(math.exp(-mean) * mean ** n / math.factorial(n) for n in range(most + 1))


def test_decode_prediction_by_hand():
    # 11 output tokens: 10 decode steps each; 1 req/s; step t(B) = 0.05 + 0.01 B
    # Little: N = 1 * 10 * t(1 + N)  ->  N = 0.6 / 0.9 others on average
    p = predict(profile(), workload(1.0, tpot=0.09), FREE_TRANSFER, Config(1, 1, 8))
    others = 0.6 / 0.9
    assert p.decode_batch == pytest.approx(others)
    assert p.tpot_mean_s == pytest.approx((0.05 + 0.01 * (1 + others)) * 10.5 / 10)  # + half a step to join
    assert p.decode_util == pytest.approx(10 * (0.05 + 0.08) / 8)  # rate * steps * t(8) / 8
    # TPOT SLO 90 ms: t(n + 1) * 10.5 / 10 <= 0.09 for n <= 2 others
    assert p.tpot_attainment == pytest.approx(poisson_cdf(others, 2))
    # a max batch of 2 also turns away a request that finds 2 already running: n <= 1
    p2 = predict(profile(), workload(1.0, tpot=0.09), FREE_TRANSFER, Config(1, 1, 2))
    assert p2.tpot_attainment == pytest.approx(poisson_cdf(others, 1))


def simulate_decode(rate: float, steps: int, c: float, d: float, max_batch: int, n: int):
    """One decode worker, step by step: Poisson arrivals join at step boundaries (up to the max batch, FIFO),
    each step takes c + d * batch. Returns the time-averaged batch and each request's TPOT."""
    rng = np.random.default_rng(0)
    arrivals = np.cumsum(rng.exponential(1 / rate, n))
    now, nxt, running, waiting, area, tpots = 0.0, 0, [], [], 0.0, []
    while nxt < n or running or waiting:
        while nxt < n and arrivals[nxt] <= now:
            waiting.append(arrivals[nxt])
            nxt += 1
        while waiting and len(running) < max_batch:
            running.append([waiting.pop(0), steps])
        if not running:
            now = arrivals[nxt]
            continue
        dt = c + d * len(running)
        area, now = area + dt * len(running), now + dt
        for r in running:
            r[1] -= 1
        tpots += [(now - r[0]) / steps for r in running if r[1] == 0]
        running = [r for r in running if r[1] > 0]
    return area / now, np.array(tpots)


@pytest.mark.parametrize("rate,slo,max_batch", [(1.0, 0.08, 8), (2.0, 0.1, 16), (3.0, 0.15, 32)])
def test_decode_model_against_a_simulated_batcher(rate, slo, max_batch):
    """The reference for the decode model: the mean batch (Little's law) agrees with a step-by-step
    simulation, the mean TPOT within a few percent, and the TPOT attainment errs on the safe side."""
    batch, tpots = simulate_decode(rate, 10, 0.05, 0.01, max_batch, 4000)
    p = predict(profile(), workload(rate, tpot=slo), FREE_TRANSFER, Config(1, 1, max_batch))
    assert p.decode_batch == pytest.approx(batch, rel=0.05)
    assert p.tpot_mean_s == pytest.approx(tpots.mean(), rel=0.06)
    simulated = (tpots <= slo).mean()
    assert simulated - 0.1 <= p.tpot_attainment <= simulated + 0.02


def test_prefill_heavy_profile_gets_more_prefill_workers():
    heavy = profile(b=0.01, c=0.001, d=0.0001)  # prefill 1 s per request, decode ~1 ms per step
    ranked = search(heavy, workload(1.5, tpot=0.1, ttft=5.0), Resources(total=4, transfer_gbps=0))
    # 1 prefill worker: rho 1.5, unstable. 2: rho 0.75, Wq = 0.75 / 0.5 = 1.5 s, slack 4 s,
    # attainment 1 - 0.75 exp(-4 * 0.75 / 1.5); 3 prefill workers attain more but less per core.
    assert ranked[0].config == Config(2, 1, 8), ranked[0]
    assert ranked[0].attainment == pytest.approx(1 - 0.75 * math.exp(-2))
    one_prefill = [p for p in ranked if p.config.prefill_workers == 1]
    assert one_prefill and all(not p.stable and p.attainment == 0 for p in one_prefill)  # rho 1.5


def test_decode_heavy_profile_gets_more_decode_workers():
    heavy = profile(b=0.0001, c=0.05, d=0.02)  # prefill 10 ms; a decode step 50 ms + 20 ms per sequence
    # TPOT 100 ms: t(n + 1) * 10.5 / 10 <= 0.1 admits n <= 1 others. 4 req/s * 10 steps over M decode
    # workers, N = 40/M * 0.07 / (1 - 40/M * 0.02): M=1: 14, M=2: 2.33, M=3: 1.27 others on average
    ranked = search(heavy, workload(4.0, tpot=0.1, ttft=5.0), Resources(total=4, transfer_gbps=0))
    assert ranked[0].config.prefill_workers == 1 and ranked[0].config.decode_workers == 3, ranked[0]
    assert ranked[0].tpot_attainment == pytest.approx(poisson_cdf((40 / 3 * 0.07) / (1 - 40 / 3 * 0.02), 1))
    assert ranked[0].limiting_stage == "decode"


def test_overload_is_unstable_with_zero_attainment(tmp_path, capsys):
    ranked = search(profile(), workload(50.0), Resources(total=4, transfer_gbps=0))
    assert all(not p.stable and p.attainment == 0 and p.goodput_rps(50.0) == 0 for p in ranked)
    text = render(profile(), workload(50.0), Resources(total=4, transfer_gbps=0), ranked, with_max_rate=False)
    assert "UNSTABLE" in text and "no configuration" in text
    profile().save(tmp_path / "p.json")  # the command says so too, and its JSON stays strict (no Infinity)
    assert main(["plan", "--profile", str(tmp_path / "p.json"), "--rate", "50", "--prompt-len", "100",
                 "--output-len", "11", "--cpus", "4", "--json", str(tmp_path / "plan.json")]) == 0
    assert "UNSTABLE: prefill rho" in capsys.readouterr().out
    import json

    plan = json.loads((tmp_path / "plan.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert all(p["prefill_wait_s"] is None and p["attainment"] == 0 and not p["stable"] for p in plan["predictions"])


def test_max_rate_is_the_edge_of_90_percent():
    prof, wl, res, cfg = profile(), workload(1.0), FREE_TRANSFER, Config(1, 1, 16)
    r = max_rate(prof, wl, res, cfg)
    assert 0 < r < 1.0  # prefill saturates at 1 req/s
    from dataclasses import replace

    assert predict(prof, replace(wl, rate_rps=r), res, cfg).attainment >= 0.9
    assert predict(prof, replace(wl, rate_rps=r * 1.01), res, cfg).attainment < 0.9


def test_fits_move_toward_their_busy_fit_by_the_share():
    solo, busy = DecodeFit(0.04, 0.002, 1e-6), DecodeFit(0.06, 0.004, 3e-6)
    assert solo.toward(busy, 0.5) == DecodeFit(pytest.approx(0.05), pytest.approx(0.003), pytest.approx(2e-6))
    assert solo.toward(None, 1.0) == solo and solo.toward(busy, 0.0) == solo
    assert PrefillFit(0.01, 0.001).toward(PrefillFit(0.03, 0.002), 2.0) == PrefillFit(  # two busy neighbours
        pytest.approx(0.05), pytest.approx(0.003))


def test_a_busy_neighbour_slows_a_stage_by_how_busy_it_is():
    """Prefill-only neighbour fit absent, so prefill keeps its solo times: rho = 0.5 exactly (100 tokens at
    10 ms = 1 s, 0.5 req/s). The decode worker then sees half a busy neighbour: its fit is halfway to the
    busy one, which is what a solo profile with that fit predicts."""
    solo = profile(c=0.02, d=0.005)
    with_busy = replace(solo, decode_busy=DecodeFit(0.06, 0.015, 0.0))
    shared, separate = Resources(total=2, transfer_gbps=0), Resources(total=2, transfer_gbps=0, shared=False)
    p = predict(with_busy, workload(0.5), shared, Config(1, 1, 8))
    assert p.prefill_util == pytest.approx(0.5)
    halfway = predict(replace(solo, decode=DecodeFit(0.04, 0.01, 0.0)), workload(0.5), shared, Config(1, 1, 8))
    assert p.tpot_mean_s == pytest.approx(halfway.tpot_mean_s) and p.decode_batch == pytest.approx(halfway.decode_batch)
    assert p.tpot_mean_s > predict(solo, workload(0.5), shared, Config(1, 1, 8)).tpot_mean_s
    # workers that do not share a device (whole GPUs by default) ignore the busy fits
    assert predict(with_busy, workload(0.5), separate, Config(1, 1, 8)) == predict(solo, workload(0.5), separate,
                                                                                     Config(1, 1, 8))
    assert not Resources(total=2, kind="gpu").interfere and Resources(total=2).interfere


def test_both_stages_slowed_by_each_other_reach_a_fixed_point():
    """Prefill slows decode and decode slows prefill: the prediction's utilisations must be the ones its own
    blended fits give back (a solo profile with exactly those fits predicts the same), and a busy fit
    measured faster than solo (noise) must not speed a stage up."""
    import math

    solo = profile(a=0.0, b=0.006, c=0.02, d=0.005)
    both = replace(solo, prefill_busy=PrefillFit(0.01, 0.009), decode_busy=DecodeFit(0.05, 0.012, 0.0))
    res, cfg = Resources(total=2, transfer_gbps=0), Config(1, 1, 64)
    p = predict(both, workload(1.0), res, cfg)
    busy_d = 1 - math.exp(-p.decode_batch)
    fixed = replace(solo, prefill=solo.prefill.toward(both.prefill_busy, busy_d),
                    decode=solo.decode.toward(both.decode_busy, p.prefill_util))
    q = predict(fixed, workload(1.0), res, cfg)
    assert p.prefill_util == pytest.approx(q.prefill_util, rel=1e-6)
    assert p.decode_batch == pytest.approx(q.decode_batch, rel=1e-6) and p.tpot_mean_s == pytest.approx(q.tpot_mean_s)
    assert p.prefill_util > predict(solo, workload(1.0), res, cfg).prefill_util  # both really fed back
    faster = replace(solo, prefill_busy=PrefillFit(0.0, 0.003), decode_busy=DecodeFit(0.01, 0.001, 0.0))
    assert predict(faster, workload(1.0), res, cfg) == predict(solo, workload(1.0), res, cfg)


def test_fits_recover_known_coefficients():
    pf = fit_prefill([(t, 0.02 + 0.001 * t) for t in (16, 64, 256)])
    assert (pf.a_s, pf.b_s_per_token) == (pytest.approx(0.02), pytest.approx(0.001))
    dc = fit_decode([(b, c, 0.01 + 0.002 * b + 1e-6 * b * c) for b in (1, 4, 16) for c in (32, 128)])
    assert dc.c_s == pytest.approx(0.01) and dc.d_s_per_seq == pytest.approx(0.002)
    assert dc.e_s_per_seq_token == pytest.approx(1e-6)
    # noise that makes a slope negative: that term is dropped, never a negative time per token
    noisy = fit_prefill([(16, 0.30), (64, 0.28), (128, 0.29)])
    assert noisy.b_s_per_token == 0 and noisy.a_s == pytest.approx(0.29)


def test_profile_json_round_trip(tmp_path):
    p = StageProfile(PrefillFit(0.01, 0.0002), DecodeFit(0.02, 0.001, 1e-7), kv_bytes_per_token=4608,
                     num_layers=30, threads=2, description="x", prefill_points=((16, 0.1), (64, 0.2)),
                     decode_points=((1, 32, 0.03),))
    p.save(tmp_path / "p.json")
    assert StageProfile.load(tmp_path / "p.json") == p
    busy = replace(p, prefill_busy=PrefillFit(0.02, 0.0003), decode_busy=DecodeFit(0.03, 0.002, 2e-7),
                   prefill_busy_points=((16, 0.2),), decode_busy_points=((1, 32, 0.05),))
    busy.save(tmp_path / "busy.json")
    assert StageProfile.load(tmp_path / "busy.json") == busy
    old = json.loads(p.to_json())
    old["version"] = 1  # written before the busy-neighbour fits existed: still read
    for k in ("prefill_busy", "decode_busy", "prefill_busy_points", "decode_busy_points"):
        del old[k]
    (tmp_path / "v1.json").write_text(json.dumps(old))
    assert StageProfile.load(tmp_path / "v1.json") == p
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
    assert "note: extrapolated beyond the profile (contexts up to 160 tokens, decode profiled up to 96)" in first
    prof = StageProfile.load(out)
    assert len(prof.prefill_points) == 3 and len(prof.decode_points) == 4
    # on CPU cores the workers share a node: each stage was timed again beside a busy neighbour process
    assert [t for t, _ in prof.prefill_busy_points] == [t for t, _ in prof.prefill_points]
    assert [p[:2] for p in prof.decode_busy_points] == [p[:2] for p in prof.decode_points]
    assert prof.prefill_busy is not None and prof.decode_busy is not None
    assert "beside a busy prefill neighbour" in first
    assert all(s > 0 for _, s in prof.prefill_points) and prof.threads == 1
    assert prof.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4  # layers * K,V * kv heads * head dim * fp32
    import json

    plan = json.loads((tmp_path / "plan.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert {(p["config"]["prefill_workers"], p["config"]["decode_workers"]) for p in plan["predictions"]} == {
        (1, 1), (1, 2), (2, 1)}  # 3 cores, 1 each
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
    prof = measure(runner, ProfileSizes(prefill_tokens=(8, 600), decode_batches=(2,), decode_contexts=(8, 600),
                                        repeats=1), threads=1)
    assert [t for t, _ in prof.prefill_points] == [8, 512]
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
