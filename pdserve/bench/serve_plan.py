"""`pdserve bench serve --plan`: `pdserve plan`'s prediction for the configuration benchmarked, set against
what was measured (the planner's own check, on the benchmark's workload)."""

from __future__ import annotations

import os


def worker_threads(cluster) -> int:
    """The torch threads a prefill worker of `cluster` runs with (as start_workers picks them, locally)."""
    return (cluster.prefill_threads or int(cluster.prefill.num_cpus)
            or max(1, (os.cpu_count() or 1) // max(cluster.num_prefill, cluster.num_decode)))


def measure_profile(engine, threads: int, bench, quick: bool):
    """`pdserve plan`'s profile at sizes that cover the benchmark's requests (fewer sizes than plan's own,
    as it runs in the same command, but more repeats: each point is the fastest of them, and on a
    shared machine the fixed decode cost fitted from two repeats varied 2x between runs minutes apart)."""
    from dataclasses import replace

    from engine.cpu_features import CpuInfo
    from engine.runner import ModelRunner
    from pdserve.plan.profile import QUICK_SIZES, ProfileSizes, measure

    w = bench.workload
    sizes = QUICK_SIZES if quick else ProfileSizes(
        prefill_tokens=tuple(sorted({min(32, w.max_prompt), max(w.min_prompt, w.max_prompt // 4), w.max_prompt})),
        prefill_packed=((4, 64), (16, 64)),  # calls under load pack several prompts
        decode_batches=tuple(b for b in (1, 8, 32, 64) if b <= max(32, engine.max_num_seqs)),
        decode_contexts=(max(1, w.min_prompt), w.max_prompt + w.max_output), repeats=5)
    runner = ModelRunner(replace(engine, num_threads=threads))
    cfg = runner.config
    where = CpuInfo.here().describe() if cfg.device == "cpu" else cfg.device
    # The benchmarked workers share this node: time each stage beside a busy neighbour too.
    return measure(runner, sizes, threads, f"{runner.folder.name} {cfg.dtype} on {where}", neighbour=True)


def colocated_threads(cluster) -> int:
    """The torch threads a colocated worker runs with: the decode role's, as start_workers picks them."""
    return (cluster.decode_threads or int(cluster.decode.num_cpus)
            or max(1, (os.cpu_count() or 1) // cluster.num_colocated))


def plan_vs_measured(profile, report: dict, cluster, engine, router) -> dict:
    """`pdserve plan`'s rate at the target for the pd configuration benchmarked (its router's batching
    included), against the measured one; the same for the colocated configuration when it ran."""
    from pdserve.observability.metrics import SLO
    from pdserve.plan.check import predicted_sustained, predicted_sustained_colocated
    from pdserve.plan.model import Config
    from pdserve.plan.report import describe_profile
    from pdserve.plan.simulate import RouterPolicy

    config = Config(cluster.num_prefill, cluster.num_decode, engine.max_num_seqs)
    threads, policy = worker_threads(cluster), RouterPolicy.of(router)
    lengths, slo = [tuple(x) for x in report["lengths"]], SLO(**report["slo"])
    cv = report["arrival"]["cv"] if report["arrival"]["process"] == "gamma" else 1.0
    pd = report["modes"].get("pd", {})
    predicted = predicted_sustained(profile, lengths, slo, config, threads, report["target"], policy=policy, cv=cv,
                                    cached_tokens=cached_per_request(pd), front_end_cpu_s=front_end_cpu_per_request(pd))
    out = {"config": f"{config.prefill_workers}P+{config.decode_workers}D, max batch {config.max_batch}, "
                     f"{threads} threads each", "profile": describe_profile(profile),
           "cached_prompt_tokens": cached_per_request(pd), "front_end_cpu_ms": 1e3 * front_end_cpu_per_request(pd),
           **_against(predicted, pd, "pd")}
    if "colocated" in report["modes"]:
        colo_threads = colocated_threads(cluster)
        colo = predicted_sustained_colocated(profile, lengths, slo, cluster.num_colocated, engine.max_num_seqs,
                                             cluster.max_num_batched_tokens, colo_threads, report["target"],
                                             policy=policy, cv=cv,
                                             cached_tokens=cached_per_request(report["modes"]["colocated"]),
                                             front_end_cpu_s=front_end_cpu_per_request(report["modes"]["colocated"]))
        out["colocated"] = {"config": f"{cluster.num_colocated} colocated workers, max batch {engine.max_num_seqs}, "
                                      f"{colo_threads} threads each",
                            "cached_prompt_tokens": cached_per_request(report["modes"]["colocated"]),
                            "front_end_cpu_ms": 1e3 * front_end_cpu_per_request(report["modes"]["colocated"]),
                            **_against(colo, report["modes"]["colocated"], "colocated")}
    return out


def cached_per_request(mode_report: dict) -> float:
    """Prompt tokens per completed request the mode's server found in its prefix cache (the chat
    template's system prompt and a shared instruction): the planner does not compute or send them."""
    return _per_request(mode_report, "cached_prompt_tokens", "completed")


def front_end_cpu_per_request(mode_report: dict) -> float:
    """CPU seconds per request the benchmark process spent (router, HTTP server, client) beside the workers
    on the same cores: the planner takes them from the workers' share."""
    return _per_request(mode_report, "front_end_cpu_s", "requests")


def _per_request(mode_report: dict, key: str, per: str) -> float:
    """A rate counter summed over the mode's rates, over their `per` counts summed."""
    rates = mode_report.get("rates", [])
    n = sum(r[per] for r in rates)
    return sum(r.get(key, 0) for r in rates) / n if n else 0.0


def _against(predicted: float, measured: dict, mode: str) -> dict:
    from pdserve.plan.check import compare

    if "sustained" not in measured:
        return {"predicted_rps": predicted, "measured_rps": None, "relative_error": None,
                "verdict": f"{mode} was not measured"}
    return compare(predicted, measured["sustained"])
