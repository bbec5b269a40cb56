"""The planner's explanation: the table of configurations, the recommendation, and why."""

from __future__ import annotations

import math

from pdserve.plan.model import ColocatedPrediction, Prediction, Resources, Workload, max_rate, max_rate_colocated
from pdserve.plan.profile import StageProfile
from pdserve.plan.simulate import ROUTER_DEFAULTS, RouterPolicy


def _ms(s: float) -> str:
    return "inf" if math.isinf(s) else f"{s * 1e3:.0f}"


def describe_profile(p: StageProfile) -> list[str]:
    pf, dc = p.prefill, p.decode
    return [f"profile: {p.description or '(no description)'}; {p.threads} torch thread(s)",
            f"  prefill  t = {pf.a_s * 1e3:.2f} ms + {pf.b_s_per_token * 1e3:.4f} ms/token "
            f"({1 / pf.b_s_per_token if pf.b_s_per_token else math.inf:.0f} tokens/s at scale)",
            f"  decode   t = {dc.c_s * 1e3:.2f} ms + {dc.d_s_per_seq * 1e3:.4f} ms/seq "
            f"+ {dc.e_s_per_seq_token * 1e6:.4f} us/(seq*context token)"] + _busy_lines(p)


def _busy_lines(p: StageProfile) -> list[str]:
    """The busy-neighbour fits as the slowdown they mean at a typical size."""
    lines = []
    n, b, c = 128, 16, 256
    if p.prefill_busy is not None and p.prefill.time(n) > 0:
        lines.append(f"  beside a busy decode neighbour: prefill of {n} tokens "
                     f"x{p.prefill_busy.time(n) / p.prefill.time(n):.2f}")
    if p.decode_busy is not None and p.decode.time(b, c) > 0:
        lines.append(f"  beside a busy prefill neighbour: decode step of {b} x {c} tokens "
                     f"x{p.decode_busy.time(b, c) / p.decode.time(b, c):.2f}")
    return lines


def render(profile: StageProfile, workload: Workload, resources: Resources, ranked: list[Prediction],
           with_max_rate: bool = True, colocated: ColocatedPrediction | None = None,
           policy: RouterPolicy = ROUTER_DEFAULTS) -> str:
    rate = workload.rate_rps
    unit = "core" if resources.kind == "cpu" else "GPU"
    lines = describe_profile(profile) + [
        f"workload: {rate:g} req/s Poisson, prompt {workload.prompt} tokens, output {workload.output} tokens; "
        f"SLO TTFT {workload.slo.ttft_s:g} s, TPOT {workload.slo.tpot_s:g} s"
        + (f"; {workload.cached_tokens:g} prompt tokens a request cached" if workload.cached_tokens else ""),
        f"resources: {resources.total:g} {unit}s, {resources.per_worker:g} per worker; KV transfer "
        + (f"{resources.transfer_gbps:g} GB/s" if resources.transfer_gbps > 0 else "not modelled"),
        "",
        f"{'P':>2} {'D':>2} {'max batch':>9} {'busy P':>6} {'load D':>6} {'TTFT ms':>8} {'TPOT ms':>8} "
        f"{'batch':>6} {'TTFT ok':>8} {'TPOT ok':>8} {'attain':>7} {'goodput/' + unit:>13}"
        + (f" {'rate@90%/' + unit:>14}" if with_max_rate else "")]
    rates = [max_rate(profile, workload, resources, p.config, policy=policy) if with_max_rate else 0.0
             for p in ranked]
    for p, r90 in zip(ranked, rates):
        c = p.config
        row = (f"{c.prefill_workers:>2} {c.decode_workers:>2} {c.max_batch:>9} {p.prefill_util:>6.2f} "
               f"{p.decode_util:>6.2f} {_ms(p.ttft_mean_s):>8} {_ms(p.tpot_mean_s):>8} {p.decode_batch:>6.1f} "
               f"{p.ttft_attainment:>8.1%} {p.tpot_attainment:>8.1%} {p.attainment:>7.1%} "
               f"{p.goodput_rps(rate) / p.units:>13.3f}")
        if with_max_rate:
            row += f" {r90 / p.units:>14.3f}"
        lines.append(row + ("" if p.stable else "  UNSTABLE: " + _unstable(p)))
    lines += [""] + explain(ranked[0], workload, resources)
    if with_max_rate:
        r90, p = max(zip(rates, ranked), key=lambda x: (x[0] / x[1].units, -x[1].units))
        c = p.config
        lines.append(f"  headroom (DistServe's measure): {c.prefill_workers}P+{c.decode_workers}D at max batch "
                     f"{c.max_batch} sustains the most rate per {unit} at >= 90% attainment, "
                     f"{r90:.3f} req/s ({r90 / p.units:.3f} per {unit}); the recommendation serves "
                     f"{rates[0]:.3f} req/s at >= 90%")
    if colocated is not None:
        pd_rate = rates[0] if with_max_rate else None
        colo_rate = (max_rate_colocated(profile, workload, resources, colocated.workers, colocated.max_batch,
                                        colocated.batched_tokens, policy=policy) if with_max_rate else None)
        lines += [""] + compare_modes(ranked[0], colocated, pd_rate, colo_rate, workload, resources)
    lines += extrapolation(profile, workload, policy)
    return "\n".join(lines)


def _unstable(p: Prediction) -> str:
    parts = []
    if p.prefill_load >= 1:
        parts.append(f"prefill load {p.prefill_load:.2f} >= 1 even with full calls")
    if p.decode_util >= 1:
        parts.append(f"decode load {p.decode_util:.2f} of capacity at max batch {p.config.max_batch}")
    return ", ".join(parts) + ": queues grow without bound, attainment 0"


def explain(best: Prediction, workload: Workload, resources: Resources) -> list[str]:
    c = best.config
    unit = "core" if resources.kind == "cpu" else "GPU"
    share = f"{resources.per_worker:g} {unit}"
    lines = [f"recommended: {c.prefill_workers} prefill + {c.decode_workers} decode worker(s), "
             f"max decode batch {c.max_batch} ({share} each, {best.units:g} {unit}s): predicted attainment "
             f"{best.attainment:.1%}, goodput {best.goodput_rps(workload.rate_rps):.3f} req/s "
             f"({best.goodput_rps(workload.rate_rps) / best.units:.3f} per {unit})"]
    if not best.stable:
        lines.append(f"  no configuration within {resources.total:g} {unit}s is stable at {workload.rate_rps:g} req/s: "
                     + _unstable(best) + "; lower the rate or add resources")
        return lines
    stage = best.limiting_stage
    lines.append(f"  why: prefill workers are {best.prefill_util:.0%} busy with {best.prefill_batch:.1f} prompts per "
                 f"call (mean wait {_ms(best.prefill_wait_s)} ms, "
                 f"TTFT {_ms(best.ttft_mean_s)} ms vs SLO {workload.slo.ttft_s * 1e3:.0f} ms); decode runs "
                 f"{best.decode_batch:.1f} sequences on average, TPOT {_ms(best.tpot_mean_s)} ms "
                 f"(SLO {workload.slo.tpot_s * 1e3:.0f} ms), {best.decode_util:.0%} of its capacity at batch "
                 f"{c.max_batch}")
    lines.append(f"  the limiting stage is {stage}: when the rate grows, add a {stage} worker first")
    flag = "threads" if resources.kind == "cpu" else "gpus"
    share_flag = (f"--prefill-threads {resources.per_worker:g} --decode-threads {resources.per_worker:g}"
                  if flag == "threads" else
                  f"--prefill-gpus {resources.per_worker:g} --decode-gpus {resources.per_worker:g}")
    lines.append(f"  run it: pdserve serve ... --prefill-workers {c.prefill_workers} "
                 f"--decode-workers {c.decode_workers} --max-num-seqs {c.max_batch} {share_flag} (the prediction "
                 "admits each prefilled request at once, as a server does; run-batch on one shared CPU node holds "
                 "them until prefill is idle unless --batch-admissions off)")
    return lines


def extrapolation(profile: StageProfile, workload: Workload, policy: RouterPolicy = ROUTER_DEFAULTS) -> list[str]:
    """Say so when the workload reaches past the profiled sizes: the fit is a line, not a measurement there."""
    notes = []
    single = max((t for n, t, _ in profile.prefill_points if n == 1), default=0)
    if single and workload.prompt.high > single:
        notes.append(f"prompts up to {workload.prompt.high} tokens, prefill profiled up to {single}")
    packed = max((t for _, t, _ in profile.prefill_points), default=0)
    if packed and policy.max_prefill_tokens > packed:
        notes.append(f"prefill calls pack up to {policy.max_prefill_tokens} tokens, profiled up to {packed}")
    context = workload.prompt.high + workload.output.high
    if profile.decode_points and context > max(c for _, c, _ in profile.decode_points):
        notes.append(f"contexts up to {context} tokens, decode profiled up to "
                     f"{max(c for _, c, _ in profile.decode_points)}")
    return [f"  note: extrapolated beyond the profile ({'; '.join(notes)}): profile without --quick, "
            "or at sizes that cover the workload"] if notes else []


def compare_modes(pd: Prediction, colo: ColocatedPrediction, pd_rate: float | None, colo_rate: float | None,
                  workload: Workload, resources: Resources) -> list[str]:
    """PD's recommendation against --mode colocated on the same units: which serves more within the SLOs,
    and which SLO decides it (what DistServe's comparison is about)."""
    unit = "core" if resources.kind == "cpu" else "GPU"
    c, rate = pd.config, workload.rate_rps
    lines = [f"colocated (--mode colocated --colocated-workers {colo.workers}, {resources.per_worker:g} {unit} each, "
             f"max batch {colo.max_batch}, {colo.batched_tokens} tokens a step): attainment {colo.attainment:.1%} "
             f"(TTFT ok {colo.ttft_attainment:.1%}, TPOT ok {colo.tpot_attainment:.1%}; "
             f"TTFT {_ms(colo.ttft_mean_s)} ms, TPOT {_ms(colo.tpot_mean_s)} ms) against "
             f"PD {c.prefill_workers}P+{c.decode_workers}D's {pd.attainment:.1%} "
             f"(TTFT ok {pd.ttft_attainment:.1%}, TPOT ok {pd.tpot_attainment:.1%})"]
    if pd_rate is not None and colo_rate is not None:
        lines.append(f"  at >= 90% attainment: colocated sustains {colo_rate:.3f} req/s ({colo_rate / colo.units:.3f} "
                     f"per {unit}), PD {pd_rate:.3f} req/s ({pd_rate / pd.units:.3f} per {unit})")
    # per core or GPU: PD's recommendation may leave units idle that colocated puts to work
    better = ((colo_rate / colo.units, pd_rate / pd.units) if colo_rate is not None and pd_rate is not None
              else (colo.goodput_rps(rate) / colo.units, pd.goodput_rps(rate) / pd.units))
    winner = "colocated" if better[0] > better[1] * 1.02 else "PD" if better[1] > better[0] * 1.02 else "neither"
    why = []
    if colo.tpot_attainment < pd.tpot_attainment - 0.01 or colo.tpot_mean_s > 1.1 * pd.tpot_mean_s:
        why.append("colocated decode steps also carry prefill chunks, which stretch TPOT")
    if colo.ttft_attainment > pd.ttft_attainment + 0.01 or colo.ttft_mean_s < 0.9 * pd.ttft_mean_s:
        why.append(f"colocated prefills on all {colo.workers} workers, in chunks beside decode, which cuts TTFT")
    lines.append(f"  which mode: {'about the same' if winner == 'neither' else winner + ' serves more within the SLOs'}"
                 f" per {unit}"
                 + (f" ({'; '.join(why)})" if why else ""))
    return lines
